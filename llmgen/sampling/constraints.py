"""Stages that forbid or favour particular tokens, with transformers' semantics.

They change what the model prefers rather than the shape of the distribution, so they
apply under greedy decoding too, and they run before every other stage.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import NEG_INF, Rows, Stage


class LogitBias(Stage):
    """Add a fixed bias to chosen tokens' logits (``-inf`` bans a token), as transformers'
    ``SequenceBiasLogitsProcessor`` does for one-token sequences."""

    name = "logit-bias"
    warper = False

    def __init__(self, biases: dict[int, float], vocab: int, device: torch.device) -> None:
        self.bias = torch.zeros(vocab, device=device)
        for token, bias in biases.items():
            self.bias[token] += bias

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


class NoRepeatNGram(Stage):
    """Forbid any token that would repeat an n-gram already in the text (prompt included),
    as transformers' ``NoRepeatNGramLogitsProcessor``."""

    name = "no-repeat-ngram"
    warper = False

    def __init__(self, rows: Rows, n: int) -> None:
        self.rows, self.n = rows, n

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        banned = [(row, tok) for row, history in enumerate(self.rows.history) for tok in banned_by_ngrams(history, self.n)]
        return _ban(logits, banned)


def banned_by_ngrams(sequence: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in ``sequence``."""
    if n <= 0 or len(sequence) < n:
        return set()
    prefix = tuple(sequence[len(sequence) - n + 1 :])
    return {sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix}


class BadWords(Stage):
    """Forbid token sequences, as transformers' ``NoBadWordsLogitsProcessor``: a
    one-token sequence is always banned; a longer one bans its last token whenever the
    text ends with the rest of it. Sequences that are just an EOS token are ignored."""

    name = "bad-words"
    warper = False

    def __init__(self, rows: Rows, sequences: list[tuple[int, ...]], eos: tuple[int, ...]) -> None:
        self.rows = rows
        self.sequences = [s for s in sequences if not (len(s) == 1 and s[0] in eos)]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        banned = []
        for row, history in enumerate(self.rows.history):
            for seq in self.sequences:
                prefix = list(seq[:-1])
                if not prefix or history[len(history) - len(prefix) :] == prefix:
                    banned.append((row, seq[-1]))
        return _ban(logits, banned)


class MinNewTokens(Stage):
    """No end-of-sequence token until ``n`` tokens have been generated, as transformers'
    ``MinNewTokensLengthLogitsProcessor``."""

    name = "min-new-tokens"
    warper = False

    def __init__(self, rows: Rows, n: int, eos: tuple[int, ...]) -> None:
        self.rows, self.n, self.eos = rows, n, list(eos)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        early = [row for row in range(len(self.rows)) if self.rows.generated(row) < self.n]
        return _ban(logits, [(row, tok) for row in early for tok in self.eos])


def _ban(logits: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """``logits`` with each (row, token) pair set to ``-inf``."""
    if not pairs:
        return logits
    rows, tokens = zip(*pairs)
    out = logits.clone()
    out[list(rows), list(tokens)] = NEG_INF
    return out
