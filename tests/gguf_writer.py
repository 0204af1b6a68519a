"""GGUF files of tiny transformers models, written the way llama.cpp's
``convert_hf_to_gguf.py`` writes them, for the conversion tests.

Tensor names come from gguf-py's own ``TensorNameMap`` (the table llama.cpp's converter
uses), and the tensors it transforms are transformed here as it does: Llama's Q/K rows
permuted for interleaved rotary, Gemma's norms stored as ``1 + w``, GPT-NeoX's fused
q/k/v regrouped from per-head to all-q/all-k/all-v. The metadata keys are the ones each
of its model classes writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GGUF_ARCH = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3", "phi3": "phi3", "olmo2": "olmo2", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt_neox": "gptneox"}


def _permute(t, heads):
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _by_kind(t, heads):
    """GPT-NeoX's (heads, 3, head_dim) rows -> all q, all k, all v (llama.cpp's layout)."""
    return t.reshape(heads, 3, t.shape[0] // 3 // heads, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)


def _metadata(w, cfg, arch: str) -> None:
    c = cfg.to_dict()
    if arch == "gpt2":
        w.add_block_count(c["n_layer"])
        w.add_context_length(c["n_positions"])
        w.add_embedding_length(c["n_embd"])
        w.add_feed_forward_length(c.get("n_inner") or 4 * c["n_embd"])
        w.add_head_count(c["n_head"])
        w.add_layer_norm_eps(c["layer_norm_epsilon"])
        return
    layers = c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    w.add_block_count(layers)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    if arch == "gptneox":
        head_dim = c["hidden_size"] // heads
        rope = c.get("rope_parameters") or {}
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", c.get("rotary_pct", 1.0)) * head_dim))
        w.add_parallel_residual(c["use_parallel_residual"])
        w.add_layer_norm_eps(c["layer_norm_eps"])
        return
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    rope = c.get("rope_parameters") or {}
    theta = rope.get("full_attention", rope).get("rope_theta", c.get("rope_theta"))
    if theta:
        w.add_rope_freq_base(theta)
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    elif arch == "phi3":
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) * head_dim))
        if c.get("sliding_window"):
            w.add_sliding_window(c["sliding_window"])
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])
    if arch == "gemma3":
        w.add_sliding_window(c["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])


def _vocabulary(w, tokenizer, sentencepiece, extra_pieces) -> None:
    if sentencepiece is None:
        model = json.loads(tokenizer.to_str())["model"]
        tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens + list(extra_pieces))
        w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens] + [5] * len(extra_pieces))  # 5: unused
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_pad_token_id(0)
        return
    sp = sentencepiece
    pieces = range(sp.get_piece_size())
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in pieces] + list(extra_pieces))
    w.add_token_scores([sp.get_score(i) for i in pieces] + [-1e4] * len(extra_pieces))
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in pieces]
                      + [1] * len(extra_pieces))
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(sp.eos_id())
    w.add_add_bos_token(True)


def write_gguf(path: Path, ref, tokenizer=None, qtype=None, sentencepiece=None, extra_pieces=()) -> None:
    """A GGUF of transformers model ``ref`` as llama.cpp writes one, matrices stored as
    ``qtype`` (default F32). The vocabulary is ``tokenizer``'s byte-level BPE, or with
    ``sentencepiece`` (a processor) that one's pieces, scores and piece types, as
    llama.cpp stores a Llama 2 or Gemma vocabulary; ``extra_pieces`` are appended as
    written (Gemma stores its runs of spaces as real spaces; a byte-level BPE vocabulary
    smaller than the model's embedding is padded with them as unused tokens)."""
    import gguf

    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32
    cfg = ref.config
    arch = GGUF_ARCH[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, cfg, arch)
    _vocabulary(w, tokenizer, sentencepiece, extra_pieces)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in ref.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 checkpoints' causal-mask buffers
        if name in ("lm_head.weight", "embed_out.weight") and cfg.tie_word_embeddings:
            continue  # written once, as the embedding
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        data = tensor.detach().float().numpy()
        if arch == "gpt2" and data.ndim == 2 and gname.startswith("blk."):
            data = data.T  # GPT-2's Conv1D stores [in, out]
        if arch == "llama" and gname.endswith("attn_q.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and gname.endswith("norm.weight"):
            data = data + 1
        elif arch == "gptneox" and ".attn_qkv." in gname:
            data = _by_kind(data, cfg.num_attention_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rewrite_gguf(src: Path, dst: Path, fields: dict | None = None, drop=(), tensors=None) -> None:
    """A copy of the GGUF ``src`` with metadata changed, for files no converter would
    write: ``fields`` maps a key to a value, or to ``(value, GGUFValueType)`` to store it
    as that type (an int otherwise goes in as UINT32); keys in ``drop`` are left out;
    ``tensors``, given the ``{name: numpy array}`` of the file, returns those to write."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    fields = dict(fields or {})
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop or f.name in fields:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for key, value in fields.items():
        value, kind = value if isinstance(value, tuple) else (value, None)
        if kind is None:
            kind = gguf.GGUFValueType.get_type(value)
            kind = gguf.GGUFValueType.UINT32 if kind == gguf.GGUFValueType.INT32 else kind
        sub = gguf.GGUFValueType.get_type(value[0]) if isinstance(value, list) and value else None
        w.add_key_value(key, value, kind, sub_type=sub)
    arrays = {t.name: t.data.copy() for t in reader.tensors}  # F32 files: the arrays are the values
    for name, data in (tensors(arrays) if tensors else arrays).items():
        w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
