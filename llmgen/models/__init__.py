"""Architectures by ``config.json`` ``model_type``.

Every model is an ``nn.Module`` with the same interface, which is all the decoders use:

- ``forward(input_ids [B, T], positions [B, T] | None, cache | None, attention_mask [B, T] | None,
  residuals: list | None) -> logits [B, T, V]``; ``residuals`` collects the residual stream
  after the embeddings and after each block
- ``head(x [B, T, C]) -> logits [B, T, V]``: the final norm and the LM head
- ``new_cache(batch, max_len) -> KVCache``
- ``cfg.vocab_size``, ``cfg.context_length`` and ``cfg.n_layer``
- ``rename_checkpoint(tensors, cfg)``: ``{parameter name: (checkpoint name, tensor)}``
"""

from __future__ import annotations

from llmgen.models import families
from llmgen.models.decoder import Decoder
from llmgen.models.gpt2 import GPT2, GPT2Config
from llmgen.models.neox import GPTNeoX, neox_config

# model_type -> (the module, config.json's dict -> its config)
ARCHITECTURES = {
    "gpt2": (GPT2, GPT2Config.from_hf),
    "llama": (Decoder, families.llama),
    "mistral": (Decoder, families.llama),
    "phi3": (Decoder, families.llama),
    "qwen2": (Decoder, families.qwen2),
    "qwen3": (Decoder, families.qwen3),
    "olmo2": (Decoder, families.olmo2),
    "gemma": (Decoder, families.gemma),
    "gemma2": (Decoder, families.gemma),
    "gemma3_text": (Decoder, families.gemma),
    "gpt_neox": (GPTNeoX, neox_config),
}
