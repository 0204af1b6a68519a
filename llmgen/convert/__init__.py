"""GGUF -> a Hugging Face-layout safetensors directory that ``--model`` loads.

The ``gguf`` package (an optional extra) reads the file and dequantizes every tensor
to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K ...). On top of that
``metadata`` reads each key as a checked value, ``architectures`` checks every tensor
against them, renames llama.cpp's tensors to Hugging Face's and undoes what its
converter did to them, ``vocab`` rebuilds ``tokenizer.json`` as transformers does, and
this module writes the directory: safetensors, ``config.json``, ``generation_config.json``
and ``tokenizer_config.json`` (with the chat template).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from llmgen.convert.architectures import check_tensors, gguf_config
from llmgen.convert.metadata import Fields
from llmgen.convert.vocab import gguf_tokenizer
from llmgen.errors import LlmgenError, ModelError
from llmgen.files import atomic_directory, rust_io_error
from llmgen.models import quant4
from llmgen.models.quant import METHOD, SCALE, rows_at_rest


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LlmgenError(
            "reading GGUF needs the gguf package: pip install 'gguf>=0.10' (or, in llmgen's source tree, pip install '.[gguf]')"
        ) from None
    return gguf


def convert(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    on_tensor: Callable[[str], None] | None = None,
    keep_quant: bool = False,
) -> dict:
    """Write the converted model into the existing directory ``out_dir``; return its
    config. ``on_tensor`` is called per tensor (progress). Every key and tensor shape is
    checked against the others before any weight is read. With ``keep_quant``, each
    Q4_0 matrix is kept as its blocks, bit for bit (``models/quant4.py``), and each other
    matrix the GGUF stores quantized (Q8_0, Q4_1, K-quants ...) is stored as int8 rows
    with one scale each (``models/quant.py``): half a byte or a byte a weight instead of
    four, which the CPU kernels multiply as integers."""
    reader = open_gguf(gguf_path)
    fields = Fields(reader, gguf_path)
    arch, cfg = gguf_config(fields)
    check_tensors(fields, arch, cfg)
    tokenizer, tokens = gguf_tokenizer(fields)
    chat_template = fields.text("tokenizer.chat_template", None)
    tensors = {}
    for t in reader.tensors:
        name = arch.hf_name(t.name)
        weight = arch.restore(name, _dequantized(gguf_path, t), cfg)
        kept = keep_quant and weight.ndim == 2 and t.tensor_type.name not in FLOAT_TYPES and arch.keeps_quantized(name)
        blocks = _q4_0_blocks(arch, name, t, weight, cfg) if kept and t.tensor_type.name == "Q4_0" else None
        if blocks is not None:
            tensors[name], tensors[name + SCALE] = blocks
        elif kept:
            tensors[name], tensors[name + SCALE] = rows_at_rest(weight)
        else:
            tensors[name] = arch.float_layout(name, weight).to(dtype).contiguous()
        if on_tensor is not None:
            on_tensor(t.name)
    if any(n.endswith(SCALE) for n in tensors):
        formats = sorted({"q4_0 blocks" if tensors[n[: -len(SCALE)]].dtype is torch.uint8 else "int8 rows"
                          for n in tensors if n.endswith(SCALE)})
        cfg = {**cfg, "quantization_config": {"quant_method": METHOD, "formats": formats, "turned": True}}
    _write_model(out_dir, tensors, arch.hf_config(cfg) if arch.hf_config else cfg, dtype, gguf_path.name)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    tok_cfg = {"chat_template": chat_template}
    for key in ("bos_token_id", "eos_token_id"):
        if key in cfg:
            tok_cfg[key.replace("_id", "")] = tokens[cfg[key]]
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    source = {"file": gguf_path.name, "architecture": fields.arch,
              "name": fields.text("general.name", None), "license": fields.text("general.license", None)}
    _write_json(out_dir / "source.json", {k: v for k, v in source.items() if v})
    return cfg


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF tensor types that are not quantized


def _q4_0_blocks(arch, name: str, t, weight: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Q4_0 matrix's own codes (packed two a byte) and float16 scales, in the order
    ``arch.restore`` put its rows (every restore of a matrix moves whole rows, so codes and
    scales move alike); None if the result does not dequantize to exactly ``weight``,
    and the caller stores int8 rows instead."""
    if weight.ndim != 2 or not quant4.fits(tuple(weight.shape)):
        return None
    codes, scales = quant4.gguf_q4_0(t.data, *weight.shape)
    codes = arch.restore(name, codes.float(), cfg).to(torch.uint8)
    scales = arch.restore(name, scales.float(), cfg).half()
    if not torch.equal(quant4.dequantize_blocks(codes, scales), weight):
        return None
    return quant4.pack_codes(codes), scales


def _dequantized(gguf_path: Path, t) -> torch.Tensor:
    """One tensor as float32, in PyTorch's order of dimensions."""
    gguf = require_gguf()
    try:
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelError(f"{gguf_path}: tensor {t.name!r} is stored as {t.tensor_type.name}, "
                         "which the gguf package cannot dequantize") from None
    return torch.from_numpy(weights.reshape(tuple(int(x) for x in reversed(t.shape))).copy())


def _write_model(out_dir: Path, tensors: dict, cfg: dict, dtype: torch.dtype, source: str) -> None:
    from safetensors import SafetensorError

    from llmgen.checkpoint import save_weights

    try:
        save_weights(tensors, out_dir / "model.safetensors", metadata={"format": "pt", "source": source})
    except SafetensorError as e:  # a full disk arrives as this, not as an OSError
        disk = rust_io_error(e)
        if disk is None:
            raise
        raise disk from e
    _write_json(out_dir / "config.json", {**cfg, "torch_dtype": str(dtype).removeprefix("torch.")})
    _write_json(out_dir / "generation_config.json", {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg})


def _write_json(path: Path, data: dict) -> None:
    """Into a directory that ``files.atomic_directory`` moves into place whole, so a plain write suffices."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_into(gguf_path: Path, out_dir: Path, dtype: torch.dtype, on_tensor=None, replace: bool = False,
                 keep_quant: bool = False) -> dict:
    """``convert`` into ``out_dir`` as a whole: refused if it holds anything (files of
    two models would mix) unless ``replace``, and if it is a file or would swallow the
    GGUF itself. Written beside it first, so a failed or interrupted conversion (a full
    disk, Ctrl-C) leaves no half-written model behind."""
    check_destination(gguf_path, out_dir, replace)
    empty = out_dir.is_dir() and not any(out_dir.iterdir())
    with atomic_directory(out_dir, replace=replace or empty) as partial:
        return convert(gguf_path, partial, dtype, on_tensor, keep_quant)


def check_destination(gguf_path: Path, out_dir: Path, replace: bool) -> None:
    """Refuse an output that is not a directory to fill, before minutes of conversion."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmgenError(f"{out_dir} is a file, not a directory: give a directory to write the model into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not replace:
            raise LlmgenError(f"{out_dir} is not empty: converting into it would mix two models (--force replaces it)")
        if gguf_path.resolve().is_relative_to(out_dir.resolve()):
            raise LlmgenError(f"{out_dir} holds {gguf_path.name}: replacing it would delete the file being converted")


def open_gguf(gguf_path: Path):
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({e})") from None


def tensor_count(gguf_path: Path) -> int:
    return len(open_gguf(gguf_path).tensors)
