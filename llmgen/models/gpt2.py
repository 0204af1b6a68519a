"""GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh), LM head tied to the embedding.

Parameter names mirror the Hugging Face checkpoint (``h.0.attn.c_attn`` ...) so loading
is a rename-free copy; only GPT-2's Conv1D weights, stored as ``[in, out]``, are
transposed into ``nn.Linear``'s ``[out, in]`` on the way in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmgen.cache import KVCache, positions_and_mask
from llmgen.models.linear import Linear, linear

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}

# Conv1D layers in the checkpoint: their weight is the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old checkpoints carry (the causal mask) that hold no learned values.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, cfg: dict) -> GPT2Config:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def to_hf(self) -> dict:
        """config.json contents that both llmgen and transformers' GPT2LMHeadModel read."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **self.__dict__}

    @property
    def context_length(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def features(self) -> list[str]:
        """The architecture features in use, for ``llmgen info``."""
        out = ["learned positions", "LayerNorm", "GELU MLP"]
        if self.scale_attn_by_inverse_layer_idx:
            out.append("attention scaled by 1/layer")
        return out + ["tied embeddings"] * self.tie_word_embeddings


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)
        scale = 1 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = cache is None and mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Linear(cfg.n_embd, inner)
        self.c_proj = Linear(inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """The decoder. ``forward(input_ids, positions, cache) -> logits`` is the interface
    every architecture in ``llmgen.models`` shares."""

    TOKEN_EMBEDDING = "wte"  # the attribute models/quant.py replaces

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        if cfg.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {cfg.activation_function!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        # None when tied: the head reads wte (models/quant.py may give it its own)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.ln_f.weight  # the activations' dtype and device (wte may be int8)
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, max_len, self.cfg.head_dim, p.dtype, p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` ([B, T], 1 = token, 0 = padding) applies without a cache, as in
        training. ``residuals``, when given, receives the residual stream after the
        embeddings and after each block (the logit lens reads it)."""
        T = input_ids.shape[1]
        positions, mask = positions_and_mask(input_ids, positions, cache, attention_mask)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            if residuals is not None:
                residuals.append(x)
            x = block(x, cache, mask)
        if residuals is not None:
            residuals.append(x)
        if cache is not None:
            cache.advance(T)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head: residual stream [B, T, C] -> logits [B, T, V]."""
        x = self.ln_f(x)
        return linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)

    @staticmethod
    def rename_checkpoint(tensors: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, tuple[str, torch.Tensor]]:
        """Hugging Face GPT-2 tensors as ``{our name: (checkpoint name, tensor)}``.

        Names we do not know are passed through for the loader to report."""
        out = {}
        for name, t in tensors.items():
            key = name.removeprefix("transformer.")
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if key.endswith(CONV1D_SUFFIXES) and t.ndim == 2 and t.is_floating_point():  # quantized rows: Linear's order
                t = t.t()
            out[key] = (name, t)
        return out

    def export_checkpoint(self) -> dict[str, torch.Tensor]:
        """Our parameters under Hugging Face GPT-2 names and layouts (the inverse of rename)."""
        out = {}
        for name, t in self.state_dict().items():
            if name.endswith(CONV1D_SUFFIXES):
                t = t.t()
            out[name if name == "lm_head.weight" else f"transformer.{name}"] = t.contiguous()
        return out

