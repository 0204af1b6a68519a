"""Training compact GPT-2 models: from scratch on text files, or fine-tuned on prompt/completion pairs.

Pre-training is next-token cross-entropy with teacher forcing: the model reads a window
of tokens and is scored on predicting each next one. Fine-tuning concatenates prompt and
completion into one sequence (a decoder has no separate encoder input) and sets the
labels of the prompt positions, and of padding, to -100 so only the completion is scored.

The loop never prints: it reports ``Progress`` events to a callback, and the CLI draws
them. Batches are drawn from a generator seeded by (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmgen import train_state
from llmgen.cache import pad
from llmgen.checkpoint import DTYPES, load_checkpoint, save_checkpoint
from llmgen.config import require
from llmgen.errors import LlmgenError
from llmgen.files import disk_error, write_text
from llmgen.models.gpt2 import GPT2, GPT2Config

IGNORE_INDEX = -100
EOS = "<|endoftext|>"
STATE_DIR = "train-state"  # inside the output directory: what --resume continues from
MIN_VOCAB = 258  # 256 bytes + EOS + 1 merge
MAX_VOCAB = 1_000_000  # tokenizers reserves ~70 bytes an entry up front: 10**9 asked for 70 GB and aborted
MAX_STEPS = 1_000_000_000
SHAPE_FLAGS = {"vocab_size": "--vocab-size", "context": "--context", "n_layer": "--layers", "n_embd": "--dim", "n_head": "--heads"}


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    context: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    val_fraction: float = 0.05
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bfloat16 (fast on CPUs with AVX512-BF16, and on GPUs)
    save_dtype: str = "float32"  # how the final weights are stored; float16 halves the file

    def __post_init__(self) -> None:
        self._check_shape()
        self._check_schedule()

    def _check_shape(self) -> None:
        """Lower bounds only: what fits above them depends on the machine (``check_fits``)."""
        require(MIN_VOCAB <= self.vocab_size <= MAX_VOCAB,
                f"--vocab-size must be in [{MIN_VOCAB}, {MAX_VOCAB:,}] (256 bytes + EOS + 1 merge at least), got {self.vocab_size:,}")
        require(self.context >= 8, f"--context must be >= 8, got {self.context}")
        require(self.n_layer >= 1, f"--layers must be >= 1, got {self.n_layer}")
        require(self.n_embd >= 8, f"--dim must be >= 8, got {self.n_embd}")
        require(self.n_head >= 1, f"--heads must be >= 1, got {self.n_head}")
        require(self.n_embd % self.n_head == 0, f"--dim {self.n_embd} must be a multiple of --heads {self.n_head}")
        require(self.save_dtype in DTYPES, f"save_dtype {self.save_dtype!r} unknown")

    def _check_schedule(self) -> None:
        """Above lr 1 AdamW only diverges, and past float32's range its step overflows."""
        require(1 <= self.steps <= MAX_STEPS, f"--steps must be in [1, {MAX_STEPS:,}], got {self.steps:,}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(math.isfinite(self.lr) and 0 < self.lr <= 1, f"--lr must be in (0, 1], got {self.lr}")
        require(0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}")
        rates = (self.min_lr_ratio, self.weight_decay, self.grad_clip)
        require(all(math.isfinite(v) and v >= 0 for v in rates), f"min_lr_ratio, weight_decay and grad_clip must be finite and >= 0, got {rates}")
        require(0 < self.val_fraction < 1, "val_fraction must be in (0, 1)")
        require(min(self.eval_every, self.save_every, self.eval_batches) >= 1 and self.warmup >= 0,
                "eval_every, save_every and eval_batches must be >= 1, warmup >= 0")


PRESETS = {
    # Seconds on a laptop CPU: for tests and trying the command out.
    "tiny": TrainConfig(vocab_size=1024, context=64, n_layer=2, n_embd=64, n_head=4, steps=200, batch_size=16, lr=3e-3),
    # The embedded default model: 6.9M parameters, 13.7 MB stored as float16, ~35 min on 2 CPU cores.
    "small": TrainConfig(
        vocab_size=8000, context=256, n_layer=6, n_embd=256, n_head=8, steps=1000, batch_size=32, lr=1.5e-3,
        warmup=100, eval_every=100, save_every=100, bf16=True, save_dtype="float16",
    ),
}


def parameter_count(cfg: TrainConfig) -> int:
    """GPT-2's parameters at these settings: tied embedding, positions, blocks, final norm."""
    d = cfg.n_embd
    return cfg.vocab_size * d + cfg.context * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d


def memory_needed(cfg: TrainConfig) -> int:
    """A lower bound on the bytes training takes, in float32: weights, gradients and two
    AdamW moments, plus the activations backward keeps (about 16 widths per token and
    layer, and the logits with their gradient). Measured peaks run 1.0 to 1.7 times this."""
    tokens = cfg.batch_size * cfg.context
    return 4 * (4 * parameter_count(cfg) + tokens * (16 * cfg.n_layer * cfg.n_embd + 2 * cfg.vocab_size))


def memory_available(device: torch.device) -> int | None:
    """The memory of ``device``: the GPU's, else the machine's RAM or the container's
    limit if lower; None where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        return min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        return total


def check_fits(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a model that cannot train in this device's memory, before any work starts."""
    need, have = memory_needed(cfg), memory_available(device)
    require(
        have is None or need <= have,
        f"--layers {cfg.n_layer} --dim {cfg.n_embd} --vocab-size {cfg.vocab_size:,} ({parameter_count(cfg) / 1e6:,.1f}M parameters) "
        f"with --batch-size {cfg.batch_size:,} --context {cfg.context:,} need at least {need / 2**30:,.1f} GiB to train, "
        f"and this {device.type} has {(have or 0) / 2**30:,.1f} GiB: make some of them smaller",
    )


@dataclass(frozen=True)
class Progress:
    """One report from the loop: after a step, with the eval loss when one was computed."""

    step: int
    steps: int
    loss: float
    eval_loss: float | None
    lr: float
    tokens_per_second: float
    elapsed: float


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme): any byte sequence is representable, no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def read_documents(paths: list[Path]) -> list[str]:
    """Each file split into paragraphs (blank-line separated): the unit of the held-out split."""
    docs = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmgenError(f"{path}: cannot read training text ({e})") from None
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        docs.extend(p for p in paragraphs if p)
    if not docs:
        raise LlmgenError("the training files contain no text")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic held-out split of whole paragraphs."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def token_stream(docs: list[str], tok: Tokenizer) -> torch.Tensor:
    """All documents as one stream of ids, each followed by EOS so the model learns to end."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, context: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of context + 1 tokens: inputs are [:-1], targets [1:]."""
    if len(stream) <= context + 1:
        raise LlmgenError(f"not enough text: {len(stream)} tokens for windows of {context + 1}")
    starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()])


