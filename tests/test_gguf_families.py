"""GGUFs of every architecture llama.cpp writes for the families llmgen reads: each is
written from a tiny transformers model as llama.cpp's converter would write it, converted
by ``llmgen convert``, and must give that model's logits over a text longer than its
sliding window, with the same architecture features."""

import pytest
import torch

from checkpoints import assert_logits_match, build_llama, build_neox
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
    "pythia-parallel": ("gpt_neox", {}),
    "neox-serial-full-rotary": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 1.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_gguf_converts_back_to_its_model(case, tmp_path, tokenizer):
    kind, overrides = CASES[case]
    if kind == "gpt_neox":
        ref = build_neox(tmp_path / "hf", tokenizer=tokenizer, **overrides)
    else:
        ref = build_llama(tmp_path / "hf", kind, tokenizer=tokenizer, **overrides)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    ours, original = load_checkpoint(tmp_path / "out", device="cpu"), load_checkpoint(tmp_path / "hf", device="cpu")
    assert ours.model_type == original.model_type
    assert ours.model.cfg.features == original.model.cfg.features
    window = ours.model.cfg.sliding_window
    assert window is None or len(ours.encode(LONG[0])) > 2 * window
    assert_logits_match(ref, ours, LONG)


@pytest.mark.parametrize("kind", ["qwen3", "phi3"])
def test_transformers_reads_these_files_as_llmgen_does(kind, tmp_path, tokenizer):
    """The files above follow llama.cpp's layout, not just ours: transformers, which reads
    llama.cpp's files independently, gets the same logits from them."""
    from transformers import AutoModelForCausalLM

    # transformers does not read Qwen3's head size from the file; it assumes Qwen3's 128.
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
