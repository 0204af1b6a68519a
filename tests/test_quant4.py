"""Q4_0 blocks (``llmgen.models.quant4``): llama.cpp's rounding bit for bit, a GGUF's Q4_0
tensor kept and used as it is, the kernel multiplying exactly what the blocks hold (up
to its bfloat16 rounding of input, scales and output), and whole models within a
stated distance of float32."""

import json

import pytest
import torch

from checkpoints import build_gpt2, build_llama
from llmgen.checkpoint import describe, load_checkpoint
from llmgen.cli import main
from llmgen.models import quant, quant4
from llmgen.models.quant4 import Int4Weight

gguf = pytest.importorskip("gguf")
needs_aten = pytest.mark.skipif(quant4.kernel() != "aten", reason="this torch build has no working int4 CPU product")
Q4_0 = gguf.GGMLQuantizationType.Q4_0


def _gguf_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, dequantized values) of ``w`` quantized by gguf-py, which follows
    llama.cpp's quantize_row_q4_0_ref."""
    raw = gguf.quants.quantize(w.numpy(), Q4_0)
    codes, scales = quant4.gguf_q4_0(raw, *w.shape)
    return codes, scales, torch.from_numpy(gguf.quants.dequantize(raw, Q4_0))


def test_rounding_is_llama_cpps():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[5, 32:64] = 0  # an all-zero block
    codes, scales, values = _gguf_blocks(w)
    mine_codes, mine_scales = quant4.quantize_blocks(w)
    assert torch.equal(mine_codes, codes) and torch.equal(mine_scales, scales)
    assert torch.equal(quant4.dequantize_blocks(codes, scales), values)
    assert torch.equal(quant4.unpack_codes(quant4.pack_codes(codes)), codes)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


@needs_aten
@pytest.mark.parametrize("rows", [64, 50])  # 50: padded to the kernel's 16-row multiple
@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 96), (40, 96)])
def test_a_gguf_q4_0_tensor_used_directly(rows, shape):
    """The kernel on the GGUF's own blocks gives what its dequantized tensor times x gives:
    exactly, but for rounding x and the scales to bfloat16 on the way in (reproduced in
    float64 here) and the output on the way out (half a bfloat16 step, 2^-9 relative)."""
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(rows, 96, generator=gen), torch.randn(rows, generator=gen), torch.randn(*shape, generator=gen)
    codes, scales, values = _gguf_blocks(w)
    weight = Int4Weight(codes, scales, b, kernel_name="aten")
    got = weight.linear(x)
    assert got.shape == (*shape[:-1], rows) and got.dtype is torch.float32
    blocks = (codes.double() - 8).reshape(rows, 3, 32) * _bf16(scales)[..., None]
    want = _bf16(x) @ blocks.reshape(rows, 96).T
    assert torch.allclose(got.double() - b.double(), want, rtol=2**-8, atol=1e-3)
    # and against the GGUF's dequantized tensor in full precision: the bfloat16 roundings
    # cost well under 1% of the output's scale
    exact = x.double() @ values.double().T + b.double()
    assert float((got.double() - exact).abs().max()) < 0.01 * float(exact.abs().max())