def file_hashes(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# ---------------------------------------------------------------- prompt/completion pairs


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LlmgenError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmgenError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            raise LlmgenError(f'{path}:{n}: expected {{"prompt": str, "completion": str}}')
        pairs.append((rec["prompt"], rec["completion"]))
    if not pairs:
        raise LlmgenError(f"{path}: no pairs")
    return pairs


def pair_example(tok: Tokenizer, prompt: str, completion: str, context: int) -> tuple[list[int], int]:
    """Prompt + completion + EOS as one sequence, and where the completion starts."""
    p = tok.encode(prompt).ids
    c = tok.encode(completion).ids + [tok.token_to_id(EOS)]
    ids = (p + c)[: context + 1]
    return ids, len(p)


def mask_prompt(targets: torch.Tensor, completion_start: torch.Tensor) -> torch.Tensor:
    """Set targets that predict prompt tokens to -100. ``targets[:, i]`` is the token at i + 1,
    so target i belongs to the completion once i + 1 >= completion start."""
    position = torch.arange(targets.shape[1], device=targets.device)[None] + 1
    return targets.masked_fill(position < completion_start[:, None], IGNORE_INDEX)


def pair_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, attention mask, and labels with prompt and padding set to -100."""
    seqs, real = pad([ids for ids, _ in examples], left=False, pad_id=pad_id)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    targets = targets.masked_fill(real[:, 1:] == 0, IGNORE_INDEX)
    labels = mask_prompt(targets, torch.tensor([start for _, start in examples]))
    return inputs, real[:, :-1], labels


# ---------------------------------------------------------------- the loop


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not -100."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_weights(model: GPT2, n_layer: int, seed: int) -> None:
    """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), LayerNorm 1/0."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            p.data = torch.randn(p.shape, generator=gen) * std
        elif "ln" in name and name.endswith("weight"):
            p.data = torch.ones(p.shape)
        else:
            p.data = torch.zeros(p.shape)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, never on biases, LayerNorm or positions' offsets."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


