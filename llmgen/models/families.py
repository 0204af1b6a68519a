"""Each family's config.json read into a ``DecoderConfig``: what it shares with Llama
comes from ``common``, what it adds is a few lines of its own.

Keys that moved between transformers versions are read in both spellings
(``rope_scaling`` or ``rope_parameters``; ``layer_types`` or a sliding pattern), and a
rope scaling or layer type not implemented here is refused by name, never ignored.
"""

from __future__ import annotations

from typing import Any

from llmgen.models.decoder import DecoderConfig

ROPE_SCALINGS = ("linear", "llama3")


def common(cfg: dict, **family: Any) -> DecoderConfig:
    """The fields every rotary family spells the same way, then the family's own."""
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3 gives parameters per layer type
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
    scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict))))
    attention_bias = cfg.get("attention_bias") or False
    values = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=cfg.get("mlp_bias", False),
        head_dim=cfg.get("head_dim"),
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
        partial_rotary_factor=cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)),
    )
    values.update(family)
    return DecoderConfig(**values)


def llama(cfg: dict) -> DecoderConfig:
    """Llama 2/3, SmolLM, TinyLlama; Mistral and Phi-3 with their sliding window."""
    return common(cfg, **window(cfg, on_by_default=cfg.get("model_type") in ("mistral", "phi3")))


def qwen2(cfg: dict) -> DecoderConfig:
    """Qwen2/2.5: biases on q, k and v; a sliding window only if ``use_sliding_window``."""
    return common(cfg, qkv_bias=True, **window(cfg, on_by_default=False))


def window(cfg: dict, on_by_default: bool) -> dict:
    """A sliding window on every layer (Mistral, Phi-3), or on those ``layer_types``
    names, or (Qwen2/3 configs without ``layer_types``) on layers from
    ``max_window_layers`` on."""
    size = cfg.get("sliding_window")
    if not size or not cfg.get("use_sliding_window", on_by_default):
        return {}
    if cfg.get("layer_types"):
        layers = sliding_layers(cfg, every=0)
    else:
        layers = tuple(range(cfg.get("max_window_layers", 0), cfg["num_hidden_layers"]))
    return {"sliding_window": size, "sliding_layers": layers}


def qwen3(cfg: dict) -> DecoderConfig:
    """Qwen3: an RMSNorm over each head's q and k before the rotation; a sliding window
    only if ``use_sliding_window``, as Qwen2."""
    return common(cfg, qk_norm="head", **window(cfg, on_by_default=False))


def olmo2(cfg: dict) -> DecoderConfig:
    """OLMo 2: norms after attention and MLP instead of before; q/k norms over the whole projections."""
    return common(cfg, qk_norm="all", post_norm=True)


def gemma(cfg: dict) -> DecoderConfig:
    """Gemma 1, 2 and 3: embeddings scaled by sqrt(hidden), RMSNorm by (1 + w), GeGLU.
    Gemma 2 adds norms around attention and MLP, soft-caps, ``query_pre_attn_scalar`` and
    a sliding window on alternate layers; Gemma 3 drops the soft-caps, adds per-head q/k
    norms and gives its sliding layers their own rope base."""
    kind = cfg.get("model_type")
    if kind == "gemma":
        return common(cfg, norm_offset=1.0, embed_scale=True)
    rope = cfg.get("rope_parameters") or {}
    local_theta = rope.get("sliding_attention", {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return common(
        cfg,
        norm_offset=1.0,
        embed_scale=True,
        sandwich_norm=True,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        query_scale=cfg["query_pre_attn_scalar"] ** -0.5,
        sliding_window=cfg.get("sliding_window"),
        sliding_layers=sliding_layers(cfg, every=cfg.get("sliding_window_pattern", 6) if kind == "gemma3_text" else 2),
        **({"qk_norm": "head", "local_rope_theta": local_theta} if kind == "gemma3_text" else {}),
    )


def sliding_layers(cfg: dict, every: int) -> tuple[int, ...]:
    """Which layers use the sliding window: config.json's ``layer_types`` when it has
    them, else all but every ``every``-th layer (2 for Gemma 2, 6 for Gemma 3)."""
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(cfg["num_hidden_layers"])
    ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer type {sorted(unknown)[0]!r} is not supported (supported: sliding_attention, full_attention)")
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
