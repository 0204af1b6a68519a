"""Teacher-forced scoring: how probable the model finds a given text, token by token.

A text longer than the context is scored in sliding windows, as in Hugging Face's
"perplexity of fixed-length models": windows of C tokens (the context) start every S
tokens (the stride), and each scores only the tokens the one before it did not, so every
token is scored once, with at least C - S tokens before it once the first window is done.
The windows are independent, so several go through the model in one pass.

``sampler_score.py`` asks the same of the sampler chain instead of the model;
``divergence`` here compares two models that share a tokenizer on the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmgen.errors import LlmgenError, UsageError

# Logit elements (windows x positions x vocabulary) one pass may produce: 16 windows of
# the embedded model (256 positions, 8,000 tokens: 128 MB of float32), one of a model
# whose C x V is larger. Batches are for an accelerator: on two CPU cores one window of
# 256 tokens already keeps them busy, and 1 to 32 windows a pass scored within noise.
PASS_ELEMENTS = 2**25

Progress = Callable[[int, int], None]  # told the tokens scored so far, and in all


@dataclass(frozen=True)
class Window:
    """The model sees ``ids[begin:end]`` and scores positions ``first .. end - 1``."""

    begin: int
    end: int
    first: int


def plan_windows(n: int, context: int, stride: int, first: int) -> list[Window]:
    """The windows over ``n`` ids whose scoring starts at position ``first`` (1 after a
    BOS, or past a chat prompt): the HF recipe's loop, each window scoring from where the
    last one ended."""
    if not 1 <= stride < context:
        raise UsageError(f"--stride must be between 1 and {context - 1} (the context is {context} tokens)")
    windows, begin, done = [], 0, first
    while True:
        end = min(begin + context, n)
        windows.append(Window(begin, end, max(done, begin + 1)))
        done = end
        if end == n:
            return windows
        begin += stride


@dataclass
class Score:
    """``logprobs[i]`` is log p(token_ids[i] | everything before it in its window); None
    where no context exists (the first token, when the model has no BOS token)."""

    token_ids: list[int]
    logprobs: list[float | None]
    windows: int = 1
    stride: int | None = None  # None when the text fit in one window

    @property
    def perplexity(self) -> float | None:
        return perplexity(self.logprobs)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def record(self) -> dict:
        """The JSON fields of ``score --json`` (``text`` and the prompt are the caller's)."""
        return {"token_ids": self.token_ids, "logprobs": self.logprobs, "perplexity": self.perplexity,
                "n_tokens": self.n_tokens, "windows": self.windows, "stride": self.stride}


def perplexity(logprobs: list[float | None]) -> float | None:
    scored = [lp for lp in logprobs if lp is not None]
    return math.exp(-sum(scored) / len(scored)) if scored else None


@dataclass(frozen=True)
class Layout:
    """A text laid out for scoring: ``ids`` = the prefix (BOS, a chat prompt, or
    nothing) then the text, cut into ``windows``."""

    ids: list[int]
    windows: list[Window]
    stride: int
    unscored: int  # text tokens with no context: the first, when there is no prefix

    def result(self, token_ids: list[int], logprobs: list[float | None]) -> Score:
        several = len(self.windows) > 1
        return Score(list(token_ids), logprobs, len(self.windows), self.stride if several else None)


def layout(token_ids: list[int], bos_token_id: int | None, context_length: int, context: list[int] | None = None,
           stride: int | None = None) -> Layout:
    """``[BOS] + text`` (or ``context + text``: a chat prompt the text answers), and its
    windows; ``stride`` defaults to half the context."""
    if not token_ids:
        raise LlmgenError("nothing to score: the text is empty")
    prefix = list(context) if context else ([bos_token_id] if bos_token_id is not None else [])
    if len(prefix) >= context_length:
        raise LlmgenError(f"the prompt is {len(prefix)} tokens; the model's context is {context_length}")
    ids = prefix + list(token_ids)
    stride = context_length // 2 if stride is None else stride
    windows = plan_windows(len(ids), context_length, stride, max(1, len(prefix)))
    return Layout(ids, windows, stride, unscored=0 if prefix else 1)


def passes(models: list[torch.nn.Module], text: Layout, per_pass: int | None = None,
           progress: Progress | None = None) -> Iterator[tuple[Window, list[torch.Tensor]]]:
    """Each window with every model's logits at its scored positions (``window_logits``),
    in text order. The windows go through the models in groups, ``per_pass`` at a time,
    else as many as ``PASS_ELEMENTS`` allows; ``progress`` hears the tokens scored so far
    and in all after each group."""
    cfg = models[0].cfg
    size = per_pass or max(1, PASS_ELEMENTS // (min(cfg.context_length, len(text.ids)) * cfg.vocab_size))
    total, done = len(text.ids) - text.windows[0].first, 0
    for i in range(0, len(text.windows), size):
        group = text.windows[i : i + size]
        yield from zip(group, zip(*(window_logits(m, text.ids, group) for m in models)))
        done += sum(w.end - w.first for w in group)
        if progress:
            progress(done, total)


@torch.inference_mode()
def window_logits(model: torch.nn.Module, ids: list[int], windows: list[Window]) -> list[torch.Tensor]:
    """One forward pass over these windows, right-padded to the longest (padding comes
    after every real token, so causal attention never sees it and positions count from
    0 in each window). Returns each window's float32 logits at the positions that
    predict its scored tokens: row j predicts ``ids[w.first + j]``, ``(scored, vocab)``."""
    device = next(model.parameters()).device
    width = max(w.end - w.begin for w in windows)
    batch = torch.zeros(len(windows), width, dtype=torch.long)  # (B, T); padding is id 0
    for row, w in enumerate(windows):
        batch[row, : w.end - w.begin] = torch.tensor(ids[w.begin : w.end])
    logits = model(batch.to(device))  # (B, T, V)
    return [logits[row, w.first - w.begin - 1 : w.end - w.begin - 1].float() for row, w in enumerate(windows)]


def targets(ids: list[int], w: Window, device: torch.device) -> torch.Tensor:
    return torch.tensor(ids[w.first : w.end], device=device)


@torch.inference_mode()
def score(
    model: torch.nn.Module,
    token_ids: list[int],
    bos_token_id: int | None,
    context: list[int] | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
    per_pass: int | None = None,
) -> Score:
    """Every token of the text scored once: after ``[BOS]`` (or ``context``, a chat
    prompt the text answers), in sliding windows when the whole is longer than the
    model's context. ``progress`` hears how far it has got."""
    cfg = model.cfg
    text = layout(token_ids, bos_token_id, cfg.context_length, context, stride)
    values: list[float | None] = [None] * text.unscored
    for w, (logits,) in passes([model], text, per_pass, progress):
        values += torch.log_softmax(logits, -1).gather(-1, targets(text.ids, w, logits.device)[:, None])[:, 0].tolist()
    return text.result(token_ids, values)


@dataclass
class Divergence:
    """Two models on the same text, position by position: ``kl[i]`` is
    KL(P_reference || P_model) of the distributions that predict token i (None where
    the token has no context), ``same_top`` the share of positions where both models'
    most probable token is the same."""

    score: Score
    reference: Score
    kl: list[float | None]
    same_top: float

    @property
    def kl_values(self) -> torch.Tensor:
        return torch.tensor([k for k in self.kl if k is not None], dtype=torch.float64)

    @property
    def kl_mean(self) -> float:
        return float(self.kl_values.mean())

    @property
    def kl_max(self) -> float:
        return float(self.kl_values.max())

    @property
    def kl_p99(self) -> float:
        return percentile(self.kl_values, 99)

    def record(self) -> dict:
        return {**self.score.record(), "reference_perplexity": self.reference.perplexity, "kl_mean": self.kl_mean,
                "kl_p99": self.kl_p99, "kl_max": self.kl_max, "same_top": self.same_top, "kl": self.kl}


def percentile(values: torch.Tensor, q: float) -> float:
    """NumPy's default (linear) percentile; torch.quantile refuses more than 2**24 values."""
    ordered = values.sort().values
    at = (len(ordered) - 1) * q / 100
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (at - low))


def check_same_tokenizer(ours, theirs) -> None:
    """Compared position by position, both models must read the same ids as the same
    tokens and give distributions over the same vocabulary."""
    if ours.tokenizer.get_vocab(with_added_tokens=True) != theirs.tokenizer.get_vocab(with_added_tokens=True):
        raise UsageError(f"{theirs.path} has another tokenizer than {ours.path}: KL needs two models that share one")
    if ours.model.cfg.vocab_size != theirs.model.cfg.vocab_size:
        raise UsageError(f"{theirs.path} has {theirs.model.cfg.vocab_size} logits per token, {ours.path} "
                         f"{ours.model.cfg.vocab_size}: KL needs the same vocabulary")


@torch.inference_mode()
def divergence(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    token_ids: list[int],
    bos_token_id: int | None,
    stride: int | None = None,
    progress: Progress | None = None,
    per_pass: int | None = None,
) -> Divergence:
    """``score`` for both models over the same windows (the smaller context of the two),
    and the KL divergence of the model's next-token distribution from the reference's
    at every scored position, as ``llama-perplexity --kl-divergence`` reports it."""
    context_length = min(model.cfg.context_length, reference.cfg.context_length)
    text = layout(token_ids, bos_token_id, context_length, None, stride)
    ours: list[float | None] = [None] * text.unscored
    theirs, kl = list(ours), list(ours)
    agree = 0
    for w, (logits, ref_logits) in passes([model, reference], text, per_pass, progress):
        logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits.to(logits.device), -1)  # (scored, V)
        index = targets(text.ids, w, logits.device)[:, None]
        ours += logp.gather(-1, index)[:, 0].tolist()
        theirs += logq.gather(-1, index)[:, 0].tolist()
        q = logq.exp()
        kl += torch.where(q > 0, q * (logq - logp), 0.0).sum(-1).clamp(min=0).tolist()  # rounding can dip below 0
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    scored = sum(k is not None for k in kl)
    return Divergence(text.result(token_ids, ours), text.result(token_ids, theirs), kl, agree / scored if scored else float("nan"))