class Trainer:
    """One training run: model, optimizer, data sampler, and where it saves itself."""

    def __init__(self, model: GPT2, cfg: TrainConfig, batches: Callable[[int], tuple], val: Callable[[int], tuple],
                 out_dir: Path, device: torch.device, tokenizer: Tokenizer | None = None) -> None:
        self.model, self.cfg, self.batches, self.val = model, cfg, batches, val
        self.out_dir, self.device = out_dir, device
        self.tokenizer = tokenizer  # saved with the state when training made it, so a resume reads it back
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        self.last_eval: float | None = None
        self.initial_eval: float | None = None

    def _loss(self, inputs, mask, labels) -> torch.Tensor:
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        mask = mask.to(self.device) if mask is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.model(inputs, attention_mask=mask)
        return lm_loss(logits, labels)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self._loss(*self.val(i)).item() for i in range(self.cfg.eval_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def run(self, on_progress: Callable[[Progress], None] | None = None, stop_after: int | None = None) -> None:
        """Train until ``cfg.steps`` (or ``stop_after`` steps of this call, used to simulate an interruption)."""
        cfg, started, tokens = self.cfg, time.perf_counter(), 0
        self.model.train()
        done_here = 0
        while self.step < cfg.steps and (stop_after is None or done_here < stop_after):
            lr = learning_rate(self.step, cfg)
            loss, step_tokens = self._train_step(lr)
            done_here += 1
            tokens += step_tokens
            evaluated = None
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                evaluated = self.last_eval = self.evaluate()
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_state()
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(Progress(self.step, cfg.steps, loss, evaluated, lr, tokens / max(elapsed, 1e-9), elapsed))

    def _train_step(self, lr: float) -> tuple[float, int]:
        """One optimizer step; returns its loss and how many tokens it scored."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, mask, labels = self.batches(self.step)
        loss = self._loss(inputs, mask, labels)
        self._require_finite("loss", loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self._require_finite("gradient norm", norm.item())
        self.optimizer.step()
        self.step += 1
        return loss.item(), int((labels != IGNORE_INDEX).sum())

    def _require_finite(self, what: str, value: float) -> None:
        """Stop before a NaN or infinity reaches the weights: every save stays usable."""
        if not math.isfinite(value):
            raise LlmgenError(
                f"training diverged at step {self.step + 1} of {self.cfg.steps}: the {what} is {value} "
                "(a lower --lr may help); nothing from this step on was saved"
            )

    def run_resumable(self, saved: train_state.Save | None, on_progress, stop_after: int | None) -> tuple[float, float]:
        """Continue from ``saved`` when given, else start fresh; return the held-out loss
        before training (of the original start) and after."""
        _make_dir(self.out_dir / STATE_DIR)  # marks the run for --resume
        if saved is None:
            self.initial_eval = self.evaluate()  # initialisation is seeded: the same on every start
        else:
            self.load_state(saved)
        self.run(on_progress, stop_after)
        final = self.last_eval if self.last_eval is not None else self.evaluate()
        return self.initial_eval, final

    def finish(self, record: dict, tokenizer: Tokenizer, generation: dict) -> TrainResult:
        """Write the checkpoint once every step is done, then the training record, whose
        presence marks the directory as finished (``finished``)."""
        done = self.step >= self.cfg.steps
        if done:
            save_checkpoint(self.model, tokenizer, self.out_dir, generation, DTYPES[self.cfg.save_dtype])
        _write_record(self.out_dir, record)
        if done:
            tidy_finished(self.out_dir)
        return TrainResult(self.out_dir, self.step, record["initial_eval_loss"], record["final_eval_loss"], record)

    # -- resumable state: weights and optimizer moments in safetensors, counters in JSON (no pickle)

    def save_state(self) -> None:
        meta = {"last_eval": self.last_eval, "initial_eval_loss": self.initial_eval, "config": asdict(self.cfg)}
        train_state.write(self.out_dir / STATE_DIR, self.step, meta, self._state_tensors(), self.tokenizer)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"optim.{names[id(p)]}.{key}"] = st[key].detach().cpu().contiguous()
            tensors[f"optim.{names[id(p)]}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return tensors

    def load_state(self, saved: train_state.Save) -> None:
        tensors = saved.tensors
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self._require_same_shape(saved, weights)
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        for name, p in self.model.named_parameters():
            if f"optim.{name}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": tensors[f"optim.{name}.step"][0].clone(),
                    "exp_avg": tensors[f"optim.{name}.exp_avg"].to(self.device),
                    "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(self.device),
                }
        self.step, self.last_eval = saved.step, saved.meta.get("last_eval")
        self.initial_eval = saved.meta.get("initial_eval_loss")

    def _require_same_shape(self, saved: train_state.Save, weights: dict[str, torch.Tensor]) -> None:
        """A resume with other model flags than the run began with: name them."""
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if expected == {k: tuple(v.shape) for k, v in weights.items()}:
            return
        before = saved.meta.get("config", {})
        changed = [f"{flag} {before[key]} (now {getattr(self.cfg, key)})" for key, flag in SHAPE_FLAGS.items()
                   if key in before and before[key] != getattr(self.cfg, key)]
        raise LlmgenError(f"cannot resume: {saved.path} holds a model of another shape"
                          + (f", made with {', '.join(changed)}" if changed else "") + "; resume with the flags the run began with")


# ---------------------------------------------------------------- entry points


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    initial_eval_loss: float
    final_eval_loss: float
    record: dict


def _seeded(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**64)  # torch takes 64 bits


def _resume_from(out_dir: Path, resume: bool, on_warning: Callable[[str], None] | None) -> train_state.Save | None:
    return train_state.latest(out_dir / STATE_DIR, on_warning or warnings.warn) if resume else None


def pretrain(
    files: list[Path],
    out_dir: Path,
    cfg: TrainConfig,
    device: torch.device,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    stop_after: int | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a tokenizer and a model on ``files``. With ``resume``, continue from the
    newest whole save in ``out_dir``; ``on_warning`` hears of each damaged save skipped."""
    torch.manual_seed(cfg.seed)
    docs = read_documents(files)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    saved = _resume_from(out_dir, resume, on_warning)
    tok = saved.tokenizer if saved and saved.tokenizer else train_tokenizer(train_docs, cfg.vocab_size)
    train_ids, val_ids = token_stream(train_docs, tok), token_stream(val_docs, tok)

    model_cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head
    )
    model = GPT2(model_cfg)
    init_weights(model, cfg.n_layer, cfg.seed)
    model.to(device)

    def batch(step: int, stream=train_ids, offset=0):
        w = windows(stream, cfg.context, cfg.batch_size, _seeded(cfg.seed + offset, step))
        return w[:, :-1], None, w[:, 1:]

    def val_batch(i: int):
        return batch(i, val_ids, offset=7919)

    trainer = Trainer(model, cfg, batch, val_batch, out_dir, device, tokenizer=tok)
    initial, final = trainer.run_resumable(saved, on_progress, stop_after)
    record = {
        "kind": "pretrain",
        "config": asdict(cfg),
        "data": file_hashes(files),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": trainer.step,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "final_eval_perplexity": math.exp(final),
    }
    eos = tok.token_to_id(EOS)
    return trainer.finish(record, tok, {"bos_token_id": eos, "eos_token_id": eos})


