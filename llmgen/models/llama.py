"""The Llama family (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2):
rotary positions, RMSNorm, a SwiGLU MLP, and grouped-query attention. Qwen3 adds an
RMSNorm over each head's queries and keys before the rotation; OLMo 2 one over the
whole q and k projections, and puts its norms after attention and MLP instead of
before; Phi-3 stores q/k/v and gate/up already stacked (as this module keeps them) and
may rotate only part of each head.

Parameter names mirror the Hugging Face checkpoint without its ``model.`` prefix, except
that each layer's q/k/v and gate/up projections are stacked on load into ``qkv_proj`` and
``gate_up_proj`` (see ``STACKED``). Rotary frequencies are computed from the config (they
are not weights), in float32, exactly as transformers does, including the ``linear``
and ``llama3`` rope scalings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmgen.cache import KVCache, positions_and_mask
from llmgen.models.linear import Linear, linear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs: hashable, frozen
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None
    hidden_act: str = "silu"
    qk_norm: str | None = None  # RMSNorm on q and k: "head" over each head (Qwen3), "all" over the whole projection (OLMo 2)
    post_norm: bool = False  # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x)), with no norm before either
    # GPT-NeoX (models/neox.py) reuses this module with these four:
    layer_norm: bool = False  # LayerNorm with a bias instead of RMSNorm
    partial_rotary_factor: float = 1.0  # rotate only this fraction of each head
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) instead of one after the other
    gated_mlp: bool = True  # SwiGLU; False: up, activation, down
    # Gemma:
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        model_type = cfg.get("model_type")
        heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta", (scaling or {}).get("rope_theta", 10000.0))
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
            scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        context = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type in ("mistral", "phi3")) else None
        if window:
            context = min(context, window)  # within the window, sliding-window attention is full attention
        attention_bias = cfg.get("attention_bias", False)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            max_position_embeddings=context,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            head_dim=cfg.get("head_dim"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            qk_norm={"qwen3": "head", "olmo2": "all"}.get(model_type),
            norm_offset=1.0 if model_type == "gemma" else 0.0,
            embed_scale=model_type == "gemma",
            post_norm=model_type == "olmo2",
            partial_rotary_factor=cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)),
        )

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim * self.partial_rotary_factor)


def rope_inv_freq(cfg: LlamaConfig, device) -> torch.Tensor:
    """Rotary inverse frequencies, with the config's scaling applied (float32)."""
    d = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dimensions of each head; the rest
    pass through (partial rotary, as GPT-NeoX)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :d], x[..., d:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


def norm(cfg: LlamaConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.rms_norm_eps) if cfg.layer_norm else RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales by (1 + weight) in float32, then casts
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim
        self.sizes = _stacked_rows(cfg, "qkv_proj")
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)  # q, k, v stacked
        self.o_proj = Linear(self.heads * self.dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        q_size, k_size = (self.dim, self.dim) if cfg.qk_norm == "head" else self.sizes[:2]
        self.q_norm = norm(cfg, q_size) if cfg.qk_norm else None
        self.k_norm = norm(cfg, k_size) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.heads, self.dim)  # (B, T, nh, hs)
        k = k.view(B, T, self.kv_heads, self.dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.kv_heads, self.dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = cache is None and mask is None and T > 1
        # Grouped-query attention: each K/V head serves a group of query heads. enable_gqa
        # reads the cache in place, where repeating K/V would copy all of it every step.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.dim))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); or, not gated, down(act(fc_in(x)))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.gated_mlp:
            self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # gate, up stacked
        else:
            self.fc_in = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gated = cfg.gated_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.fc_in(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.post_norm, self.parallel = cfg.post_norm, cfg.parallel_residual
        self.input_layernorm = None if cfg.post_norm else norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = norm(cfg, cfg.hidden_size) if cfg.post_norm else None

    def forward(self, x, cos, sin, cache, mask) -> torch.Tensor:
        if self.post_norm:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, mask))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        if self.parallel:
            return x + attended + self.mlp(self.post_attention_layernorm(x))
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Same interface as ``GPT2``: ``forward(input_ids, positions, cache, attention_mask) -> logits``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = norm(cfg, cfg.hidden_size)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len, self.cfg.dim, p.dtype, p.device)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.cfg, device)
        freqs = positions.float()[..., None] * self._inv_freq[device]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        positions, mask = positions_and_mask(input_ids, positions, cache, attention_mask)
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)
        cos, sin = self.rotary(positions.expand(input_ids.shape[0], -1), x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        head = self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return linear(x, head)

    @staticmethod
    def rename_checkpoint(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, tuple[str, torch.Tensor]]:
        """Checkpoint tensors under our names, with each layer's q/k/v and gate/up stacked
        into one matrix. ``tensors`` is emptied as it is read, so each part is freed as
        soon as its stack is built and loading peaks at the weights plus one stack."""
        out, pending = {}, {}
        for name in list(tensors):
            t = tensors.pop(name)
            key = name.removeprefix("model.")
            if key.endswith(IGNORED_SUFFIXES) or (key == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            prefix, sep, rest = key.partition(".self_attn.") if ".self_attn." in key else key.partition(".mlp.")
            part, _, leaf = rest.partition(".")
            stacked = STACKED_PART.get((sep, part))
            if stacked is None:
                out[key] = (name, t)
                continue
            target = f"{prefix}{sep}{stacked}.{leaf}"
            group = pending.setdefault(target, {})
            group[part] = (name, t)
            if len(group) == len(STACKED[stacked]):
                names, pieces = zip(*(group[p] for p in STACKED[stacked]))
                _check_stackable(names, pieces, _stacked_rows(cfg, stacked), cfg.hidden_size)
                out[target] = (names[0], torch.cat(pieces))
                del pending[target]
        for target, group in pending.items():
            stacked = target.rsplit(".", 2)[1]
            present_part, (present_name, _) = next(iter(group.items()))
            missing = next(p for p in STACKED[stacked] if p not in group)
            missing_name = present_name.replace(f".{present_part}.", f".{missing}.")
            raise ValueError(f"missing tensor {missing_name!r} (stacked with {present_name!r} into one projection)")
        return out


# Projections that read the same input are stored stacked: one product instead of two
# or three per layer and step, each over a larger matrix (fewer calls, better streaming).
STACKED_IN = {"qkv_proj": ".self_attn.", "gate_up_proj": ".mlp."}  # the submodule each lives in
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
STACKED_PART = {(STACKED_IN[stacked], part): stacked for stacked, parts in STACKED.items() for part in parts}


def _stacked_rows(cfg: LlamaConfig, stacked: str) -> tuple[int, ...]:
    """Output sizes of the parts of a stacked projection, in stacking order."""
    if stacked == "qkv_proj":
        return cfg.num_attention_heads * cfg.dim, cfg.num_key_value_heads * cfg.dim, cfg.num_key_value_heads * cfg.dim
    return cfg.intermediate_size, cfg.intermediate_size


def _check_stackable(names: tuple[str, ...], pieces: tuple[torch.Tensor, ...], rows: tuple[int, ...], hidden: int) -> None:
    """Check each part before stacking, so a wrong shape is reported under the part's own name."""
    for name, t, n in zip(names, pieces, rows):
        expected = [n] if t.ndim == 1 else [n, hidden]
        if list(t.shape) != expected:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, config.json implies {expected}")
