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
from llmgen.models.neox import GPTNeoX, neox_config

# model_type -> (the module, config.json's dict -> its config)
ARCHITECTURES = {
    "gpt2": (GPT2, GPT2Config.from_hf),
    "llama": (Llama, LlamaConfig.from_hf),
    "mistral": (Llama, LlamaConfig.from_hf),
    "qwen2": (Llama, LlamaConfig.from_hf),
    "qwen3": (Llama, LlamaConfig.from_hf),
    "phi3": (Llama, LlamaConfig.from_hf),
    "olmo2": (Llama, LlamaConfig.from_hf),
    "gemma": (Llama, LlamaConfig.from_hf),
    "gemma2": (Llama, LlamaConfig.from_hf),
    "gemma3_text": (Llama, LlamaConfig.from_hf),
    "gpt_neox": (GPTNeoX, neox_config),
}
