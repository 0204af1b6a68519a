"""The chain's last stage, which picks the token: greedy, or a seeded draw.

As in llama.cpp (``greedy``, ``dist``), choosing is a stage like the others, so no
decode loop has an "if greedy" branch, and the draw owns its generators. Each terminal
also knows how to judge a drafted token for speculative decoding (``verify``): greedy
keeps it when it is the argmax; a draw applies speculative sampling's rule
(``speculative_rule``) with its own generators, so a seeded run repeats.
"""

from __future__ import annotations

import math

import torch

from llmgen.sampling.stage import Rows, Terminal


class Greedy(Terminal):
    """The most probable token; among equals, the lowest id (``argmax`` returns the first)."""

    name = "greedy"

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def verify(self, distribution: torch.Tensor, drafted: list[int], q: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        tokens = distribution.argmax(-1)
        return tokens, [t == d for t, d in zip(tokens.tolist(), drafted)]


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

    def verify(self, distribution: torch.Tensor, drafted: list[int], q: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        return speculative_rule(distribution, drafted, q, self.generators)

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]


def speculative_rule(p: torch.Tensor, drafted: list[int], q: torch.Tensor, generators: list[torch.Generator]
                     ) -> tuple[torch.Tensor, list[bool]]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), row by row: keep the
    drafted token x with probability min(1, p(x)/q(x)), else draw from max(0, p - q)
    renormalised. Whatever q is, the token is then distributed exactly as p: the draft
    decides how often the model's one pass yields several tokens, never which text.

    ``p`` and ``q`` are ``(rows, vocab)``; a deterministic draft (prompt lookup) is a point
    mass q, where the rule keeps x with probability p(x) and otherwise draws from p
    without x. Both random numbers come from the row's generator, so a seed repeats."""
    tokens, kept = [], []
    for pr, qr, x, g in zip(p, q, drafted, generators):
        u = float(torch.rand(1, generator=g, device=g.device))
        if u * float(qr[x]) < float(pr[x]):  # u < p(x)/q(x), without dividing by a tiny q(x)
            tokens.append(x)
            kept.append(True)
            continue
        residual = (pr - qr).clamp(min=0)
        if not residual.sum() > 0:  # p = q up to rounding: rejection had probability 0
            residual = pr
        tokens.append(int(torch.multinomial(residual, 1, generator=g)))  # multinomial renormalises
        kept.append(False)
    return torch.tensor(tokens, device=p.device), kept


class Mirostat(Terminal):
    """Mirostat (Basu et al.), as llama.cpp: aim for a target surprise ``tau`` (in bits)
    per token. Each row keeps ``mu``, starting at 2·tau; a step truncates the
    distribution by ``mu``, draws, and moves ``mu`` by ``eta`` times the gap between the
    drawn token's surprise (under the truncated, renormalised distribution) and tau.

    Version 2 keeps the tokens whose surprise is at most ``mu``. Version 1 estimates the
    Zipf exponent ŝ from the top 100 probabilities and keeps the top
    k = ((ŝ-1)·2^mu / (1 - V^(1-ŝ)))^(1/ŝ) tokens, V the vocabulary size.
    """

    name = "mirostat"
    observes = True

    def __init__(self, rows: Rows, version: int, tau: float, eta: float, vocab_size: int) -> None:
        self.version, self.tau, self.eta, self.vocab_size = version, tau, eta, vocab_size
        self.mu = [2.0 * tau] * len(rows)
        self.generators = rows.generators()

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._truncated(row, mu) for row, mu in zip(logits, self.mu)])

    def _truncated(self, logits: torch.Tensor, mu: float) -> torch.Tensor:  # (vocab,)
        probs = torch.softmax(logits, dim=-1)
        order = torch.sort(probs, descending=True, stable=True).indices
        if self.version == 2:
            keep = int((-torch.log2(probs[order]) <= mu).sum())
        else:
            keep = self._zipf_k(probs[order], mu)
        kept = torch.zeros_like(probs)
        top = order[: max(1, keep)]
        kept[top] = probs[top]
        return kept / kept.sum()

    def _zipf_k(self, sorted_probs: torch.Tensor, mu: float) -> int:
        p = sorted_probs[sorted_probs > 0][:100].double()
        if len(p) < 2:
            return 1
        i = torch.arange(len(p) - 1, dtype=torch.float64)
        t = torch.log((i + 2) / (i + 1))
        b = torch.log(p[:-1] / p[1:])
        s_hat = float((t * b).sum() / (t * t).sum())
        eps = s_hat - 1
        try:
            k = (eps * 2.0**mu / (1 - self.vocab_size ** (-eps))) ** (1 / s_hat)
        except ZeroDivisionError:  # ŝ = 1: llama.cpp computes 0/0 and keeps one token
            return 1
        except OverflowError:
            return len(sorted_probs)
        if isinstance(k, complex) or math.isnan(k):
            return 1
        return int(min(k, len(sorted_probs)))

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        dist = self.distribution(logits)
        tokens = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(dist, self.generators)])
        self.observe(dist, tokens.tolist())
        return tokens

    def verify(self, distribution: torch.Tensor, drafted: list[int], q: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        tokens, kept = speculative_rule(distribution, drafted, q, self.generators)
        self.observe(distribution, tokens.tolist())
        return tokens, kept

    def observe(self, distribution: torch.Tensor, tokens: list[int]) -> None:
        """Move each row's ``mu`` by the token's surprise. A token the truncation removed
        (a scored text the sampler could not have written) leaves ``mu`` as it was: its
        surprise is infinite, and no draw could have produced it."""
        for row, token in enumerate(tokens):
            p = float(distribution[row, token])
            if p > 0:
                self.mu[row] -= self.eta * (-math.log2(p) - self.tau)

    def keep(self, rows: list[int]) -> None:
        self.mu = [self.mu[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]

    def save(self) -> list[float]:
        return list(self.mu)

    def restore(self, saved: list[float]) -> None:
        self.mu = list(saved)
