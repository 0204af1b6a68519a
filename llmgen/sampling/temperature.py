"""Temperature: softmax(logits / T). T < 1 sharpens the distribution, T > 1 flattens it.

T = 0 is greedy decoding, which the chain does with its greedy terminal stage; this
stage never sees it.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import Stage


class Temperature(Stage):
    name = "temperature"

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError("temperature 0 is greedy; the chain takes the argmax instead")
        self.temperature = temperature

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature
