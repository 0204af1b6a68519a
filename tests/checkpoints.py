"""Tiny random-weight checkpoints, built at test time with transformers as the writer.

Using transformers' own ``save_pretrained`` proves that we read the files it writes
(tensor names, Conv1D layout, sharding), not just files we wrote ourselves. Weights are
drawn with a large init scale so the next-token distributions are peaked: with the
default 0.02 every distribution is nearly uniform and greedy paths hinge on 1e-7 ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

from llmgen import train

CORPUS = [
    "I like cold coffee and I like hot tea.",
    "The quick brown fox jumps over the lazy dog.",
    "Water is wet; coffee is warm; stop the music when the song ends.",
    "She sells sea shells by the sea shore, and he likes to read books.",
    "Numbers like 12, 345 and 6789 appear in text too. Ünïcödé — naïve café — 日本語.",
] * 4
EOS = train.EOS


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return train.train_tokenizer(CORPUS, vocab_size)


def write_checkpoint(path: Path, model, tok: Tokenizer, eos: int, generation: dict | None = None, **save_kwargs):
    """The model as transformers saves it, plus tokenizer.json and generation_config.json;
    returns the model, the reference the tests compare against."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    tok.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos, **(generation or {})}))
    return model


def build_gpt2(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_positions: int = 128,
    seed: int = 0,
    init_scale: float = 0.3,
    max_shard_size: str | None = None,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    generation_config: dict | None = None,
):
    """Write a GPT-2 checkpoint directory and return the transformers model that wrote it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer or train_tokenizer()
    eos = tok.token_to_id(EOS)
    cfg = GPT2Config(
        vocab_size=vocab_size or tok.get_vocab_size(),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        initializer_range=init_scale,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorm params start at 1/0; perturb them so they are exercised
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    return write_checkpoint(path, model, tok, eos, generation_config, **kwargs)


WORDS = ["<end>", "I", "like", "cold", "coffee", "water", "stop"]


def build_six_word_model(path: Path, seed: int = 0, init_scale: float = 0.25):
    """GPT-2 over {I, like, cold, coffee, water, stop} plus an end token (id 0): small
    enough that every continuation can be enumerated."""
    from tokenizers import pre_tokenizers as pre
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<end>"))
    tok.pre_tokenizer = pre.WhitespaceSplit()
    tok.add_special_tokens(["<end>"])
    cfg = GPT2Config(
        vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, initializer_range=init_scale,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    return write_checkpoint(path, model, tok, 0)


def build_llama(path: Path, kind: str = "llama", *, tokenizer: Tokenizer | None = None, seed: int = 0, **overrides):
    """A tiny Llama-family checkpoint (llama, mistral, qwen2, qwen3, phi3, olmo2, gemma, gemma2, gemma3_text) written by transformers."""
    import transformers

    tok = tokenizer or train_tokenizer()
    eos = tok.token_to_id(EOS)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[kind]
    settings = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False, initializer_range=0.3,
    )
    settings.update(overrides)
    cfg = config_cls(**settings)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return write_checkpoint(path, model, tok, eos)


def build_neox(path: Path, *, tokenizer: Tokenizer | None = None, seed: int = 0, **overrides):
    """A tiny GPT-NeoX (Pythia-style) checkpoint written by transformers."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = tokenizer or train_tokenizer()
    eos = tok.token_to_id(EOS)
    settings = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=False, initializer_range=0.3,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).eval()
    with torch.no_grad():  # LayerNorm weights start at 1 and biases at 0: perturb them so they are exercised
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return write_checkpoint(path, model, tok, eos)


def assert_logits_match(ref, ckpt, prompts: list[str], atol: float = 1e-4) -> None:
    """Our model's logits against the transformers model that wrote the checkpoint."""
    for prompt in prompts:
        ids = torch.tensor([ckpt.encode(prompt)])
        with torch.no_grad():
            expected = ref(ids).logits
        got = ckpt.model(ids)
        assert torch.allclose(got, expected, atol=atol, rtol=0), (prompt, (got - expected).abs().max())


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_chat_model(path: Path, template: str = CHATML):
    """A tiny GPT-2 whose tokenizer knows ChatML's markers, with that chat template."""
    import json

    tok = train_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    model = build_gpt2(path, tokenizer=tok, vocab_size=tok.get_vocab_size())
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return model
