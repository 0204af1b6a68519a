"""The rotary decoder that every family but GPT-2 runs on: rotary positions, RMSNorm,
a gated MLP, and grouped-query attention, as in Llama, with the options other families
need (each field of ``DecoderConfig`` says whose): q/k norms, norms after or around
attention and MLP, LayerNorm, partial rotary, a parallel residual, soft-capping, a
real sliding window on some layers, a second rope base.

``models/families.py`` and ``models/neox.py`` read each family's config.json into a
``DecoderConfig``. Parameter names mirror the Hugging Face checkpoint without its
``model.`` prefix, except that each layer's q/k/v and gate/up projections are stacked on
load into ``qkv_proj`` and ``gate_up_proj`` (see ``STACKED``). Rotary frequencies are
computed from the config (they are not weights), in float32, exactly as transformers
does, including the ``linear`` and ``llama3`` rope scalings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmgen.cache import KVCache, positions_and_mask
from llmgen.models.linear import Linear, linear

def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.json's hidden_act names, as transformers spells them ("swish" is its alias of SiLU).
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_new": _tanh_gelu}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


@dataclass(frozen=True)
class DecoderConfig:
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
    # GPT-NeoX:
    layer_norm: bool = False  # LayerNorm with a bias instead of RMSNorm
    partial_rotary_factor: float = 1.0  # rotate only this fraction of each head
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) instead of one after the other
    gated_mlp: bool = True  # SwiGLU; False: up, activation, down
    # Gemma:
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    # Gemma 2:
    sandwich_norm: bool = False  # norms before and after both attention and MLP
    attn_softcap: float | None = None  # attention scores become cap * tanh(score / cap)
    final_softcap: float | None = None  # so do the output logits
    query_scale: float | None = None  # attention's score scale when not 1/sqrt(head_dim)
    sliding_window: int | None = None  # keys at most this many positions back, on sliding_layers
    sliding_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' own (unscaled) rope base

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:  # refused by name, not a KeyError mid-load
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")

    @property
    def features(self) -> list[str]:
        """The architecture features in use, for ``llmgen info``."""
        names = {
            "qk_norm": f"q/k norm ({self.qk_norm})", "post_norm": "norms after attention and MLP", "layer_norm": "LayerNorm",
            "parallel_residual": "parallel residual", "sandwich_norm": "norms before and after attention and MLP",
            "embed_scale": "embeddings scaled by sqrt(hidden)", "tie_word_embeddings": "tied embeddings",
        }
        out = [text for field, text in names.items() if getattr(self, field)]
        out.append("SwiGLU/GeGLU MLP" if self.gated_mlp else "MLP")
        if self.num_key_value_heads != self.num_attention_heads:
            out.append(f"grouped-query attention ({self.num_attention_heads} q / {self.num_key_value_heads} kv heads)")
        if self.partial_rotary_factor != 1.0:
            out.append(f"partial rotary ({self.partial_rotary_factor:g} of each head)")
        if self.rope_scaling:
            out.append(f"rope scaling {dict(self.rope_scaling).get('rope_type', dict(self.rope_scaling).get('type'))}")
        if self.sliding_window and self.sliding_layers:
            out.append(f"sliding window {self.sliding_window} on {len(self.sliding_layers)} of {self.num_hidden_layers} layers")
        if self.local_rope_theta:
            out.append(f"rope base {self.local_rope_theta:g} on sliding layers, {self.rope_theta:g} on the others")
        if self.attn_softcap:
            out.append(f"attention soft-cap {self.attn_softcap:g}")
        if self.final_softcap:
            out.append(f"logit soft-cap {self.final_softcap:g}")
        return out

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


def rope_inv_freq(cfg: DecoderConfig, device, local: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies, with the config's scaling applied (float32); ``local``:
    for Gemma 3's sliding layers, their own base and no scaling."""
    d = cfg.rotary_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = {} if local else dict(cfg.rope_scaling or ())
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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dimensions of each head; the rest
    pass through (partial rotary, as GPT-NeoX).

    ``sin`` comes from ``Decoder.rotary`` with its first half negated, so the usual
    ``x * cos + cat(-x2, x1) * sin`` is ``x * cos + cat(x2, x1) * sin``: the halves
    swapped by one flip, the sign folded into a table computed once a step. Same
    numbers (a negation is exact), three operations where the textbook form takes six."""
    d = cos.shape[-1]
    turned = x if d == x.shape[-1] else x[..., :d]
    swapped = turned.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    out = torch.addcmul(turned * cos, swapped, sin)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)


def norm(cfg: DecoderConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.rms_norm_eps) if cfg.layer_norm else RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and not self.offset:  # one op, the same numbers (in float32 the casts are none)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales by (1 + weight) in float32, then casts
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim
        self.sizes = _stacked_rows(cfg, "qkv_proj")
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)  # q, k, v stacked
        self.o_proj = Linear(self.heads * self.dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        q_size, k_size = (self.dim, self.dim) if cfg.qk_norm == "head" else self.sizes[:2]
        self.q_norm = norm(cfg, q_size) if cfg.qk_norm else None
        self.k_norm = norm(cfg, k_size) if cfg.qk_norm else None
        self.softcap, self.scale = cfg.attn_softcap, cfg.query_scale

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` is this layer's (the decoder narrows it for sliding-window layers);
        None means plain causal attention."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.qk_norm:
            q, k, v = qkv.split(self.sizes, dim=-1)
            if self.qk_norm == "all":
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(B, T, self.heads, self.dim)  # (B, T, nh, hs)
            k, v = k.view(B, T, self.kv_heads, self.dim), v.view(B, T, self.kv_heads, self.dim)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        else:  # q and k side by side in one rotation
            heads = qkv.unflatten(-1, (self.heads + 2 * self.kv_heads, self.dim))  # (B, T, nh + 2 kv, hs)
            q, k = rotate(heads[:, :, : self.heads + self.kv_heads], cos, sin).split((self.heads, self.kv_heads), dim=2)
            v = heads[:, :, self.heads + self.kv_heads :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.softcap:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            causal = mask is None and T > 1 and cache is None
            # Grouped-query attention: each K/V head serves a group of query heads. enable_gqa
            # reads the cache in place, where repeating K/V would copy all of it every step.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.kv_heads != self.heads
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.dim))


def sliding_mask(mask: torch.Tensor | None, start: int, q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """``mask`` (None: plain causal) narrowed so each query sees only the ``window`` most
    recent slots up to itself, as transformers' sliding-window layers do."""
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    band = ((k_pos <= q_pos) & (q_pos - k_pos < window))[None, None]  # (1, 1, T, keys)
    return band if mask is None else mask & band


