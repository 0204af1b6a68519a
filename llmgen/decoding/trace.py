"""What a decoder returns: the chosen tokens, and enough of the search to draw it.

Log-probabilities are always under the model's unmodified distribution (softmax of the
raw logits), whatever penalty, temperature or filter chose the token, so numbers from
different strategies can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class Step:
    """One decode step of one sequence: what was chosen and the best alternatives."""

    token_id: int
    logprob: float
    alternatives: tuple[Candidate, ...] = ()


@dataclass
class Sample:
    """One generated continuation. ``finish_reason`` is ``eos``, ``length`` or ``stop``."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    seed: int | None = None
    steps: list[Step] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)
