"""The sampler: one ordered chain of stages, built in one place, that every decoder calls.

``build_sampler`` turns a ``SamplingConfig`` into stages in the documented order,
leaving out every stage whose setting is neutral (so the default chain is just the
draw). Greedy decoding keeps the stages that change what the model prefers and ends
in ``Greedy``; sampling keeps them all and ends in a seeded ``Draw``.

A decode loop only ever calls ``choose`` (or ``explain``, which chooses too and says
what each stage did), ``accept`` and ``keep``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmgen.config import SamplingConfig
from llmgen.sampling.penalties import Penalties
from llmgen.sampling.stage import Rows, Stage, Terminal
from llmgen.sampling.temperature import Temperature
from llmgen.sampling.terminal import Draw, Greedy
from llmgen.sampling.truncation import MinP, TopK, TopP

# transformers' order: penalties -> temperature -> top-k -> top-p -> min-p.
DEFAULT_ORDER: tuple[str, ...] = ("penalties", "temperature", "top-k", "top-p", "min-p")


@dataclass(frozen=True)
class Context:
    """What a stage may need besides its settings."""

    cfg: SamplingConfig
    rows: Rows
    vocab_size: int


# name -> the stage for this config, or None when its setting leaves it off.
FACTORIES: dict[str, Callable[[Context], Stage | None]] = {
    "penalties": lambda c: Penalties(c.rows, c.vocab_size, c.cfg.repetition_penalty) if c.cfg.repetition_penalty != 1.0 else None,
    "temperature": lambda c: Temperature(c.cfg.temperature) if c.cfg.temperature not in (0.0, 1.0) else None,
    "top-k": lambda c: TopK(c.cfg.top_k) if c.cfg.top_k > 0 else None,
    "top-p": lambda c: TopP(c.cfg.top_p) if c.cfg.top_p < 1.0 else None,
    "min-p": lambda c: MinP(c.cfg.min_p) if c.cfg.min_p > 0.0 else None,
}


@dataclass
class Explanation:
    """What the chain did to one row's distribution, for showing to a person.

    ``raw`` is the model's distribution, ``tempered`` the one after the last stage that
    reshapes rather than removes (penalties, temperature), ``final`` the one the token
    is chosen from. ``removed_by[t]`` names the first stage that removed token t (None if
    it survived); ``changed_by[t]`` the stages that moved its logit and kept it.
    """

    order: list[str]
    raw: torch.Tensor
    tempered: torch.Tensor
    final: torch.Tensor
    removed_by: list[str | None]
    changed_by: dict[int, list[str]] = field(default_factory=dict)


class Sampler:
    """The stages in order, the terminal that picks, and the rows they share."""

    def __init__(self, rows: Rows, stages: list[Stage], terminal: Terminal) -> None:
        self.rows, self.stages, self.terminal = rows, stages, terminal

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.stages] + [self.terminal.name]

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            logits = stage.apply(logits)
        return logits

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The renormalised distribution each row's token is chosen from, ``(rows, vocab)``."""
        return self.terminal.distribution(self.process(logits.float()))

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row, ``(rows,)``; call ``accept`` with it before the next step."""
        return self.terminal.choose(self.process(logits.float()))

    def explain(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Explanation]]:
        """``choose``, recording what every stage did to each row on the way (one pass,
        so random stages draw exactly as they would without it)."""
        after = [logits.float()]
        for stage in self.stages:
            after.append(stage.apply(after[-1]))
        final = self.terminal.distribution(after[-1])
        chosen = self.terminal.choose(after[-1])
        return chosen, [self._explain_row(after, final, row) for row in range(logits.shape[0])]

    def _explain_row(self, after: list[torch.Tensor], final: torch.Tensor, row: int) -> Explanation:
        removed: list[str | None] = [None] * after[0].shape[-1]
        changed: dict[int, list[str]] = {}
        reshaped = 0  # index in ``after`` of the last reshaping stage's output
        for i, stage in enumerate(self.stages, 1):
            before, now = after[i - 1][row], after[i][row]
            for tok in torch.nonzero(torch.isfinite(before) & ~torch.isfinite(now)).flatten().tolist():
                removed[tok] = stage.name
            if not stage.truncates:
                reshaped = i
                if stage.name != "temperature":
                    for tok in torch.nonzero(torch.isfinite(now) & (now != before)).flatten().tolist():
                        changed.setdefault(tok, []).append(stage.name)
        for tok in torch.nonzero((final[row] == 0) & torch.isfinite(after[-1][row])).flatten().tolist():
            removed[tok] = self.terminal.name
        return Explanation(
            self.order,
            torch.softmax(after[0][row], -1),
            torch.softmax(after[reshaped][row], -1),
            final[row],
            removed,
            changed,
        )

    def accept(self, tokens: torch.Tensor | list[int]) -> None:
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        self.rows.append(tokens)
        for stage in self.stages:
            stage.accept(tokens)

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on, in this order (the decode loop dropped the others)."""
        self.rows.keep(rows)
        for stage in self.stages:
            stage.keep(rows)
        self.terminal.keep(rows)


def build_sampler(
    cfg: SamplingConfig,
    prompts: list[list[int]],
    seeds: list[int | None],
    vocab_size: int,
    device: torch.device | str = "cpu",
) -> Sampler:
    """The chain for ``cfg`` over these rows (prompt ids and seed each; seeds may be None
    when greedy)."""
    rows = Rows(prompts, seeds, device)
    context = Context(cfg, rows, vocab_size)
    stages = [s for s in (FACTORIES[name](context) for name in DEFAULT_ORDER) if s is not None]
    if cfg.greedy:
        return Sampler(rows, [s for s in stages if not s.warper], Greedy())
    return Sampler(rows, stages, Draw(rows))
