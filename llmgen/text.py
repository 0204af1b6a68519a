"""Turning a growing list of token ids into text that is safe to show as it grows.

Two things make this more than ``decode(ids)``: a byte-level token can end in the middle
of a UTF-8 character (decoding then yields U+FFFD until the next token completes it), and
a stop string may span several tokens, so text that might be the start of one is held
back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` at or after ``start``, or None."""
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


class ContinuationText:
    """The text of one continuation, fed a token at a time.

    ``push`` returns the newly safe text and whether a stop string has now appeared;
    ``text`` is the final text, cut just before the stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = []
        self._full = ""
        self._emitted = 0
        self._cut: int | None = None

    @property
    def text(self) -> str:
        return self._full if self._cut is None else self._full[: self._cut]

    @property
    def stopped(self) -> bool:
        return self._cut is not None

    def push(self, token_id: int) -> tuple[str, bool]:
        self._ids.append(token_id)
        previous = len(self._full)
        self._full = self._decode(self._ids)
        if self._stops:
            cut = find_stop(self._full, self._stops, max(0, previous - self._holdback))
            if cut is not None:
                self._cut = cut
                return self.flush(), True
        safe = len(self._full) - self._holdback
        if self._full.endswith(REPLACEMENT):
            safe = min(safe, len(self._full.rstrip(REPLACEMENT)))
        return self._take(safe), False

    def flush(self) -> str:
        """Everything not yet returned, once the continuation is over."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._full[self._emitted : end]
        self._emitted = end
        return delta
