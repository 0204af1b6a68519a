"""Settings that name tokens by text, turned into token ids once the tokenizer is known.

``--logit-bias`` names a token by id or by a text that must be exactly one token;
``--bad-words`` bans the token sequence of a text, both as written and, for a text that
does not start with a space, as a word inside a sentence (" word"), since byte-level
tokenizers spell the two differently; DRY's sequence breakers become restart sequences
over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmgen.config import SamplingConfig, SettingError, parse_bias
from llmgen.sampling.dry import Breakers, breakers_from


class Vocabulary:
    """A tokenizer seen as the sampler needs it: each token's text, and text -> ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: list[str] | None = None
        self._breakers: dict[tuple[str, ...], Breakers] = {}

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = self.tokenizer.decode_batch([[i] for i in range(self.size)], skip_special_tokens=False)
        return self._texts

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def unknown_id(self) -> int | None:
        """The id the tokenizer gives text it has no token for (None if it has no such token)."""
        unk = getattr(self.tokenizer.model, "unk_token", None)
        return self.tokenizer.token_to_id(unk) if unk else None

    def breakers(self, sequences: tuple[str, ...]) -> Breakers:
        if sequences not in self._breakers:
            self._breakers[sequences] = breakers_from(self.texts(), sequences, self.encode)
        return self._breakers[sequences]


@dataclass(frozen=True)
class TokenRules:
    """The token ids behind a config's text-valued settings."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_words: tuple[tuple[int, ...], ...] = ()
    dry_breakers: Breakers = field(default_factory=dict)
    grammar: Any = None  # constraint.Grammar: the constraint compiled for this vocabulary


def resolve_tokens(cfg: SamplingConfig, vocab: Vocabulary, vocab_size: int | None = None, eos: tuple[int, ...] = ()) -> TokenRules:
    """Resolve ``cfg``'s token-naming settings against ``vocab``; a name that is not one
    token is a ``SettingError`` for its field. A constraint is compiled for the model's
    ``vocab_size`` (its logits' width) with ``eos`` as the ids that may end it."""
    biases: dict[int, float] = {}
    for spec in cfg.logit_bias:
        token, bias = parse_bias(spec)
        tid = _one_token(token, vocab)
        biases[tid] = biases.get(tid, 0.0) + bias
    bad = []
    for text in cfg.bad_words:
        for variant in dict.fromkeys([text] + ([" " + text] if not text[:1].isspace() else [])):
            ids = tuple(vocab.encode(variant))
            if ids and ids not in bad:
                bad.append(ids)
    breakers = vocab.breakers(cfg.dry_sequence_breakers) if cfg.dry_multiplier > 0 else {}
    grammar = None
    if cfg.constraint:
        from llmgen.constraint import compile_for

        grammar = compile_for(cfg.constraint, vocab, vocab_size or vocab.size, eos)
    return TokenRules(biases, tuple(bad), breakers, grammar)


def _one_token(token: str, vocab: Vocabulary) -> int:
    if token.isdigit():
        tid = int(token)
        if tid >= vocab.size:
            raise SettingError("logit_bias", f"names token id {tid}, but the vocabulary has {vocab.size} tokens")
        return tid
    ids = vocab.encode(token)
    if len(ids) != 1:
        raise SettingError("logit_bias", f"needs TOKEN to be one token or an id: {token!r} is {len(ids)} tokens {ids}")
    if ids[0] == vocab.unknown_id() and vocab.texts()[ids[0]] != token:
        raise SettingError("logit_bias", f"needs TOKEN to be one token or an id: {token!r} is not in the vocabulary")
    return ids[0]
