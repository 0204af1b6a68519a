"""The chain's last stage, which picks the token: greedy, or a seeded draw.

As in llama.cpp (``greedy``, ``dist``), choosing is a stage like the others, so no
decode loop has an "if greedy" branch, and the draw owns its generators.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import Rows, Terminal


class Greedy(Terminal):
    """The most probable token; among equals, the lowest id (``argmax`` returns the first)."""

    name = "greedy"

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


class Draw(Terminal):
    """A draw from softmax(logits), with one generator per row seeded by the row's seed."""

    name = "draw"

    def __init__(self, rows: Rows) -> None:
        self.generators = rows.generators()

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        probs = self.distribution(logits)
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]

