"""GGUF -> a Hugging Face-layout safetensors directory that ``--model`` loads.

The ``gguf`` package (an optional extra) reads the file and dequantizes every tensor
to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K ...). On top of that
this module renames llama.cpp's tensors to Hugging Face's, undoes the row permutation
llama.cpp applies to the Q and K projections of llama-architecture models, and rebuilds
``config.json``, ``tokenizer.json`` (byte-level BPE from the vocabulary and merges, as
transformers does), ``generation_config.json`` and ``tokenizer_config.json`` (with the
chat template) from the GGUF metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from llmgen.errors import LlmgenError, ModelError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> model_type
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Pre-tokenizer splits by tokenizer.ggml.pre, where a vocabulary was learned with one
# other than GPT-2's (the same table transformers uses).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LlmgenError("reading GGUF needs the gguf package: pip install 'llmgen[gguf]'") from None
    return gguf


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_tensor_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], ".".join(parts[3:])
        if base not in TENSOR_NAMES:
            raise ModelError(f"GGUF tensor {name!r} has no Hugging Face counterpart llmgen knows")
        return f"model.layers.{layer}.{TENSOR_NAMES[base]}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    if base not in TENSOR_NAMES:
        raise ModelError(f"GGUF tensor {name!r} has no Hugging Face counterpart llmgen knows")
    return f"{TENSOR_NAMES[base]}.{suffix}"


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelError("this GGUF stores llama3 rope frequencies (rope_freqs.weight), which llmgen does not convert yet")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    cfg = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    head_dim = _field(reader, f"{arch}.rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads:
        cfg["head_dim"] = int(head_dim)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelError(f"GGUF rope scaling {scaling!r} is not supported")
    for key in ("bos_token_id", "eos_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key] = int(value)
    return cfg


def gguf_tokenizer(reader):
    """A ``tokenizers`` tokenizer from the GGUF vocabulary: byte-level BPE (``gpt2``) or
    SentencePiece BPE (``llama``: Llama 2, TinyLlama, Mistral)."""
    kind = _field(reader, "tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    if kind not in builders:
        raise ModelError(f"GGUF tokenizer type {kind!r} is not supported (supported: {', '.join(builders)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return builders[kind](reader, tokens), tokens


def _byte_level_bpe(reader, tokens):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes -> GPT-2's printable letters
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        vocab.setdefault(spelled, index)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges))
    split = SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    return tok


def _sentencepiece_bpe(reader, tokens):
    """SentencePiece's BPE as transformers rebuilds it from a GGUF: the merges are
    recovered from the scores (a GGUF stores none), "▁" stands for a space and starts
    the text, bytes missing from the vocabulary fall back to ``<0xNN>`` tokens, and BOS is
    added unless the file says not to."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(tokens)}
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    tok = Tokenizer(models.BPE(vocab, merges_from_scores(tokens, scores), fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    types = _field(reader, "tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", True):
        bos_token = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, int(bos))]
        )
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every way to split a token into
    two tokens of the vocabulary is a merge, ranked by the merged token's score (best
    first), then by the longer left piece, then the longer right one; ties keep
    vocabulary order. This is the order transformers derives, so both tokenize alike."""
    vocab = {token: index for index, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(left, right, score) for left, right in splits]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def convert(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    on_tensor: Callable[[str], None] | None = None,
) -> dict:
    """Write the converted directory; return its config. ``on_tensor`` is called per tensor (progress)."""
    gguf = require_gguf()
    from safetensors.torch import save_file

    reader = open_gguf(gguf_path)
    cfg = gguf_config(reader)
    tokenizer, tokens = gguf_tokenizer(reader)
    permute = cfg["model_type"] == "llama"
    tensors = {}
    for t in reader.tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(weights.reshape(tuple(int(x) for x in reversed(t.shape))).copy())
        name = hf_tensor_name(t.name)
        if permute and name.endswith("self_attn.q_proj.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif permute and name.endswith("self_attn.k_proj.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        tensors[name] = w.to(dtype).contiguous()
        if on_tensor is not None:
            on_tensor(t.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    (out_dir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok_cfg = {"chat_template": _field(reader, "tokenizer.chat_template")}
    for key in ("bos_token_id", "eos_token_id"):
        if key in cfg:
            tok_cfg[key.replace("_id", "")] = tokens[cfg[key]]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    source = {"file": gguf_path.name, "architecture": _field(reader, "general.architecture"),
              "name": _field(reader, "general.name"), "license": _field(reader, "general.license")}
    (out_dir / "source.json").write_text(json.dumps({k: v for k, v in source.items() if v}, indent=2) + "\n")
    return cfg


def open_gguf(gguf_path: Path):
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({e})") from None


def tensor_count(gguf_path: Path) -> int:
    return len(open_gguf(gguf_path).tensors)