def test_reference_kernel_and_lookups_are_the_dequantized_matrix():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    weight = Int4Weight(*quant4.quantize_blocks(w), None, kernel_name="reference")
    x = torch.randn(2, 64)
    assert torch.allclose(weight.linear(x), x @ weight.dequantize().T, atol=1e-5)
    ids = torch.tensor([[0, 39], [7, 7]])
    assert torch.equal(quant.QuantizedEmbedding(weight)(ids), weight.dequantize()[ids])
    # Q4_0's own rounding: half a step from the weights, but a whole one where a weight of
    # the peak's opposite sign would need code 16 (the peak is -8 d, and codes stop at 15)
    step = weight.scale.float().abs().repeat_interleave(32, 1)
    err = (weight.dequantize() - w).abs()
    assert bool((err <= step + 1e-6).all())
    assert bool((err[err > step / 2 + 1e-6] >= 0).all()) and float((err <= step / 2 + 1e-6).float().mean()) > 0.95


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(float32, int4) pairs of a tiny GPT-2 (tied, 32 wide: one block a row, the head's
    rows padded to 16) and a Llama (untied, 64 wide)."""
    out = {}
    for name in ("gpt2", "llama"):
        path = tmp_path_factory.mktemp(name)
        build_llama(path, tokenizer=tokenizer, initializer_range=0.15) if name == "llama" else build_gpt2(path)
        out[name] = (load_checkpoint(path, dtype="float32"), load_checkpoint(path, dtype="int4"), path)
    return out


# 4 bits a weight cost these random tiny models (measured: the reference kernel, which
# multiplies the dequantized blocks in float32, gives the same): logits move by up to 13%
# (GPT-2) and 27% (Llama) of their spread, against 1.3% and 3% for int8 rows. The kernel
# itself may add only its bfloat16 roundings on top.
LOGIT_TOLERANCE = {"gpt2": 0.2, "llama": 0.35}
KERNEL_TOLERANCE = 0.01


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_every_matrix_is_q4_0_and_logits_stay_close(models, name, monkeypatch):
    dense, int4, path = models[name]
    held = quant.quantized_weights(int4.model)
    assert held and all(isinstance(w, Int4Weight) for w in held)
    assert not any(isinstance(m, torch.nn.Linear) for m in int4.model.modules())
    assert quant.parameter_count(int4.model) == sum(p.numel() for p in dense.model.parameters())
    assert describe(int4)["weights"].startswith("Q4_0, one scale per 32 weights")
    monkeypatch.setenv("LLMGEN_INT4_KERNEL", "reference")
    quant4.kernel.cache_clear()
    try:
        reference = load_checkpoint(path, dtype="int4")
    finally:
        quant4.kernel.cache_clear()
    assert all(w.kernel == "reference" for w in quant.quantized_weights(reference.model))
    ids = torch.tensor([dense.encode("I like cold coffee and the water is warm")])
    with torch.inference_mode():
        want, got, blocks = dense.model(ids)[0], int4.model(ids)[0], reference.model(ids)[0]
    spread = float(want.max() - want.min())
    assert float((got - blocks).abs().max()) <= KERNEL_TOLERANCE * spread
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE[name] * spread


def test_int4_falls_back_to_int8_rows_where_a_width_is_no_multiple_of_32(tmp_path, tokenizer):
    build_gpt2(tmp_path, n_embd=48)  # 48 wide: no Q4_0 blocks; the 192-wide MLP output still fits
    int4 = load_checkpoint(tmp_path, dtype="int4")
    kinds = {type(w) for w in quant.quantized_weights(int4.model)}
    assert kinds == {Int4Weight, quant.Int8Weight}
    assert " + " in describe(int4)["weights"]


def test_keep_quant_keeps_q4_0_blocks_bit_for_bit(tmp_path, tokenizer):
    """A Q4_0 GGUF converted with --keep-quant holds the file's own codes and scales, in
    the rows' restored order (Llama's q/k permutation undone), loads as Q4_0 by default on
    CPU, and as exactly the GGUF's dequantized values in float32."""
    from safetensors.torch import load_file

    from gguf_writer import write_gguf

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer, hidden_size=64, intermediate_size=128,
                      initializer_range=0.15)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer, Q4_0)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--keep-quant"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": quant.METHOD, "formats": ["q4_0 blocks"], "turned": True}
    stored = load_file(tmp_path / "out" / "model.safetensors")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    # the q projection as the file holds it (rows permuted by llama.cpp's converter) ...
    raw = tensors["blk.0.attn_q.weight"]
    codes, scales = quant4.gguf_q4_0(raw.data, 64, 64)
    # ... and as stored: the same blocks, rows back in transformers' order
    from llmgen.convert.architectures import unpermute

    heads = ref.config.num_attention_heads
    got_codes = quant4.unpack_codes(stored["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(got_codes, unpermute(codes.float(), heads).to(torch.uint8))
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight_scale"], unpermute(scales.float(), heads).half())
    for name, tensor in ref.state_dict().items():
        if tensor.ndim == 2:
            assert stored[name].dtype is torch.uint8 and stored[name + quant.SCALE].dtype is torch.float16, name

    q4 = load_checkpoint(tmp_path / "out", device="cpu")  # auto: as stored
    assert all(isinstance(w, Int4Weight) for w in quant.quantized_weights(q4.model))
    dense = load_checkpoint(tmp_path / "out", device="cpu", dtype="float32", trainable=True)
    want = torch.from_numpy(gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, Q4_0))
    assert torch.equal(dense.model.layers[0].mlp.down_proj.weight, want)
    ids = torch.tensor([q4.encode("I like cold coffee")])
    with torch.inference_mode():
        want, got = dense.model(ids)[0], q4.model(ids)[0]
    assert float((got - want).abs().max()) <= 0.01 * float(want.max() - want.min())  # same weights: bfloat16 rounding only
    as_int8 = load_checkpoint(tmp_path / "out", device="cpu", dtype="int8")
    assert all(isinstance(w, quant.Int8Weight) for w in quant.quantized_weights(as_int8.model))


def test_cli_int4_runs_and_reports(models, capsys):
    _, _, path = models["llama"]
    assert main(["run", "I like", "--model", str(path), "--dtype", "int4", "-n", "5", "-t", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"]) == 5
    assert main(["info", "--model", str(path), "--dtype", "int4"]) == 0
    assert "weights: Q4_0, one scale per 32 weights" in capsys.readouterr().out
    assert main(["run", "I like", "--model", str(path), "--dtype", "int4", "--device", "cpu", "-n", "1"]) == 0
