"""Our GPT-2 against transformers' GPT2LMHeadModel on the same random weights."""

import pytest
import torch

from checkpoints import build_gpt2
from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.greedy_sample import generate

PROMPTS = ["I like", "The quick brown fox", "Water is", "12, 345 and", "naïve café 日本"]


def _logits_close(ours, ref, prompts, encode):
    for prompt in prompts:
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad():
            expected = ref(ids).logits
        got = ours(ids)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (prompt, (got - expected).abs().max())


def test_logits_match_transformers(gpt2_dir, ckpt):
    _logits_close(ckpt.model, gpt2_dir[1], PROMPTS, ckpt.encode)


@pytest.mark.parametrize(
    "options",
    [
        {"n_layer": 3, "n_embd": 48, "n_head": 6, "max_shard_size": "40KB"},  # sharded safetensors + index
        {"n_layer": 1, "n_embd": 16, "n_head": 1, "seed": 7},
    ],
)
def test_logits_match_other_shapes(tmp_path, tokenizer, options):
    ref = build_gpt2(tmp_path, tokenizer=tokenizer, **options)
    if "max_shard_size" in options:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = load_checkpoint(tmp_path, device="cpu")
    _logits_close(ckpt.model, ref, PROMPTS, ckpt.encode)


def test_untied_lm_head(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    build_gpt2(tmp_path, tokenizer=tokenizer)
    cfg = GPT2Config.from_pretrained(tmp_path)
    cfg.tie_word_embeddings = False
    torch.manual_seed(3)
    ref = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        ref.lm_head.weight.normal_(0, 0.3)
    ref.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path, device="cpu")
    _logits_close(ckpt.model, ref, PROMPTS[:2], ckpt.encode)


def test_greedy_continuations_match_transformers(gpt2_dir, ckpt):
    ref = gpt2_dir[1]
    gen = GenerationConfig(max_new_tokens=32, ignore_eos=True, sampling=SamplingConfig(temperature=0))
    for prompt in PROMPTS:
        ids = ckpt.encode(prompt)
        ours = generate(ckpt.model, ids, gen, ckpt.decode)[0].token_ids
        theirs = ref.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
        assert ours == theirs, prompt


def test_kv_cache_matches_full_forward(ckpt):
    ids = torch.tensor([ckpt.encode("The quick brown fox jumps over the lazy dog")])
    model = ckpt.model
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        pieces = [model(ids[:, :3], None, cache)]
        pieces += [model(ids[:, i : i + 1], None, cache) for i in range(3, ids.shape[1])]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_matches_single_rows(ckpt):
    """The cache's padding mask and mask-derived positions make padding invisible."""
    from llmgen.cache import positions_from_mask

    model = ckpt.model
    rows = [ckpt.encode(p) for p in ["I like", "The quick brown fox jumps"]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        cache = model.new_cache(2, width + 1)
        cache.set_padding(mask)
        batched = model(ids, positions_from_mask(mask), cache)[:, -1]
        for i, r in enumerate(rows):
            single = model(torch.tensor([r]))[0, -1]
            assert torch.allclose(batched[i], single, atol=1e-5, rtol=0)
