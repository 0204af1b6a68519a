"""GGUF -> a Hugging Face-layout safetensors directory that ``--model`` loads.

The ``gguf`` package (an optional extra) reads the file and dequantizes every tensor
to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K ...). On top of that
``architectures`` renames llama.cpp's tensors to Hugging Face's and undoes what its
converter did to them, ``vocab`` rebuilds ``tokenizer.json`` as transformers does, and
this module writes the directory: safetensors, ``config.json``, ``generation_config.json``
and ``tokenizer_config.json`` (with the chat template).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from llmgen.convert.architectures import Fields, gguf_config
from llmgen.convert.vocab import gguf_tokenizer
from llmgen.errors import LlmgenError, ModelError


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
) -> dict:
    """Write the converted directory; return its config. ``on_tensor`` is called per tensor (progress)."""
    gguf = require_gguf()
    from llmgen.checkpoint import save_weights

    reader = open_gguf(gguf_path)
    fields = Fields(reader)
    arch, cfg = gguf_config(fields)
    tokenizer, tokens = gguf_tokenizer(fields)
    tensors = {}
    for t in reader.tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(weights.reshape(tuple(int(x) for x in reversed(t.shape))).copy())
        name = arch.hf_name(t.name)
        tensors[name] = arch.restore(name, w, cfg).to(dtype).contiguous()
        if on_tensor is not None:
            on_tensor(t.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out_dir / "model.safetensors", metadata={"format": "pt", "source": gguf_path.name})
    (out_dir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok_cfg = {"chat_template": fields.get("tokenizer.chat_template")}
    for key in ("bos_token_id", "eos_token_id"):
        if key in cfg:
            tok_cfg[key.replace("_id", "")] = tokens[cfg[key]]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    source = {"file": gguf_path.name, "architecture": fields.arch,
              "name": fields.get("general.name"), "license": fields.get("general.license")}
    (out_dir / "source.json").write_text(json.dumps({k: v for k, v in source.items() if v}, indent=2) + "\n")
    return cfg


def convert_into(gguf_path: Path, out_dir: Path, dtype: torch.dtype, on_tensor=None, replace: bool = False) -> dict:
    """``convert`` into ``out_dir`` as a whole: refused if it holds anything (files of
    two models would mix) unless ``replace``; written beside it first, so an interrupted
    conversion leaves no half-written model behind."""
    import shutil

    if out_dir.exists() and not replace and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmgenError(f"{out_dir} is not empty: converting into it would mix two models (--force replaces it)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        cfg = convert(gguf_path, partial, dtype, on_tensor)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    partial.rename(out_dir)
    return cfg


def open_gguf(gguf_path: Path):
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({e})") from None


def tensor_count(gguf_path: Path) -> int:
    return len(open_gguf(gguf_path).tensors)
