"""The oneDNN fast path of ``llmgen.models.linear`` against plain ``F.linear``: same
numbers to rounding, same generated tokens, and training left on ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from checkpoints import build_llama
from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.beam import BeamConfig, beam_search
from llmgen.decoding.greedy_sample import Row, generate_batch
from llmgen.models import linear as linear_mod
from llmgen.models.linear import Linear, linear, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN inner product")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 7, 48), (5, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(len(shape) + bias)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(96, 48, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    assert got.shape == (*shape[:-1], 96)
    assert torch.allclose(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_fast_path_taken_only_without_autograd(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def _linear_pointwise(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy())
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1
    layer(x).sum().backward()  # training: F.linear, so gradients exist
    assert len(calls) == 1 and layer.weight.grad is not None
    with torch.no_grad():
        layer(x)  # float32 again: fast path
        layer.to(torch.float64)(x.double())  # any other dtype: F.linear
    assert len(calls) == 2


def _greedy(ckpt, prompts, n=24):
    gen = GenerationConfig(max_new_tokens=n, ignore_eos=True, sampling=SamplingConfig(temperature=0))
    return [s.token_ids for s in generate_batch(ckpt.model, [Row(p, None, n) for p in prompts], gen, ckpt.decode)]


def _beam(ckpt, prompt):
    result = beam_search(ckpt.model, prompt, BeamConfig(width=3, max_new_tokens=12, length_penalty=1.0, num_return=3, tree_top=0))
    return [(h.token_ids, round(h.score, 4)) for h in result.hypotheses]


def _plain(path, monkeypatch):
    """The same checkpoint with oneDNN off: dense weights, every product through F.linear."""
    with monkeypatch.context() as m:
        m.setattr(linear_mod, "onednn_available", lambda: False)
        ckpt = load_checkpoint(path, device="cpu")
    assert not any(p.is_mkldnn for p in ckpt.model.parameters())
    return ckpt


@needs_onednn
def test_same_tokens_with_and_without_onednn_gpt2(gpt2_dir, ckpt, monkeypatch):
    plain = _plain(gpt2_dir[0], monkeypatch)
    prompts = [ckpt.encode(p) for p in ("I like", "The quick brown fox", "Water is")]
    fast_run, plain_run = ((_greedy(c, prompts), [_greedy(c, [p]) for p in prompts], _beam(c, prompts[0]))
                           for c in (ckpt, plain))
    assert any(p.is_mkldnn for p in ckpt.model.parameters())
    assert fast_run == plain_run
    with torch.no_grad():
        fast_logits, plain_logits = (c.model(torch.tensor([prompts[1]])) for c in (ckpt, plain))
    assert torch.allclose(fast_logits, plain_logits, atol=1e-5, rtol=0)


@needs_onednn
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_same_tokens_with_and_without_onednn_llama(tmp_path, kind, monkeypatch):
    build_llama(tmp_path, kind)
    fast, plain = load_checkpoint(tmp_path, device="cpu"), _plain(tmp_path, monkeypatch)
    prompts = [fast.encode("I like"), fast.encode("Once upon a time")]
    assert _greedy(fast, prompts) == _greedy(plain, prompts)
    assert _beam(fast, prompts[1]) == _beam(plain, prompts[1])


@needs_onednn
def test_packing_replaces_projections_only_for_generation(gpt2_dir):
    model = load_checkpoint(gpt2_dir[0], device="cpu").model
    packed = {name for name, p in model.named_parameters() if p.is_mkldnn}
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear)}
    assert packed == linears and "wte.weight" not in packed  # the tied embedding is looked up by row
    trainable = load_checkpoint(gpt2_dir[0], device="cpu", trainable=True).model
    assert not any(p.is_mkldnn for p in trainable.parameters())


def test_switch_off_with_environment(monkeypatch):
    monkeypatch.setenv("LLMGEN_ONEDNN", "0")
    onednn_available.cache_clear()
    try:
        assert onednn_available() is False
    finally:
        monkeypatch.delenv("LLMGEN_ONEDNN")
        onednn_available.cache_clear()
