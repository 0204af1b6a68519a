"""The two things every stage of the sampler chain shares: its interface and the rows.

A stage is a small object in the manner of llama.cpp's ``llama_sampler_i``: ``apply``
turns a ``[rows, vocab]`` float32 tensor of logits into new logits (a removed token
becomes ``-inf``; nothing renormalises until the terminal stage), ``accept`` hears the
token each row chose, and ``keep`` follows the decode loop when finished rows leave
the batch. ``save`` and ``restore`` let a speculative drafter take tokens back: it
advances the chain through its draft, then returns it to where the accepted text left
it. A stage that keeps no state of its own inherits the no-op ``accept``, ``keep``,
``save`` and ``restore``.

``Rows`` is what all stages may read about the rows being decoded: each row's tokens so
far (prompt and output) and its seed. The chain updates it once per step, so stages
that look back over the text (penalties, n-gram bans, DRY) do not each keep a copy.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


class Rows:
    """Each row's tokens so far, how many of them are generated, and its seed."""

    def __init__(self, prompts: list[list[int]], seeds: list[int | None], device: torch.device | str) -> None:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per row (None when nothing is drawn)")
        self.history = [list(p) for p in prompts]
        self.prompt_lengths = [len(p) for p in prompts]
        self.seeds = list(seeds)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.history)

    def generated(self, row: int) -> int:
        return len(self.history[row]) - self.prompt_lengths[row]

    def append(self, tokens: list[int]) -> None:
        for history, token in zip(self.history, tokens):
            history.append(token)

    def keep(self, rows: list[int]) -> None:
        self.history = [self.history[r] for r in rows]
        self.prompt_lengths = [self.prompt_lengths[r] for r in rows]
        self.seeds = [self.seeds[r] for r in rows]

    def truncate(self, lengths: list[int]) -> None:
        """Each row's history back to its first ``lengths[row]`` tokens (a draft taken back)."""
        for history, n in zip(self.history, lengths):
            del history[n:]

    def generators(self, salt: int = 0) -> list[torch.Generator]:
        """One fresh generator per row, seeded with the row's seed: a row's draws then
        depend only on its seed, never on which other rows share the batch. A stage with
        a random step of its own passes a ``salt`` so its stream differs from the draw's."""
        if any(seed is None for seed in self.seeds):
            raise ValueError("sampling needs a seed per row")
        return [torch.Generator(self.device).manual_seed((seed ^ salt) % 2**63) for seed in self.seeds]


class Stage:
    """One step of the chain. ``name`` is how ``--samplers`` and "removed by" call it.

    ``warper`` stages reshape a distribution to sample from (temperature, truncation);
    greedy decoding skips them, as transformers does when ``do_sample`` is off. The
    others (penalties, bans, biases) change what the model prefers and apply always.
    """

    name: str = "stage"
    warper: bool = True
    truncates: bool = False  # only removes tokens, never moves a kept token's logit
    draws: bool = False  # ``apply`` draws random numbers (so each step's call counts)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:  # (rows, vocab) -> (rows, vocab)
        raise NotImplementedError

    def accept(self, tokens: list[int]) -> None:
        """The token each row chose this step (after ``Rows`` has recorded it)."""

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on (in this order); drop the state of the others."""

    def save(self) -> object:
        """A copy of the state ``accept`` changes, for ``restore``; None when there is none."""
        return None

    def restore(self, saved: object) -> None:
        """Back to ``saved``, with ``Rows`` already truncated to where it was saved."""


class Terminal:
    """The chain's last stage: turns the processed logits into one token per row."""

    name: str = "terminal"
    observes: bool = False  # ``observe`` changes its state (a given token must be judged, not just accepted)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities the token is chosen by, ``(rows, vocab)``, without choosing."""
        raise NotImplementedError

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token id per row, ``(rows,)``."""
        raise NotImplementedError

    def observe(self, distribution: torch.Tensor, tokens: list[int]) -> None:
        """Each row's token was given, not chosen (a text being scored): update any state
        as ``choose`` would have, had it drawn them. ``distribution`` is ``distribution``'s
        output for this step."""

    def verify(self, distribution: torch.Tensor, drafted: list[int], q: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Speculative decoding's choice: each row's token given that a drafter proposed
        ``drafted[row]``, drawn from ``q[row]`` ``(rows, vocab)``; and whether it is the
        drafted one. ``distribution`` is ``distribution``'s output for this step. The token
        must be distributed exactly as ``choose``'s would be."""
        raise NotImplementedError

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on; drop the state of the others."""

    def save(self) -> object:
        """As ``Stage.save``; random generators are not saved, so a restored chain draws
        on rather than replaying numbers a draft has already used."""
        return None

    def restore(self, saved: object) -> None:
        """Back to ``saved``."""


def stable_order(logits: torch.Tensor) -> torch.Tensor:
    """Token ids sorted by descending logit, ties by ascending id (so a filter keeps the
    same set on every run and device)."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices


def keep_sorted(logits: torch.Tensor, order: torch.Tensor, keep_in_order: torch.Tensor) -> torch.Tensor:
    """Mask to ``-inf`` every token whose entry in ``keep_in_order`` (laid out along
    ``order``) is False."""
    keep = torch.zeros_like(keep_in_order).scatter(-1, order, keep_in_order)
    return logits.masked_fill(~keep, NEG_INF)
