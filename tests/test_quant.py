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


def test_hadamard_blocks_are_orthonormal_and_their_own_inverse():
    for n in quant.BLOCKS:
        h = quant.hadamard(n)
        assert torch.allclose(h @ h, torch.eye(n), atol=1e-6) and torch.equal(h, h.T)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(quant.turn(quant.turn(x, 64), 64), x, atol=1e-5)
    assert quant.turn_block(576) == 64 and quant.turn_block(96) == 32 and quant.turn_block(48) == 16
    assert quant.turn_block(50) is None


@pytest.mark.parametrize("width", [64, 48, 50])
def test_turned_rows_stand_for_the_weight(width):
    """Rounding w H and turning back moves each weight by at most the row's rounding
    spread over its block: sqrt(block) half-steps (none turned when the width is odd)."""
    w = torch.randn(30, width, generator=torch.Generator().manual_seed(6))
    w[:, 3] *= 40  # an outlier column, as models have
    weight = Int8Weight.from_float(w, kernel_name="reference")
    block = quant.turn_block(width)
    assert weight.turned == block
    bound = (block or 1) ** 0.5 * weight.scale[:, None] / 2 + 1e-6
    assert bool(((weight.dequantize() - w).abs() <= bound).all())
    ids = torch.tensor([0, 29, 7])
    assert torch.allclose(weight.rows(ids), weight.dequantize()[ids], atol=1e-6)


@needs_fbgemm
def test_turning_makes_outlier_inputs_cheap():
    """An input with one huge channel, as a model's residual stream has: what fbgemm's
    one scale per input row adds to the weights' own rounding (its product against the
    same int8 rows multiplied in float) is several times smaller once the input is turned."""
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(256, 128, generator=gen) * 0.05, torch.randn(1, 128, generator=gen)
    x[0, 5] = 300.0
    q, scale = quantize_rows(w)

    def added(weight):
        return float((weight.linear(x) - x @ weight.dequantize().T).abs().mean())

    plain, turned = Int8Weight(q, scale, None, kernel_name="fbgemm"), Int8Weight.from_float(w, kernel_name="fbgemm")
    assert plain.turned is None and turned.turned == 64
    assert added(turned) * 3 < added(plain)


