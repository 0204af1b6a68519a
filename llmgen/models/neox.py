"""GPT-NeoX (Pythia, GPT-NeoX-20B), on the rotary decoder: LayerNorm with biases, rotary
on only part of each head (``rotary_pct``), attention and MLP in parallel or one after
the other (``use_parallel_residual``), biases on every projection, a GELU MLP that is
not gated, and an untied output head.

What differs from Llama is how the checkpoint names and lays out its tensors, so this
module only maps the config and renames (and reorders) tensors onto the decoder.
"""

from __future__ import annotations

import torch

from llmgen.models.decoder import Decoder, DecoderConfig

# Buffers some checkpoints saved: the causal mask and rotary frequencies, not weights.
IGNORED = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
RENAMES = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attention.query_key_value": "self_attn.qkv_proj",
    "attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.fc_in",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def neox_config(cfg: dict) -> DecoderConfig:
    """gpt_neox's config.json, old keys (``rotary_pct``, ``rotary_emb_base``) or new (``rope_parameters``)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported for gpt_neox (supported: default)")
    partial = cfg.get("rotary_pct", rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    bias = cfg.get("attention_bias", True)
    heads = cfg["num_attention_heads"]
    return DecoderConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size") or 4 * cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        rope_theta=cfg.get("rotary_emb_base", rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        hidden_act=cfg.get("hidden_act", "gelu"),
        layer_norm=True,
        partial_rotary_factor=partial,
        parallel_residual=cfg.get("use_parallel_residual", True),
        gated_mlp=False,
    )


class GPTNeoX(Decoder):
    @staticmethod
    def rename_checkpoint(tensors: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, tuple[str, torch.Tensor]]:
        """NeoX tensors under the decoder's names. ``query_key_value`` interleaves
        q, k and v per head (rows ordered head, then q/k/v, then dim); the decoder
        stacks all of q, then k, then v, so its rows are reordered."""
        out = {}
        for name in list(tensors):
            t = tensors.pop(name)
            key = name.removeprefix("gpt_neox.")
            if key.endswith(IGNORED) or (key == "embed_out.weight" and cfg.tie_word_embeddings):
                continue
            if key.startswith("layers."):
                _, layer, rest = key.split(".", 2)
                module, _, leaf = rest.rpartition(".")
                if module not in RENAMES:
                    raise ValueError(f"unexpected tensor {name!r}")
                if module == "attention.query_key_value":
                    t = _qkv_blocks(t, cfg)
                key = f"layers.{layer}.{RENAMES[module]}.{leaf}"
            else:
                key = {"embed_in.weight": "embed_tokens.weight", "final_layer_norm.weight": "norm.weight",
                       "final_layer_norm.bias": "norm.bias", "embed_out.weight": "lm_head.weight"}.get(key, key)
            out[key] = (name, t)
        return out


def _qkv_blocks(t: torch.Tensor, cfg: DecoderConfig) -> torch.Tensor:
    """(heads, 3, head_dim, ...) rows -> (3, heads, head_dim, ...): q rows, then k, then v."""
    heads, dim = cfg.num_attention_heads, cfg.dim
    if t.shape[0] != 3 * heads * dim:
        return t  # the loader's shape check names it
    return t.reshape(heads, 3, dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
