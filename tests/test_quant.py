"""int8 weights (``llmgen.models.quant``): the rounding is right, each kernel multiplies what
the weights hold, and a whole model's logits stay within a stated distance of float32's,
with greedy output equal wherever float32's margin is wider than that distance."""

import json

import pytest
import torch
import torch.nn.functional as F

from checkpoints import build_gpt2, build_llama
from llmgen.checkpoint import describe, load_checkpoint
from llmgen.cli import main
from llmgen.models import quant
from llmgen.models.quant import Int8Weight, QuantizedEmbedding, QuantizedLinear, quantize_rows

needs_fbgemm = pytest.mark.skipif(quant.kernel() != "fbgemm", reason="this torch build has no working fbgemm int8 product")


def test_rows_round_to_nearest():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row keeps a usable scale
    q, scale = quantize_rows(w)
    assert q.dtype is torch.int8 and q.abs().max() <= 127
    assert torch.equal(q[3], torch.zeros(64, dtype=torch.int8)) and scale[3] == 1
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # never off by more than half a step
    assert torch.equal(q.abs().amax(1)[torch.arange(40) != 3], torch.full((39,), 127, dtype=torch.int8))


def test_reference_kernel_is_the_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(24, 32, generator=gen), torch.randn(24, generator=gen), torch.randn(2, 5, 32, generator=gen)
    weight = Int8Weight(*quantize_rows(w), b, kernel_name="reference")
    assert torch.allclose(weight.linear(x), F.linear(x, weight.dequantize(), b), atol=1e-6)


@needs_fbgemm
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 7, 96), (16, 96)])
def test_fbgemm_matches_the_reference(shape):
    """fbgemm quantizes each call's activations to 8 bits as well, so it agrees with the
    dequantized product to within the activations' rounding: about 1% of the output scale."""
    gen = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(200, 96, generator=gen), torch.randn(200, generator=gen), torch.randn(*shape, generator=gen)
    q, scale = quantize_rows(w)
    got = Int8Weight(q, scale, b, kernel_name="fbgemm").linear(x)
    want = Int8Weight(q, scale, b, kernel_name="reference").linear(x)
    assert got.shape == want.shape == (*shape[:-1], 200)
    assert float((got - want).abs().max()) <= 0.01 * float(want.abs().max())


def test_embedding_rows_are_the_dequantized_rows():
    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    table = Int8Weight.from_float(w)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(QuantizedEmbedding(table)(ids), table.dequantize()[ids])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(float32, int8) pairs of a tiny GPT-2 (tied head) and Llama (untied). The Llama's
    weights are drawn at half the other tests' spread: at 0.3 its layers amplify rounding so
    much that int8 moves its logits by 14% of their spread (3% at 0.15), which says more
    about that random model than about the kernel."""
    out = {}
    for name, build in (("gpt2", build_gpt2), ("llama", build_llama)):
        path = tmp_path_factory.mktemp(name)
        build(path, tokenizer=tokenizer, initializer_range=0.15) if name == "llama" else build(path)
        out[name] = (load_checkpoint(path, dtype="float32"), load_checkpoint(path, dtype="int8"), path)
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_every_weight_matrix_is_int8(models, name):
    dense, int8, _ = models[name]
    kinds = {type(m) for m in int8.model.modules()}
    assert QuantizedLinear in kinds and QuantizedEmbedding in kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert quant.parameter_count(int8.model) == sum(p.numel() for p in dense.model.parameters())
    # a quarter of the bytes, plus a float scale per row and the float norms and positions,
    # which weigh a lot in a model this narrow
    assert quant.weight_bytes(int8.model) < 0.4 * sum(p.numel() * 4 for p in dense.model.parameters())
    assert describe(int8)["weights"].startswith("int8") and describe(dense)["weights"] == "float32"


# The stated tolerance: int8 logits within this fraction of the float32 logits' spread.
LOGIT_TOLERANCE = 0.05


def _logits(ckpt, ids):
    with torch.inference_mode():
        return ckpt.model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logits_within_tolerance_of_float32(models, name):
    dense, int8, _ = models[name]
    ids = dense.encode("I like cold coffee and the water is warm")
    want, got = _logits(dense, ids), _logits(int8, ids)
    spread = float(want.max() - want.min())
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE * spread
    # and the distributions: the KL divergence per position is small
    kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert float(kl.max()) < 0.05


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equal_where_the_margins_allow(models, name):
    """Greedy tokens agree at every step until float32's top-two margin is within the
    int8 error measured at that step; a divergence anywhere else is a bug."""
    dense, int8, _ = models[name]
    ids = dense.encode("I like")
    for _ in range(24):
        want, got = _logits(dense, ids)[-1], _logits(int8, ids)[-1]
        top2 = want.topk(2).values
        if int(got.argmax()) != int(want.argmax()):
            assert float(top2[0] - top2[1]) <= 2 * float((got - want).abs().max())
            break
        ids.append(int(want.argmax()))
    else:
        return
    assert len(ids) > len(dense.encode("I like"))  # at least one step agreed before the margins closed


def test_cli_int8_runs_and_reports(models, capsys):
    _, _, path = models["llama"]
    assert main(["run", "I like", "--model", str(path), "--dtype", "int8", "-n", "5", "-t", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(record["token_ids"]) == 5
    assert main(["info", "--model", str(path), "--dtype", "int8"]) == 0
    assert "weights: int8, one scale per row" in capsys.readouterr().out


def test_int8_is_for_cpu_generation_only(models):
    _, _, path = models["llama"]
    from llmgen.errors import LlmgenError

    with pytest.raises(LlmgenError, match="int8 runs on the CPU"):
        load_checkpoint(path, dtype="int8", trainable=True)