@needs_fbgemm
def test_rows_unlike_in_size_are_quantized_apart():
    """A row with huge values (a prompt's first token) must not set the scale for the
    rest: rows are grouped by the power of two of their peak, and each group gets exactly
    what it would get alone, so the huge row's neighbours keep their precision."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(64, 128, generator=gen)
    weight = Int8Weight.from_float(w, kernel_name="fbgemm")
    x = torch.randn(1, 6, 128, generator=gen)
    x = x / x.abs().amax(-1, keepdim=True) * 1.5  # every peak 1.5: one group
    x[0, 0] *= 100  # the sink: a group of its own
    x[0, 4] *= 2.1  # peak 3.15: another
    together = weight.linear(x)
    assert torch.equal(together[0, 0], weight.linear(x[:, :1])[0, 0])
    assert torch.equal(together[0, 4], weight.linear(x[:, 4:5])[0, 0])
    rest = [1, 2, 3, 5]
    assert torch.equal(together[0, rest], weight.linear(x[:, rest])[0])
    # the sink costs the others nothing: as close to the float product as without it
    want = x[0, rest] @ w.T
    assert float((together[0, rest] - want).abs().max()) < 0.05 * float(want.abs().max())
    alone = torch.randn(1, 128, generator=gen) * 3
    assert torch.equal(weight.linear(alone), weight.linear(alone[None])[0])


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
    # A quarter of the bytes per copy, plus a float scale per row and the float norms and
    # positions, which weigh a lot in a model this narrow; a tied table is held twice
    # (plain rows for the lookup, packed for the head), an untied model's matrices once.
    float_bytes = sum(p.numel() * 4 for p in dense.model.parameters())
    assert quant.weight_bytes(int8.model) < (0.5 if name == "gpt2" else 0.35) * float_bytes
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


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_keep_quant_stores_int8_rows_of_the_gguf_weights(tmp_path, tokenizer, qtype):
    """convert --keep-quant: every quantized GGUF matrix but Q4_0's (kept as blocks:
    test_quant4.py) becomes int8 rows within half a
    row step of the GGUF's own dequantized values (so the int8 product equals the GGUF
    tensor's product with x to within half a step per weight); float tensors stay float;
    the directory loads as int8 by default on CPU, and exactly as its rows in float32."""
    import gguf
    from safetensors.torch import load_file

    from gguf_writer import write_gguf

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer, hidden_size=64, intermediate_size=128,
                      initializer_range=0.15)
    kind = gguf.GGMLQuantizationType[qtype]
    write_gguf(tmp_path / "m.gguf", ref, tokenizer, kind)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--keep-quant"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == quant.METHOD
    stored = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in ref.state_dict().items():
        if tensor.ndim != 2:
            assert stored[name].is_floating_point() and name + quant.SCALE not in stored
            continue
        gguf_values = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensor.float().numpy(), kind), kind))
        q, scale = stored[name], stored[name + quant.SCALE]
        assert q.dtype is torch.int8 and scale.dtype is torch.float32 and scale.shape == (q.shape[0],)
        # stored turned (w H, rounded once, as the kernel multiplies it): half a row step
        # from the GGUF's values turned, and so sqrt(block) half-steps from them turned back
        block = quant.turn_block(q.shape[1])
        turned = quant.turn(gguf_values, block)
        assert bool(((q.float() * scale[:, None] - turned).abs() <= scale[:, None] / 2 + 1e-5).all()), name
        held = quant.AtRest(name, q, scale, block)
        bound = block**0.5 * scale[:, None] / 2 + 1e-5
        assert bool(((held.dequantize() - gguf_values).abs() <= bound).all()), name
        if name.endswith("mlp.down_proj.weight"):  # one product in full: the turned row's bound, summed
            x = torch.randn(3, q.shape[1], generator=torch.Generator().manual_seed(5))
            got = Int8Weight(q, scale, None, kernel_name="reference", turned=block).linear(x)
            assert bool(((got - x @ gguf_values.T).abs() <= (quant.turn(x, block).abs().sum(1, keepdim=True) * scale / 2)
                         + 1e-4).all())

    int8 = load_checkpoint(tmp_path / "out", device="cpu")  # auto: int8, as stored
    assert describe(int8)["weights"].startswith("int8")
    dense = load_checkpoint(tmp_path / "out", device="cpu", dtype="float32", trainable=True)
    down = dense.model.layers[0].mlp.down_proj.weight
    q, scale = stored["model.layers.0.mlp.down_proj.weight"], stored["model.layers.0.mlp.down_proj.weight_scale"]
    assert config["quantization_config"]["turned"] is True
    assert torch.equal(down, quant.turn(q.float() * scale[:, None], quant.turn_block(q.shape[1])))
    # loaded as stored: the kernel's rows are the file's, not rounded again
    assert torch.equal(int8.model.layers[0].mlp.down_proj.quantized.q, q)
    ids = torch.tensor([int8.encode("I like cold coffee")])
    with torch.inference_mode():
        want, got = dense.model(ids)[0], int8.model(ids)[0]
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE * float(want.max() - want.min())


def test_keep_quant_checkpoints_refuse_unpaired_scales(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from gguf_writer import write_gguf

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer)
    import gguf

    write_gguf(tmp_path / "m.gguf", ref, tokenizer, gguf.GGMLQuantizationType.Q8_0)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--keep-quant"]) == 0
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    from llmgen.errors import ModelError

    with pytest.raises(ModelError, match="o_proj.weight_scale"):
        load_checkpoint(tmp_path / "out", device="cpu")
