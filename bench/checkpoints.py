"""Random-weight checkpoints of real model shapes for benchmarks, built once and cached.

Weights are random but the shapes (and so the memory traffic and FLOPs) are those of
the real models. The cache lives in $LLMGEN_BENCH_CACHE (default: ~/.cache/llmgen-bench).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmgen.checkpoint import save_checkpoint
from llmgen.models.gpt2 import GPT2, GPT2Config
from llmgen.train import init_weights, train_tokenizer

SHAPES = {
    "gpt2-124m": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
SAMPLE_TEXT = [
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "The quick brown fox jumps over the lazy dog while I like cold coffee.",
] * 50


def cache_dir() -> Path:
    return Path(os.environ.get("LLMGEN_BENCH_CACHE", Path.home() / ".cache" / "llmgen-bench"))


def checkpoint(shape: str) -> Path:
    path = cache_dir() / shape
    if (path / "model.safetensors").is_file():
        return path
    cfg = SHAPES[shape]
    model = GPT2(cfg)
    init_weights(model, cfg.n_layer, seed=0)
    tokenizer = train_tokenizer(SAMPLE_TEXT, 512)
    save_checkpoint(model, tokenizer, path, {"bos_token_id": 0, "eos_token_id": 0})
    return path


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
