"""Stages that look back over the text: penalties for tokens that already occurred.

The window is the last ``repeat_last_n`` tokens of prompt and output together (the
whole text by default), as llama.cpp counts them for its penalties sampler.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import Rows, Stage


class Penalties(Stage):
    """Repetition (CTRL, as transformers), frequency and presence penalties (as llama.cpp).

    For each token seen ``c > 0`` times in the window: the repetition penalty divides a
    positive logit by ``penalty`` and multiplies a negative one, so it always lowers the
    token; then ``c * frequency + presence`` is subtracted.
    """

    name = "penalties"
    warper = False

    def __init__(self, rows: Rows, vocab: int, repetition: float, frequency: float = 0.0, presence: float = 0.0, last_n: int = -1) -> None:
        self.rows, self.repetition, self.frequency, self.presence = rows, repetition, frequency, presence
        self.last_n = last_n  # -1: the whole text
        self.counts = torch.zeros(len(rows), vocab, device=rows.device)  # (rows, vocab) occurrences in the window
        for row, history in enumerate(rows.history):
            window = history if last_n < 0 else history[max(0, len(history) - last_n) :] if last_n else []
            if window:
                self.counts[row].index_add_(0, torch.tensor(window, device=rows.device), torch.ones(len(window), device=rows.device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        seen = self.counts > 0
        if self.repetition != 1.0:
            penalised = torch.where(logits <= 0, logits * self.repetition, logits / self.repetition)
            logits = torch.where(seen, penalised, logits)
        if self.frequency or self.presence:
            logits = logits - self.counts * self.frequency - seen.float() * self.presence
        return logits

    def accept(self, tokens: list[int]) -> None:
        if self.last_n == 0:
            return
        rows = torch.arange(len(tokens), device=self.counts.device)
        self.counts.index_put_((rows, torch.tensor(tokens, device=rows.device)), torch.ones(len(tokens), device=rows.device), accumulate=True)
        if self.last_n > 0:  # the token that left each full window
            gone = [(r, h[-self.last_n - 1]) for r, h in enumerate(self.rows.history) if len(h) > self.last_n]
            if gone:
                index = torch.tensor(gone, device=rows.device).T
                self.counts.index_put_(tuple(index), -torch.ones(len(gone), device=rows.device), accumulate=True)

    def keep(self, rows: list[int]) -> None:
        self.counts = self.counts[rows]

    def save(self) -> torch.Tensor:
        return self.counts.clone()

    def restore(self, saved: torch.Tensor) -> None:
        self.counts = saved.clone()
