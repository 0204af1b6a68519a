"""Architectures by ``config.json`` ``model_type``.

Every model is an ``nn.Module`` with the same interface, which is all the decoders use:

- ``forward(input_ids [B, T], positions [B, T] | None, cache | None, attention_mask [B, T] | None) -> logits [B, T, V]``
- ``new_cache(batch, max_len) -> KVCache``
- ``cfg.vocab_size``, ``cfg.context_length`` and ``cfg.n_layer``
- ``rename_checkpoint(tensors, cfg)``: ``{parameter name: (checkpoint name, tensor)}``
"""

from __future__ import annotations

from llmgen.models.gpt2 import GPT2, GPT2Config
from llmgen.models.llama import Llama, LlamaConfig

ARCHITECTURES = {
    "gpt2": (GPT2, GPT2Config),
    "llama": (Llama, LlamaConfig),
    "mistral": (Llama, LlamaConfig),
    "qwen2": (Llama, LlamaConfig),
    "qwen3": (Llama, LlamaConfig),
}
