"""A GGUF file's metadata, read as typed values that are checked before anything uses them.

A GGUF is a file from anywhere: a key may be missing, hold a string where llama.cpp
writes an integer, a zero that would divide, or a number so large that what it sizes
could never be allocated. Each getter here takes one key and either returns a value the
conversion can trust or raises a one-line ``ModelError`` naming the file and the key,
so the tensors are never touched on the strength of a value nobody checked.
"""

from __future__ import annotations

import math
from pathlib import Path

from llmgen.errors import ModelError

REQUIRED = object()  # the default of a key the conversion cannot do without
# Counts are uint32 in llama.cpp; any wider value is not from a real model.
MAX_COUNT = 2**31 - 1
# The longest context of any published model is 10M tokens (Llama 4 Scout); the KV cache
# llmgen allocates for a chat is this long, so a larger claim would exhaust memory.
MAX_CONTEXT = 2**24


class Fields:
    """The metadata of one file, each value checked as it is read."""

    def __init__(self, reader, path: Path | str):
        self.reader = reader
        self.path = Path(path)
        self.arch = self.text("general.architecture")
        self._tokens = None

    def error(self, key: str, problem: str) -> ModelError:
        return ModelError(f"{self.path}: GGUF key {key!r} {problem}")

    def get(self, key: str, default=None):
        """The raw value, for keys whose use needs no check (names, flags to show)."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _present(self, key: str, default):
        value = self.get(key)
        if value is None and default is REQUIRED:
            raise self.error(key, "is missing")
        return value

    def integer(self, key: str, default=REQUIRED, low: int = 1, high: int = MAX_COUNT):
        """An integer in ``[low, high]``; a bool, float or string is refused, as llama.cpp refuses it."""
        value = self._present(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_shown(value)}")
        if not low <= value <= high:
            raise self.error(key, f"is {value}; it must be between {low} and {high}")
        return value

    def number(self, key: str, default=REQUIRED, positive: bool = True):
        """A finite real number (an integer is accepted), above zero when ``positive``."""
        value = self._present(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, not {_shown(value)}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise self.error(key, f"is {value}; it must be a finite number {'above 0' if positive else 'of 0 or more'}")
        return float(value)

    def text(self, key: str, default=REQUIRED):
        value = self._present(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_shown(value)}")
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_shown(value)}")
        return default if value is None else value

    def array(self, key: str, kinds: tuple[type, ...], default=REQUIRED) -> list | None:
        """A list whose items are all of ``kinds``."""
        value = self._present(key, default)
        if value is None:
            return default
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {_shown(value)}")
        bad = next((v for v in value if isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds)), None)
        if bad is not None:
            raise self.error(key, f"holds {_shown(bad)}; it must hold only {' or '.join(k.__name__ for k in kinds)} values")
        return value

    def arch_key(self, key: str) -> str:
        """The full name of an architecture's key: ``block_count`` -> ``llama.block_count``."""
        return f"{self.arch}.{key}"

    def tokens(self) -> list[str]:
        """The vocabulary, which every token id in the file indexes."""
        if self._tokens is None:
            tokens = self.array("tokenizer.ggml.tokens", (str,))
            if not tokens:
                raise self.error("tokenizer.ggml.tokens", "is empty")
            self._tokens = tokens
        return self._tokens

    def token_id(self, key: str) -> int | None:
        """A special token's id (BOS, EOS, unknown), which must name a token of the file."""
        value = self.integer(key, None, low=0)
        count = len(self.tokens())
        if value is not None and value >= count:
            raise self.error(key, f"is {value}, beyond the vocabulary: tokenizer.ggml.tokens has {count} tokens")
        return value


def _shown(value) -> str:
    """A wrong value as a short phrase: its type, and itself when that is short."""
    kind = "a list" if isinstance(value, list) else f"{type(value).__name__}"
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 20 else kind
