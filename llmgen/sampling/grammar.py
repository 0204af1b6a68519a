"""The constraint stage: a grammar (JSON Schema, regex, choices, Lark) that masks every
token which would take the text out of its language.

It runs first in the chain, so every later stage sees the constrained distribution.
Each row owns an llguidance matcher, advanced in ``accept``; rows that beam search
duplicates get copies (``keep``); ``save``/``restore`` roll the matchers back when a
speculative drafter takes its draft back. The end-of-sequence token passes the mask only
where the grammar accepts the text so far; ``complete`` says when a row's text is
finished (the grammar allows nothing more, or it took the EOS token), which the decode
loops report as ``finish_reason: "constraint"``.

``kept`` is what the constraint cost at the last step: per row, the log of the
probability the model's own distribution gave the tokens it allowed (0 when it removed
nothing; the removed mass is 1 - exp of it).
"""

from __future__ import annotations

import torch

from llmgen.errors import LlmgenError
from llmgen.sampling.stage import NEG_INF, Rows, Stage


def allowed_tokens(grammar, matchers: list, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which tokens each of ``grammar``'s matchers allows next, ``(rows, vocab_size)`` bool.
    (llguidance.torch would fill the masks too, but importing it imports torch._dynamo: 2 s.)"""
    import numpy as np

    masks = np.frombuffer(b"".join(m.compute_bitmask() for m in matchers), np.uint8).reshape(len(matchers), -1)
    bits = np.unpackbits(masks, axis=1, bitorder="little")[:, :vocab_size]  # (rows, vocab) 0/1, token i at bit i
    # llguidance also sets EOS where no token can go on; EOS is allowed only where the text is complete
    eos = [t for t in grammar.adapter.eos_tokens if t < vocab_size]
    for row, m in enumerate(matchers):
        if eos and not m.is_accepting():
            bits[row, eos] = 0
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.bool_)).to(device)


class Constrain(Stage):
    """Mask the tokens the grammar does not allow next (see the module's docstring)."""

    name = "constraint"
    warper = False
    truncates = True

    def __init__(self, rows: Rows, grammar) -> None:
        self.grammar = grammar
        self.matchers = [grammar.matcher() for _ in range(len(rows))]
        self.consumed = [0] * len(rows)
        self.left = [False] * len(rows)  # a given token (a scored text) took the row out of the language
        self.kept: list[float] = [0.0] * len(rows)  # per row, log of the probability the last step kept

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = allowed_tokens(self.grammar, self.matchers, logits.shape[-1], logits.device)
        some = allowed.any(-1).tolist()
        if not all(some) and any(not ok and not left for ok, left in zip(some, self.left)):
            raise LlmgenError(f"the {self.grammar.kind.replace('_', ' ')} constraint cannot go on with this model's "
                              "vocabulary: no token continues the text it has so far")
        # A row already outside the language has nothing more to be constrained: the
        # token that left was the one the constraint removed.
        allowed[[row for row, left in enumerate(self.left) if left]] = True
        masked = logits.masked_fill(~allowed, NEG_INF)
        self.kept = (torch.logsumexp(masked, -1) - torch.logsumexp(logits, -1)).tolist()  # log(allowed mass), exact near 0 and 1
        return masked

    def accept(self, tokens: list[int]) -> None:
        for row, (m, token) in enumerate(zip(self.matchers, tokens)):
            if not self.left[row] and not m.consume_token(token):  # a scored text's token outside the language
                self.left[row] = True
            self.consumed[row] += 1

    def keep(self, rows: list[int]) -> None:
        seen: set[int] = set()
        matchers = []
        for r in rows:  # a row kept twice (beam search) gets a copy of its own
            matchers.append(self.matchers[r] if r not in seen else self.matchers[r].deep_copy())
            seen.add(r)
        self.matchers = matchers
        self.consumed = [self.consumed[r] for r in rows]
        self.left = [self.left[r] for r in rows]
        self.kept = [self.kept[r] for r in rows]

    def save(self) -> tuple[list[int], list[bool]]:
        return list(self.consumed), list(self.left)

    def restore(self, saved: tuple[list[int], list[bool]]) -> None:
        consumed, left = saved
        for m, now, then in zip(self.matchers, self.consumed, consumed):
            if now > then:
                m.rollback(now - then)
        self.consumed, self.left = list(consumed), list(left)

    def complete(self, row: int) -> bool:
        """The row's text is finished: the grammar allows nothing more, or took EOS."""
        m = self.matchers[row]
        return m.is_stopped() and not m.is_error()


class Matchers:
    """One matcher per sequence, for the searches that keep their own rows rather than a
    sampler chain (beam, exact): which tokens each allows, whether a token would finish
    one, and the rows that go on after a step."""

    def __init__(self, grammar, rows: int) -> None:
        self.grammar = grammar
        self.rows = [grammar.matcher() for _ in range(rows)]

    def allowed(self, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return allowed_tokens(self.grammar, self.rows, vocab_size, device)

    def finishes(self, row: int, token: int) -> bool:
        """Whether ``token`` (an allowed one) completes row ``row``'s text: the grammar
        took EOS, or allows nothing after it."""
        m = self.rows[row].deep_copy()
        m.consume_token(token)
        return m.is_stopped()

    def follow(self, parents: list[int], tokens: list[int]) -> None:
        """The next rows: row i continues ``parents[i]`` with ``tokens[i]``."""
        rows = []
        for parent, token in zip(parents, tokens):
            m = self.rows[parent].deep_copy()
            m.consume_token(token)
            rows.append(m)
        self.rows = rows
