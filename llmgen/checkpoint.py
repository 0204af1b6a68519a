"""Read a model directory in the Hugging Face layout into our own modules.

``config.json`` picks the architecture, ``model.safetensors`` (or the shards named in
``model.safetensors.index.json``) holds the weights, ``tokenizer.json`` the tokenizer,
and the optional ``generation_config.json`` the EOS/BOS ids and sampling defaults.
Weights are only ever read with safetensors: nothing is unpickled.

Every problem a user can cause is a ``ModelError`` naming the file or tensor at fault.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from llmgen.errors import LlmgenError, ModelError
from llmgen.models import ARCHITECTURES
from llmgen.models.linear import pack_linears
from llmgen.models.quant import METHOD, SCALE, dequantize_rows, parameter_count, quantize_model, take_rows, weights_format

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation_config.json keys we honour as defaults for the sampling flags.
SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens",
)


@dataclass
class Checkpoint:
    path: Path
    model_type: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    generation_defaults: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @cached_property
    def vocabulary(self):
        """The tokenizer as the sampler sees it (token texts, text -> ids)."""
        from llmgen.sampling import Vocabulary

        return Vocabulary(self.tokenizer)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=False`` adds no BOS/EOS of the tokenizer's own
        (a rendered chat template already holds them, as transformers assumes)."""
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, without the U+FFFD that stands for a character the last tokens
        began but did not finish (its bytes stay in the ids; shown, it would be a
        character that is not there, and a stream would print it before the next token
        completed it)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (for tables and trees). A token
        holding part of a character shows its bytes as ``<0xF0>`` rather than U+FFFD,
        so two such tokens are told apart."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text
        raw = self._token_bytes(token_id)
        return text if raw is None else raw.decode("utf-8", errors="llmgen-hex")

    def _token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for: a byte-level BPE piece through GPT-2's byte
        alphabet, a SentencePiece ``<0xNN>`` byte token, or None if neither."""
        import re

        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return None
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return bytes([int(m.group(1), 16)])
        alphabet = _byte_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return None


def _hex_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start : error.end]), error.end


codecs.register_error("llmgen-hex", _hex_bytes)


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# model_type -> the family a person would name
FAMILIES = {
    "gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi-3",
    "olmo2": "OLMo 2", "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "gpt_neox": "GPT-NeoX (Pythia)",
}


def describe(ckpt: Checkpoint) -> dict:
    """What ``llmgen info`` reports about a loaded model."""
    cfg = ckpt.model.cfg
    files = {p.name: p.stat().st_size for p in sorted(ckpt.path.iterdir()) if p.is_file()}
    embedded = ckpt.path.resolve() == (Path(__file__).parent / "assets" / "default-model").resolve()
    source = "embedded in llmgen" if embedded else str(ckpt.path.resolve())
    origin = ckpt.path / "source.json"  # written by llmgen convert / pull
    if origin.is_file():
        try:
            src = json.loads(origin.read_text())
            source += f" (converted from {src.get('file', '?')}" + (f", pulled from PyPI {src['pypi']}" if "pypi" in src else "") + ")"
        except (OSError, json.JSONDecodeError):
            pass
    record = ckpt.path / "training.json"
    if record.is_file():
        try:
            kind = json.loads(record.read_text()).get("kind", "pretrain")
            source += f" (trained by llmgen train, {kind})"
        except (OSError, json.JSONDecodeError):
            pass
    return {
        "path": str(ckpt.path),
        "source": source,
        "architecture": ckpt.model_type,
        "family": FAMILIES.get(ckpt.model_type, ckpt.model_type),
        "features": list(getattr(cfg, "features", [])),
        "parameters": parameter_count(ckpt.model),
        "layers": getattr(cfg, "n_layer", None),
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": ckpt.tokenizer.get_vocab_size(),
        "context_length": cfg.context_length,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "weights": weights_format(ckpt.model),
        "device": str(ckpt.device),
        "eos_token_ids": list(ckpt.eos_token_ids),
        "bos_token_id": ckpt.bos_token_id,
        "generation_defaults": ckpt.generation_defaults,
        "files": files,
    }


def embedded_dir() -> Path:
    return Path(__file__).parent / "assets" / "default-model"


def default_model_dir(explicit: str | None) -> Path:
    """Which model to load: ``--model``, else ``$LLMGEN_MODEL``, else the embedded model.

    Either may be a directory, the name of a pulled model (``llmgen pull``), or
    ``embedded``."""
    chosen = explicit or os.environ.get("LLMGEN_MODEL")
    if chosen == "embedded" and not Path(chosen).exists():
        chosen = None  # the name records give the embedded model
    if chosen:
        if not Path(chosen).exists():
            from llmgen.models_cache import resolve_name

            named = resolve_name(chosen)
            if named is not None:
                return named
            if os.sep not in chosen and "/" not in chosen:  # a name, not a path: say which exist
                from llmgen.models_cache import nearest

                close = nearest(chosen)
                hint = f"did you mean {close!r}? " if close else ""
                raise ModelError(f"no model directory or pulled model named {chosen!r} ({hint}see `llmgen list`)")
        return Path(chosen)
    embedded = embedded_dir()
    if (embedded / "config.json").is_file():
        return embedded
    raise ModelError("no model given: pass --model DIR or set LLMGEN_MODEL to a model directory")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LlmgenError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    raise LlmgenError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise LlmgenError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    single, index = model_dir / WEIGHTS, model_dir / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: no weight_map")
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise ModelError(f"{model_dir}: no {WEIGHTS} or {WEIGHTS_INDEX} (only safetensors weights are read)")


def read_tensors(files: list[Path], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of the checkpoint, converted to ``dtype``, and the file each came from."""
    tensors, origin = {}, {}
    for path in files:
        if not path.is_file():
            raise ModelError(f"{path}: file not found (named in {WEIGHTS_INDEX})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
            for name in names:
                # One mapping per tensor: pages of the file read so far are unmapped at once,
                # so peak memory is the weights plus one tensor, not the weights twice.
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    t = f.get_tensor(name)
                scales = name.endswith(SCALE)  # quantized weights' scales stay as stored whatever the dtype
                tensors[name] = t.to(dtype) if t.is_floating_point() and not scales else t
                origin[name] = path
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, origin


def _token_id(value, vocab_size: int) -> tuple[int, ...]:
    """Normalise an int-or-list token id setting, dropping ids the model cannot produce."""
    ids = value if isinstance(value, list) else [value]
    return tuple(i for i in ids if isinstance(i, int) and 0 <= i < vocab_size)


def load_checkpoint(
    model_dir: str | os.PathLike, device: str = "auto", dtype: str = "auto", trainable: bool = False,
    weights: bool = True,
) -> Checkpoint:
    """Load a model for generation, or with ``trainable`` for training: then every weight
    stays a dense tensor (for generation, CPU float32 projections are packed for oneDNN;
    ``--dtype int8`` or ``int4`` quantizes them instead). ``weights=False`` reads no
    weights: the model stays on the meta device, with its config, tokenizer and
    generation defaults (what ``batch --ray``'s driver needs to plan; workers generate)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a model directory")
    torch_device = resolve_device(device)
    cfg_path = model_dir / "config.json"
    hf_cfg = read_json(cfg_path)
    quantized = _quantized_kind(dtype, hf_cfg, torch_device, trainable)  # float32 activations, integer weights (models/quant.py)
    torch_dtype = torch.float32 if quantized else resolve_dtype(dtype, torch_device)
    model_type = hf_cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"{cfg_path}: model_type {model_type!r} is not supported (supported: {supported})")
    model_cls, read_config = ARCHITECTURES[model_type]
    files = weight_files(model_dir)
    try:
        cfg = read_config(hf_cfg)
        _check_types(cfg, cfg_path)
        _check_layers(cfg.n_layer, files, cfg_path)
        with torch.device("meta"), _skip_init():
            model = model_cls(cfg)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, RuntimeError) as e:  # built on the meta device:
        raise ModelError(f"{cfg_path}: invalid {model_type} config ({e})") from None  # only the config can fail

    if weights:
        model = _load_weights(model, model_cls, cfg, hf_cfg, files, model_dir, torch_dtype, torch_device, quantized,
                              trainable)
    return _with_tokenizer(model_dir, model_type, model, hf_cfg, cfg.vocab_size)


def _load_weights(model, model_cls, cfg, hf_cfg, files, model_dir, torch_dtype, torch_device, quantized, trainable):
    """The meta-device ``model`` with the checkpoint's weights in it, on ``torch_device``."""
    tensors, origin = read_tensors(files, torch_dtype)
    try:
        renamed = model_cls.rename_checkpoint(tensors, cfg)
        at_rest = take_rows(renamed, _quantization(hf_cfg).get("turned") is True)  # as convert --keep-quant stored them
    except ValueError as e:  # a tensor missing from, or misshapen in, a group the model stacks
        raise ModelError(f"{model_dir}: {e}") from None
    del tensors  # from here each original is referenced once, so it is freed as it is copied
    if not quantized:
        renamed.update(dequantize_rows(at_rest, torch_dtype))
        at_rest = {}
    state = _checked_state_dict(model, renamed, origin, model_dir, held=at_rest)
    model.load_state_dict(state, strict=not at_rest, assign=True)  # held weights: checked, installed below
    del state  # the model holds the only reference now, so packing below frees each dense weight
    if quantized:
        quantize_model(model, at_rest, quantized)
    model = model.to(torch_device).eval().requires_grad_(False)
    if not quantized and not trainable:
        pack_linears(model)
    return model


def _with_tokenizer(model_dir: Path, model_type: str, model, hf_cfg: dict, vocab_size: int) -> Checkpoint:
    """``model`` with the directory's tokenizer, EOS/BOS ids and generation defaults."""
    tokenizer = _load_tokenizer(model_dir / "tokenizer.json", vocab_size)
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    eos = _token_id(gen.get("eos_token_id", hf_cfg.get("eos_token_id")), vocab_size)
    bos = _token_id(gen.get("bos_token_id", hf_cfg.get("bos_token_id")), vocab_size)
    defaults = _generation_defaults(gen, gen_path)
    return Checkpoint(
        path=model_dir,
        model_type=model_type,
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        bos_token_id=bos[0] if bos else None,
        generation_defaults=defaults,
    )


SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _load_tokenizer(tok_path: Path, vocab_size: int) -> Tokenizer:
    """tokenizer.json, refused unless every id it can produce is a row of the model's
    vocabulary (a sparse id past it was an IndexError at run time)."""
    if not tok_path.is_file():
        raise ModelError(f"{tok_path}: file not found")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ModelError(f"{tok_path}: cannot load tokenizer ({e})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if tokenizer.get_vocab_size() > vocab_size or largest >= vocab_size:
        raise ModelError(
            f"{tok_path}: tokenizer has {tokenizer.get_vocab_size()} tokens (ids up to {largest}) but the model's "
            f"vocabulary is {vocab_size}: they do not belong together"
        )
    return tokenizer


def _check_types(cfg, cfg_path: Path) -> None:
    """Each field of the model's config holds what its annotation says (``int``, ``float
    | None``, ...), so a layer_norm_epsilon of null or a width of "64" is an error naming
    the key rather than a TypeError deep inside torch. Compound fields (tuples) are built
    by the family's reader, which checks them."""
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), str(f.type).replace(" ", "").split("|")
        if any(k not in SIMPLE_TYPES and k != "None" for k in kinds) or (value is None and "None" in kinds):
            continue
        allowed = tuple(t for k in kinds if k != "None" for t in SIMPLE_TYPES[k])
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            raise ModelError(f"{cfg_path}: {f.name} must be {' or '.join(kinds)}, got {value!r}")


def _check_layers(n_layer: int, files: list[Path], cfg_path: Path) -> None:
    """Every layer has tensors of its own, so a config with more layers than the files hold
    tensors is wrong, and is refused before building it: 100,000 layers took minutes and
    gigabytes to build on the meta device before the weights refused them."""
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ModelError(f"{cfg_path}: the number of layers must be a positive integer, got {n_layer!r}")
    count = 0
    for path in files:
        if not path.is_file():
            raise ModelError(f"{path}: file not found (named in {WEIGHTS_INDEX})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                count += len(list(f.keys()))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    if n_layer > count:
        raise ModelError(f"{cfg_path}: {n_layer} layers, but the weights hold only {count} tensors in all")


def _generation_defaults(gen: dict, gen_path: Path) -> dict:
    """The sampling defaults of generation_config.json, checked as the flags are: a
    temperature of "0.7" (a string) or a top_p of [0.9] is an error naming the file and key."""
    from llmgen import config

    defaults = {}
    for key in SAMPLING_KEYS:
        if gen.get(key) is None:
            continue
        try:
            defaults[key] = config.from_json(key, gen[key])
            config.check(key, defaults[key])
        except config.SettingError as e:
            raise ModelError(f"{gen_path}: {e.in_record()}") from None
    if "do_sample" in gen and not isinstance(gen["do_sample"], bool):
        raise ModelError(f"{gen_path}: do_sample must be true or false, got {gen['do_sample']!r}")
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """``safetensors.save_file``, with the permissions of any other file we write:
    safetensors creates its files 0600, which left a model unreadable to the group
    and to other users that its config.json and tokenizer.json were readable by."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    generation: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a directory that ``load_checkpoint`` (and transformers) can load.

    Each file goes to a temporary name and is renamed into place (``files``), so a kill
    or a full disk never leaves one half-written. The weights and tokenizer are serialised
    here and written by Python: safetensors and tokenizers report a full disk as
    exceptions of their own, which would pass for bugs."""
    from safetensors.torch import save

    from llmgen import files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.export_checkpoint().items()}
    files.write_bytes(out_dir / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    stored = str(dtype or model.wte.weight.dtype).removeprefix("torch.")
    ids = {k: v for k, v in (generation or {}).items() if k in ("bos_token_id", "eos_token_id")}
    config = {**model.cfg.to_hf(), **ids, "torch_dtype": stored}
    files.write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    files.write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    files.write_text(out_dir / "generation_config.json", json.dumps(generation or {}, indent=2) + "\n")
    return out_dir


@contextmanager
def _skip_init():
    """Build the module skeleton without initialising it: every tensor comes from the
    checkpoint. (Random init on the meta device also imports torch._dynamo: ~1 s.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _quantization(hf_cfg: dict) -> dict:
    found = hf_cfg.get("quantization_config")
    return found if isinstance(found, dict) else {}


def _quantized_kind(dtype: str, hf_cfg: dict, device: torch.device, trainable: bool) -> str | None:
    """How to load integer weights: "int8" or "int4" when asked for, "auto" (each as
    stored) for a model stored so by convert --keep-quant; None for float weights."""
    stored = _quantization(hf_cfg).get("quant_method") == METHOD
    if dtype in ("int8", "int4") and (trainable or device.type != "cpu"):
        raise LlmgenError(f"--dtype {dtype} runs on the CPU, for generation only")
    if dtype in ("int8", "int4"):
        return dtype
    return "auto" if dtype == "auto" and stored and device.type == "cpu" and not trainable else None


def _checked_state_dict(model, renamed, origin, model_dir, held=None) -> dict[str, torch.Tensor]:
    """Match checkpoint tensors to parameters by name and shape, naming the first mismatch.
    ``held`` (quant.Rows) are quantized weights checked here and installed by the caller."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    held = held or {}
    for name, (ckpt_name, shape) in [*((n, (c, t.shape)) for n, (c, t) in renamed.items()),
                                     *((n, (h.ckpt_name, h.shape)) for n, h in held.items())]:
        path = origin[ckpt_name]
        if name not in expected:
            raise ModelError(f"{path}: unexpected tensor {ckpt_name!r} for this model_type")
        if tuple(shape) != tuple(expected[name]):
            raise ModelError(
                f"{path}: tensor {ckpt_name!r} has shape {list(shape)}, config.json implies {list(expected[name])}"
            )
    missing = sorted(set(expected) - set(renamed) - set(held))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{model_dir}: missing tensor {missing[0]!r}{more}")
    state = {}
    for name in list(renamed):
        _, t = renamed.pop(name)
        state[name] = t.contiguous()  # a copy only for transposed weights; the original goes now
    return state