def finetune(
    init_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    cfg: TrainConfig,
    device: torch.device,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    stop_after: int | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> TrainResult:
    base = load_checkpoint(init_dir, device=str(device), dtype="float32", trainable=True)
    model = base.model.requires_grad_(True)
    tok = base.tokenizer
    if tok.token_to_id(EOS) is None:
        raise LlmgenError(f"{init_dir}: tokenizer has no {EOS} token to end completions with")
    context = model.cfg.context_length - 1
    examples = [pair_example(tok, p, c, context) for p, c in read_pairs(pairs_path)]
    n_val = max(1, round(len(examples) * cfg.val_fraction)) if len(examples) > 1 else 0
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    val = [examples[i] for i in order[:n_val]] or examples
    train = [examples[i] for i in order[n_val:]] or examples
    pad = tok.token_to_id(EOS)

    def pick(pool, step, offset=0):
        gen = _seeded(cfg.seed + offset, step)
        idx = torch.randint(0, len(pool), (min(cfg.batch_size, len(pool)),), generator=gen).tolist()
        return pair_batch([pool[i] for i in idx], pad)

    cfg = replace(cfg, context=context + 1)
    trainer = Trainer(model, cfg, lambda s: pick(train, s), lambda i: pick(val, i, 7919), out_dir, device)
    initial, final = trainer.run_resumable(_resume_from(out_dir, resume, on_warning), on_progress, stop_after)
    record = {
        "kind": "finetune",
        "init": str(init_dir),
        "config": asdict(cfg),
        "data": file_hashes([pairs_path]),
        "pairs": len(examples),
        "steps": trainer.step,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
    }
    return trainer.finish(record, tok, {"bos_token_id": base.bos_token_id, "eos_token_id": list(base.eos_token_ids) or pad})


def finished(out_dir: Path) -> dict | None:
    """The training record of a run in ``out_dir`` that completed every step, else None."""
    record = _read_record(out_dir)
    steps = record.get("config", {}).get("steps")
    if steps and record.get("steps", 0) >= steps and (out_dir / "config.json").is_file():
        return record
    return None


def tidy_finished(out_dir: Path) -> None:
    """A finished model directory holds the model, not the optimizer's moments: delete
    the state, and what a kill while finishing left (temporary files, a half-deleted
    state). Best effort: the model is whole whatever stays."""
    if (out_dir / STATE_DIR).exists():
        train_state.remove(out_dir / STATE_DIR)
    for leftover in [*out_dir.glob(f".{STATE_DIR}.*.deleting"), *out_dir.glob(".*.[0-9]*.tmp")]:
        with contextlib.suppress(OSError):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(path, e) from e


def _record_path(out_dir: Path) -> Path:
    return out_dir / "training.json"


def _read_record(out_dir: Path) -> dict:
    path = _record_path(out_dir)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise LlmgenError(f"{path} is damaged (cut short, or not a training record): move it away to train into {out_dir}")
    return record


def _write_record(out_dir: Path, record: dict) -> None:
    _make_dir(out_dir)
    write_text(_record_path(out_dir), json.dumps(record, indent=2) + "\n")


