"""DRY ("Don't Repeat Yourself", by p-e-w), as llama.cpp implements it.

Where the end of the text repeats an earlier stretch of it, the token that followed
that stretch is what would continue the repetition. DRY penalises it by
``multiplier * base ** (length - allowed_length)``, with ``length`` the longest such
repeated stretch (at least ``allowed_length`` tokens) that the token would extend.
Sequence breakers (by default newline, colon, quote and asterisk) cut the look-back: a
repeat never reaches across the most recent breaker, and a token that is itself a
breaker is never penalised.
"""

from __future__ import annotations

import math

import torch

from llmgen.sampling.stage import Rows, Stage

MAX_EXPONENT_LOG = 88.7228391  # ln(FLT_MAX): llama.cpp caps the exponent so the penalty stays finite

# head token -> the token sequences that must follow it to complete a breaker
# (an empty tuple: the head alone contains a whole breaker).
Breakers = dict[int, list[tuple[int, ...]]]


class DRY(Stage):
    name = "dry"
    warper = False

    def __init__(self, rows: Rows, multiplier: float, base: float, allowed_length: int, last_n: int, breakers: Breakers) -> None:
        self.rows, self.multiplier, self.base, self.allowed = rows, multiplier, base, allowed_length
        self.last_n, self.breakers = last_n, breakers  # last_n -1: the whole text
        self.max_exponent = int(MAX_EXPONENT_LOG / math.log(base)) if base > 1.000001 else 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits
        for row, history in enumerate(self.rows.history):
            penalties = self.penalties(history)
            if penalties:
                if out is logits:
                    out = logits.clone()
                tokens = list(penalties)
                out[row, tokens] -= torch.tensor([penalties[t] for t in tokens], device=logits.device)
        return out

    def penalties(self, history: list[int]) -> dict[int, float]:
        """Token -> the amount DRY subtracts from its logit, after ``history``."""
        window = history if self.last_n < 0 else history[max(0, len(history) - self.last_n) :]
        n = len(window)
        if n <= self.allowed:
            return {}
        back = window[::-1]  # back[0] is the most recent token
        limit = self._repeat_limit(back)
        if limit < self.allowed:
            return {}
        longest: dict[int, int] = {}
        for k, match in enumerate(z_function(back)[1:], 1):
            length = min(match, limit)
            if length >= self.allowed:  # back[k..] repeats the end; back[k-1] followed that copy
                token = back[k - 1]
                longest[token] = max(longest.get(token, 0), length)
        out = {}
        for token, length in longest.items():
            if () in self.breakers.get(token, ()):
                continue  # a breaker itself is never penalised
            exponent = length - self.allowed
            if self.max_exponent > 0:
                exponent = min(exponent, self.max_exponent)
            out[token] = self.multiplier * self.base**exponent
        return out

    def _repeat_limit(self, back: list[int]) -> int:
        """How many tokens lie after the most recent complete breaker (all of them if none)."""
        for i, token in enumerate(back):
            tails = [t for t in self.breakers.get(token, ()) if len(t) <= i and all(t[o] == back[i - o - 1] for o in range(len(t)))]
            if tails:
                return i - max(len(t) for t in tails)
        return len(back)


def z_function(s: list[int]) -> list[int]:
    """z[k] = the length of the longest common prefix of ``s`` and ``s[k:]`` (z[0] = len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def breakers_from(texts: list[str], sequences: tuple[str, ...], encode) -> Breakers:
    """llama.cpp's restart sequences: a token whose text contains a whole breaker is a
    head with an empty tail; a token whose text ends with the start of a breaker is a
    head whose tail is the rest of the breaker, tokenised (at most 20 tokens).
    ``texts[i]`` is token i's text; ``encode`` tokenises without special tokens."""
    out: Breakers = {}
    for breaker in (b[:40] for b in sequences if b):
        for token, word in enumerate(texts):
            if breaker in word:
                _add(out, token, ())
                continue
            start = word.find(breaker[0])
            while start != -1:
                piece = word[start:]
                if breaker.startswith(piece):
                    _add(out, token, tuple(encode(breaker[len(piece) :])[:20]))
                start = word.find(breaker[0], start + 1)
    return out


def _add(out: Breakers, token: int, tail: tuple[int, ...]) -> None:
    tails = out.setdefault(token, [])
    if tail not in tails:
        tails.append(tail)
