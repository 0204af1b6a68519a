"""Random-weight checkpoints of real model shapes for benchmarks, built once and cached.

Weights are random but the shapes (and so the memory traffic and FLOPs) are those of
the real models. The cache lives in $LLMGEN_BENCH_CACHE (default: ~/.cache/llmgen-bench).
The GPT-2 shape is written by llmgen itself; the others by transformers, which the
benchmarks need anyway as the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmgen.checkpoint import save_checkpoint
from llmgen.models.gpt2 import GPT2, GPT2Config
from llmgen.train import init_weights, train_tokenizer

GPT2_SHAPES = {
    "gpt2-124m": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # Only for the smoke test that keeps the scripts working (tests/test_bench.py).
    "gpt2-tiny": GPT2Config(vocab_size=512, n_positions=1024, n_embd=32, n_layer=2, n_head=2),
}
# shape -> (transformers config class, model class, the real model's config arguments)
HF_SHAPES = {
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )),
    # EleutherAI/pythia-160m
    "pythia-160m": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, layer_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )),
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )),
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )),
    "neox-tiny": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
    )),
}
SHAPES = [*GPT2_SHAPES, *HF_SHAPES]
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
    tokenizer = train_tokenizer(SAMPLE_TEXT, 512)
    if shape in GPT2_SHAPES:
        cfg = GPT2_SHAPES[shape]
        model = GPT2(cfg)
        init_weights(model, cfg.n_layer, seed=0)
        save_checkpoint(model, tokenizer, path, {"bos_token_id": 0, "eos_token_id": 0})
        return path
    import transformers

    config_cls, model_cls, kwargs = HF_SHAPES[shape]
    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
