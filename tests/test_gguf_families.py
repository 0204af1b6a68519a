"""GGUFs of every architecture llama.cpp writes for the families llmgen reads: each is
written from a tiny transformers model as llama.cpp's converter would write it, converted
by ``llmgen convert``, and must give that model's logits over a text longer than its
sliding window, with the same architecture features."""

import pytest
import torch

from checkpoints import assert_logits_match, build_gpt2, build_llama, build_neox
from gguf_writer import write_gguf
from llmgen.checkpoint import load_checkpoint
from llmgen.cli import main

LONG = ["The quick brown fox jumps over the lazy dog, and I like cold coffee in the morning"]
GEMMA2 = {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0,
          "final_logit_softcapping": 3.0, "attn_implementation": "eager", "num_hidden_layers": 3,
          "tie_word_embeddings": True}  # llama.cpp writes Gemma 2 and 3 with their (always tied) head left out
CASES = {
    "qwen3-tied-head-dim": ("qwen3", {"tie_word_embeddings": True, "head_dim": 24}),
    "qwen3-untied": ("qwen3", {"num_key_value_heads": 4}),
    "phi3-partial-rotary-window": ("phi3", {"partial_rotary_factor": 0.75, "sliding_window": 5}),
    "olmo2": ("olmo2", {}),
    "gemma-mqa": ("gemma", {"num_key_value_heads": 1, "tie_word_embeddings": True, "head_dim": 32}),
    # llama.cpp stores no query_pre_attn_scalar: below 27B it is the head size.
    "gemma2-window-softcap": ("gemma2", GEMMA2),
    "gemma3-window-local-rope": ("gemma3_text", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                                                 "num_hidden_layers": 3, "attn_implementation": "eager", "tie_word_embeddings": True,
                                                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "gpt2-learned-positions": ("gpt2", {}),
    "pythia-parallel": ("gpt_neox", {}),
    "neox-serial-full-rotary": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 1.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_gguf_converts_back_to_its_model(case, tmp_path, tokenizer):
    kind, overrides = CASES[case]
    if kind == "gpt_neox":
        ref = build_neox(tmp_path / "hf", tokenizer=tokenizer, **overrides)
    elif kind == "gpt2":
        ref = build_gpt2(tmp_path / "hf", tokenizer=tokenizer, **overrides)
    else:
        ref = build_llama(tmp_path / "hf", kind, tokenizer=tokenizer, **overrides)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    ours, original = load_checkpoint(tmp_path / "out", device="cpu"), load_checkpoint(tmp_path / "hf", device="cpu")
    assert ours.model_type == original.model_type
    assert ours.model.cfg.features == original.model.cfg.features
    window = getattr(ours.model.cfg, "sliding_window", None)
    assert window is None or len(ours.encode(LONG[0])) > 2 * window
    assert_logits_match(ref, ours, LONG)


@pytest.mark.parametrize("kind", ["qwen3", "phi3", "gpt2"])
def test_transformers_reads_these_files_as_llmgen_does(kind, tmp_path, tokenizer):
    """The files above follow llama.cpp's layout, not just ours: transformers, which reads
    llama.cpp's files independently, gets the same logits from them."""
    from transformers import AutoModelForCausalLM

    if kind == "gpt2":  # transformers reads GPT-2's context length into n_ctx, leaving n_positions at its 1024
        ref = build_gpt2(tmp_path / "hf", tokenizer=tokenizer, n_positions=1024)
    else:  # transformers does not read Qwen3's head size from the file; it assumes Qwen3's 128.
        ref = build_llama(tmp_path / "hf", kind, tokenizer=tokenizer, **({"head_dim": 128} if kind == "qwen3" else {}))
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert_logits_match(theirs, load_checkpoint(tmp_path / "out", device="cpu"), LONG)


def test_longrope_gguf_is_refused_by_name(tmp_path, tokenizer, capsys):
    """Phi-3's 128k models store longrope factors as tensors; converting them without the
    scaling would give a model that is quietly wrong past 4k tokens."""
    import gguf

    ref = build_llama(tmp_path / "hf", "phi3", tokenizer=tokenizer)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "long.gguf"), "phi3")
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.add_tensor("rope_factors_long.weight", torch.ones(8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", str(tmp_path / "long.gguf"), str(tmp_path / "out")]) == 1
    assert "longrope" in capsys.readouterr().err


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gpt2_keep_quant_keeps_matrices_in_linear_order_and_positions_as_a_table(qtype, tmp_path, tokenizer):
    """GPT-2's checkpoints store its projections as Conv1D ``[in, out]``; quantized rows
    are stored in ``nn.Linear``'s ``[out, in]`` (a row is what a scale covers), and the
    loader must not turn those. The position table is looked up, never multiplied, so it
    is dequantized. Loaded as float32, every matrix is the GGUF's own dequantized values;
    loaded as stored, the logits are within rounding of those."""
    import gguf
    from safetensors.torch import load_file

    from llmgen.models import quant

    kind = gguf.GGMLQuantizationType[qtype]
    ref = build_gpt2(tmp_path / "hf", tokenizer=tokenizer, n_embd=64, init_scale=0.15)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer, kind)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--keep-quant", "--dtype", "float32"]) == 0
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["transformer.wpe.weight"].is_floating_point() and "transformer.wpe.weight" + quant.SCALE not in stored
    assert not stored["transformer.h.0.mlp.c_fc.weight"].is_floating_point()

    dense = load_checkpoint(tmp_path / "out", device="cpu", dtype="float32", trainable=True)
    values = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
              for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    fc = dense.model.h[0].mlp.c_fc.weight  # nn.Linear's [out, in], as the GGUF stores it
    assert fc.shape == values["blk.0.ffn_up.weight"].shape == (256, 64)
    assert torch.allclose(fc, values["blk.0.ffn_up.weight"], atol=float(fc.abs().max()) / 100)
    assert torch.equal(dense.model.wpe.weight, values["position_embd.weight"])

    kept = load_checkpoint(tmp_path / "out", device="cpu")  # as stored: integer kernels
    assert quant.quantized_weights(kept.model)
    ids = torch.tensor([kept.encode(LONG[0])])
    with torch.inference_mode():
        want, got = dense.model(ids)[0], kept.model(ids)[0]
    assert float((got - want).abs().max()) <= 0.02 * float(want.max() - want.min())
