"""Temperature: softmax(logits / T). T < 1 sharpens the distribution, T > 1 flattens it.

T = 0 is greedy decoding, which the chain does with its greedy terminal stage; this
stage never sees it. With a dynamic range (llama.cpp's dynatemp, ``temp-ext``), each
row's temperature moves within [T - range, T + range] with the entropy of its
distribution: a confident step is sharpened, an unsure one flattened.
"""

from __future__ import annotations

import math

import torch

from llmgen.sampling.stage import NEG_INF, Stage

# Below this, logits / T can overflow float32 (and the distribution is one-hot anyway):
# the flag refuses it, and a dynamic temperature that falls below it acts as greedy.
MIN_TEMPERATURE = 1e-4


class Temperature(Stage):
    name = "temperature"

    def __init__(self, temperature: float, dynamic_range: float = 0.0, exponent: float = 1.0) -> None:
        if temperature <= 0 and dynamic_range <= 0:
            raise ValueError("temperature 0 is greedy; the chain takes the argmax instead")
        self.temperature, self.range, self.exponent = temperature, dynamic_range, exponent

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.range <= 0:
            return logits / self.temperature
        return torch.cat([self._dynamic(row[None]) for row in logits])

    def _dynamic(self, logits: torch.Tensor) -> torch.Tensor:  # (1, vocab)
        """llama.cpp's ``temp-ext``: T = min_T + (max_T - min_T) * (H / ln n) ** exponent,
        with H the entropy (in nats) over the n tokens still in play."""
        n = int(torch.isfinite(logits).sum())
        if n <= 1:
            return logits
        low, high = max(0.0, self.temperature - self.range), self.temperature + self.range
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -float((logp.exp() * logp).nansum())
        temperature = low + (high - low) * (entropy / math.log(n)) ** self.exponent
        if temperature < MIN_TEMPERATURE:  # as llama.cpp at 0: only the (first) most probable token survives
            return torch.full_like(logits, NEG_INF).scatter(-1, logits.argmax(-1, keepdim=True), logits.max(-1, keepdim=True).values)
        return logits / temperature
