"""What each llama.cpp architecture writes, read back as transformers' layout.

A GGUF names tensors its own way (``blk.3.attn_q``), stores a few of them transformed
(Llama's Q/K rows permuted for interleaved rotary, Gemma's norms as ``1 + w``, GPT-NeoX's
fused q/k/v regrouped), and keeps the hyperparameters under ``{arch}.*`` keys, leaving
out some that llama.cpp derives from the model size. Each ``Arch`` below undoes one
architecture's choices so that the directory written loads through the same family
readers as a checkpoint downloaded in the Hugging Face layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmgen.errors import ModelError

LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_LAYER = {
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
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
POST_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
SANDWICH = {**POST_NORMS, "ffn_norm": "pre_feedforward_layernorm"}  # Gemma 2/3: four norms a layer


class Fields:
    """``{arch}.*`` metadata of one file, read with defaults."""

    def __init__(self, reader):
        self.reader = reader
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_key(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)


@dataclass(frozen=True)
class Arch:
    model_type: str
    layer: dict = field(default_factory=dict)  # additions to / replacements of LLAMA_LAYER
    top: dict = field(default_factory=lambda: LLAMA_TOP)
    prefix: str = "model.layers"
    norm_offset: float = 0.0  # stored norm weight = HF weight + offset
    permuted_qk: bool = False  # Q/K rows interleaved for llama.cpp's rotary (Llama only)
    qkv_by_kind: bool = False  # fused q/k/v stored as all q, all k, all v (GPT-NeoX)
    config: Callable[[Fields, dict], dict] | None = None  # family keys on top of the shared ones
    base_layer: dict = field(default_factory=lambda: LLAMA_LAYER)

    def hf_name(self, name: str) -> str:
        """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
        parts = name.split(".")
        layers = {**self.base_layer, **self.layer}
        if parts[0] == "blk" and parts[2] in layers:
            return f"{self.prefix}.{parts[1]}.{layers[parts[2]]}.{'.'.join(parts[3:])}"
        if parts[0] in self.top:
            return f"{self.top[parts[0]]}.{'.'.join(parts[1:])}"
        raise ModelError(f"GGUF tensor {name!r} has no Hugging Face counterpart llmgen knows for {self.model_type}")

    def restore(self, name: str, w: torch.Tensor, cfg: dict) -> torch.Tensor:
        """Undo what llama.cpp's converter did to this tensor (``name`` is the HF name)."""
        if self.norm_offset and name.endswith("norm.weight"):
            return w - self.norm_offset
        if self.permuted_qk and name.endswith("self_attn.q_proj.weight"):
            return unpermute(w, cfg["num_attention_heads"])
        if self.permuted_qk and name.endswith("self_attn.k_proj.weight"):
            return unpermute(w, cfg["num_key_value_heads"])
        if self.qkv_by_kind and ".attention.query_key_value." in name:
            return interleave_qkv(w, cfg["num_attention_heads"])
        return w


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleave_qkv(w: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-NeoX keeps q, k and v per head (``heads, 3, head_dim``); llama.cpp stores all
    of q, then k, then v. Put them back per head."""
    return w.reshape(3, heads, w.shape[0] // 3 // heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _head_dim(f: Fields, cfg: dict) -> int:
    return int(f.arch_key("attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"]))


def _qwen3(f: Fields, cfg: dict) -> dict:
    return {"head_dim": _head_dim(f, cfg)}


def _phi3(f: Fields, cfg: dict) -> dict:
    """The rotated fraction comes as a dimension count; the window is on every layer."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    out = {"partial_rotary_factor": int(f.arch_key("rope.dimension_count", head_dim)) / head_dim}
    window = f.arch_key("attention.sliding_window")
    out["sliding_window"] = int(window) if window else None
    return out


def _gemma(f: Fields, cfg: dict) -> dict:
    return {"head_dim": _head_dim(f, cfg), "hidden_activation": "gelu_pytorch_tanh"}


def _query_scalar(cfg: dict, head_dim: int, large_layers: int) -> float:
    """llama.cpp does not store ``query_pre_attn_scalar``: it scales by the head size,
    except on the 27B models (told apart by their layer count), which use hidden/heads."""
    if cfg["num_hidden_layers"] == large_layers:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return head_dim


def _gemma2(f: Fields, cfg: dict) -> dict:
    out = _gemma(f, cfg)
    return {
        **out,
        "attn_logit_softcapping": f.arch_key("attn_logit_softcapping"),
        "final_logit_softcapping": f.arch_key("final_logit_softcapping"),
        "sliding_window": int(f.arch_key("attention.sliding_window", 4096)),
        "query_pre_attn_scalar": _query_scalar(cfg, out["head_dim"], large_layers=46),
    }


def _gemma3(f: Fields, cfg: dict) -> dict:
    """Gemma 3's sliding layers rotate with base 10000, which llama.cpp fixes rather than
    stores; newer files give the per-layer window pattern, older ones imply 5 of every 6."""
    out = _gemma(f, cfg)
    pattern = f.arch_key("attention.sliding_window_pattern")
    layers = cfg["num_hidden_layers"]
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        every = int(pattern) if pattern else 6
        sliding = [(i + 1) % every != 0 for i in range(layers)]
    return {
        **out,
        "sliding_window": int(f.arch_key("attention.sliding_window", 512)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": _query_scalar(cfg, out["head_dim"], large_layers=62),
        "final_logit_softcapping": f.arch_key("final_logit_softcapping"),
    }


def _neox(f: Fields, cfg: dict) -> dict:
    """Pythia's own key names; LayerNorm with biases, an untied head."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return {
        "rotary_pct": int(f.arch_key("rope.dimension_count", head_dim)) / head_dim,
        "rotary_emb_base": cfg.pop("rope_theta"),
        "use_parallel_residual": bool(f.arch_key("use_parallel_residual", True)),
        "layer_norm_eps": float(f.arch_key("attention.layer_norm_epsilon", 1e-5)),
        "hidden_act": "gelu",
    }


NEOX_TOP = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"}
NEOX_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "attention.query_key_value",
    "attn_output": "attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}

ARCHS = {  # GGUF general.architecture -> how to read it
    "llama": Arch("llama", permuted_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", layer=QK_NORMS, config=_qwen3),
    "phi3": Arch("phi3", layer={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}, config=_phi3),
    "olmo2": Arch("olmo2", layer={**QK_NORMS, **POST_NORMS}),
    "gemma": Arch("gemma", norm_offset=1.0, config=_gemma),
    "gemma2": Arch("gemma2", layer=SANDWICH, norm_offset=1.0, config=_gemma2),
    "gemma3": Arch("gemma3_text", layer={**SANDWICH, **QK_NORMS}, norm_offset=1.0, config=_gemma3),
    "gptneox": Arch("gpt_neox", top=NEOX_TOP, base_layer=NEOX_LAYER, prefix="gpt_neox.layers",
                    qkv_by_kind=True, config=_neox),
}
REFUSED_TENSORS = {  # tensors that mean a feature llmgen does not implement
    "rope_freqs.weight": "llama3 rope frequencies (rope_freqs.weight)",
    "rope_factors_long.weight": "longrope scaling (rope_factors_long.weight)",
    "rope_factors_short.weight": "longrope scaling (rope_factors_short.weight)",
}


def gguf_config(f: Fields) -> tuple[Arch, dict]:
    """The file's architecture and the ``config.json`` it implies."""
    if f.arch not in ARCHS:
        raise ModelError(f"GGUF architecture {f.arch!r} is not supported (supported: {', '.join(ARCHS)})")
    arch = ARCHS[f.arch]
    names = {t.name for t in f.reader.tensors}
    for tensor, feature in REFUSED_TENSORS.items():
        if tensor in names:
            raise ModelError(f"this GGUF stores {feature}, which llmgen does not convert yet")
    heads = int(f.arch_key("attention.head_count"))
    hidden = int(f.arch_key("embedding_length"))
    tokens = f.get("tokenizer.ggml.tokens") or []
    cfg = {
        "model_type": arch.model_type,
        "vocab_size": int(f.arch_key("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(f.arch_key("feed_forward_length")),
        "num_hidden_layers": int(f.arch_key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.arch_key("attention.head_count_kv", heads)),
        "max_position_embeddings": int(f.arch_key("context_length", 2048)),
        "rms_norm_eps": float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f.arch_key("rope.freq_base", 1_000_000.0 if f.arch == "gemma3" else 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if arch.config is None:  # Llama-like: head_dim only when it is not hidden/heads
        head_dim = f.arch_key("rope.dimension_count")
        if head_dim and int(head_dim) != hidden // heads:
            cfg["head_dim"] = int(head_dim)
    else:
        cfg.update(arch.config(f, cfg))
    scaling = f.arch_key("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(f.arch_key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelError(f"GGUF rope scaling {scaling!r} is not supported")
    for key in ("bos_token_id", "eos_token_id"):
        value = f.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key] = int(value)
    return arch, cfg