def softcapped_attention(q, k, v, mask: torch.Tensor, scale: float | None, cap: float) -> torch.Tensor:
    """Attention whose scores are squashed to (-cap, cap) by cap * tanh(score / cap)
    before the softmax (Gemma 2); no fused kernel does this, so it is spelled out.
    ``mask`` must be given (True = may attend): there is no implicit causal mask here."""
    if k.shape[1] != q.shape[1]:  # grouped-query: repeat each K/V head for its group
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, nh, T, keys)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); or, not gated, down(act(fc_in(x)))."""

    def __init__(self, cfg: DecoderConfig) -> None:
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
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.post_norm, self.parallel, self.sandwich = cfg.post_norm, cfg.parallel_residual, cfg.sandwich_norm
        self.input_layernorm = None if cfg.post_norm else norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size)
        self.pre_feedforward_layernorm = norm(cfg, cfg.hidden_size) if cfg.sandwich_norm else None
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = norm(cfg, cfg.hidden_size) if cfg.post_norm or cfg.sandwich_norm else None

    def forward(self, x, cos, sin, cache, mask) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.post_norm:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, mask))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        if self.parallel:
            return x + attended + self.mlp(self.post_attention_layernorm(x))
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Same interface as ``GPT2``: ``forward(input_ids, positions, cache, attention_mask) -> logits``."""

    TOKEN_EMBEDDING = "embed_tokens"  # the attribute models/quant.py replaces

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = norm(cfg, cfg.hidden_size)
        # None when tied: the head reads embed_tokens (models/quant.py may give it its own)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[tuple[torch.device, bool], torch.Tensor] = {}
        self._sliding = frozenset(cfg.sliding_layers)  # layers that see only the last sliding_window slots

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.norm.weight  # the activations' dtype and device (the embedding may be int8)
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len, self.cfg.dim, p.dtype, p.device)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions.device, local)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.cfg, positions.device, local)
        freqs = positions.float()[..., None] * self._inv_freq[key]  # (B, T, rotary_dim / 2)
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        sin = torch.cat((-sin, sin), dim=-1)  # negated first half: see rotate
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)  # (B, T, 1, rotary_dim): one per head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As GPT-2's: ``residuals``, when given, receives the residual stream after the
        embeddings and after each block."""
        T = input_ids.shape[1]
        positions, mask = positions_and_mask(input_ids, positions, cache, attention_mask)
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)
        positions = positions.expand(input_ids.shape[0], -1)
        rope = self.rotary(positions, x.dtype)
        local = self.rotary(positions, x.dtype, local=True) if self.cfg.local_rope_theta else rope
        windowed = mask
        start = cache.length if cache is not None else 0  # the first query's slot
        if self.cfg.attn_softcap and mask is None:  # soft-capped attention takes its causal mask spelled out
            mask = sliding_mask(None, start, T, start + T, start + T + 1, x.device)
        if self.cfg.sliding_window and self._sliding:  # one narrowed mask for every sliding layer
            windowed = sliding_mask(mask, start, T, start + T, self.cfg.sliding_window, x.device)
        for i, block in enumerate(self.layers):
            if residuals is not None:
                residuals.append(x)
            sliding = i in self._sliding
            x = block(x, *(local if sliding else rope), cache, windowed if sliding else mask)
        if residuals is not None:
            residuals.append(x)
        if cache is not None:
            cache.advance(T)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm, the LM head and any logit soft-cap: residual stream -> logits."""
        x = self.norm(x)
        logits = linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    @staticmethod
    def rename_checkpoint(tensors: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, tuple[str, torch.Tensor]]:
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


def _stacked_rows(cfg: DecoderConfig, stacked: str) -> tuple[int, ...]:
    """Output sizes of the parts of a stacked projection, in stacking order."""
    if stacked == "qkv_proj":
        return cfg.num_attention_heads * cfg.dim, cfg.num_key_value_heads * cfg.dim, cfg.num_key_value_heads * cfg.dim
    return cfg.intermediate_size, cfg.intermediate_size


def _check_stackable(names: tuple[str, ...], pieces: tuple[torch.Tensor, ...], rows: tuple[int, ...], hidden: int) -> None:
    """Check each part before stacking, so a wrong shape is reported under the part's own name."""
    from llmgen.models.quant import stored_columns

    for name, t, n in zip(names, pieces, rows):
        expected = [n] if t.ndim == 1 else [n, stored_columns(name, t.dtype, hidden)]
        if list(t.shape) != expected:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, config.json implies {expected}")
