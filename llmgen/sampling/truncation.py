"""Stages that remove unlikely tokens (set them to ``-inf``) and leave the rest untouched.

Each keeps at least the most probable token, so no stage can empty the distribution.
Ties are broken by token id: a lower id ranks first.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import NEG_INF, Stage, keep_sorted, stable_order


class Truncation(Stage):
    """A stage that only removes tokens (``explain`` counts no logit it leaves as changed)."""

    truncates = True


class TopK(Truncation):
    """Keep exactly the k most probable tokens."""

    name = "top-k"

    def __init__(self, k: int) -> None:
        self.k = k

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        order = stable_order(logits)
        rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(order)
        return keep_sorted(logits, order, rank < self.k)


class TopP(Truncation):
    """Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches p.

    A token is kept while the mass ranked above it is still below p, so the most
    probable token always survives and the kept set is minimal.
    """

    name = "top-p"

    def __init__(self, p: float) -> None:
        self.p = p

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        order = stable_order(logits)
        sorted_probs = torch.softmax(logits.gather(-1, order), dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        return keep_sorted(logits, order, mass_before < self.p)


class MinP(Truncation):
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""

    name = "min-p"

    def __init__(self, min_p: float) -> None:
        self.min_p = min_p

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        threshold = self.min_p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, NEG_INF)

