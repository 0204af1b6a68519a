"""Constrained generation's languages: what the user wrote (a JSON Schema, ``--format
json``, a regex, choices, a Lark grammar) turned into an llguidance grammar, checked, and
compiled against a model's vocabulary.

llguidance (Microsoft's, in Rust) does the work: it compiles JSON Schema, regexes and
Lark to a lexer and an Earley parser over bytes and computes, per step, which tokens of
a Hugging Face ``tokenizers`` vocabulary keep the text inside the language. It was
chosen over xgrammar by measured mask time and weight (README, "Constrained
generation"). It is an optional extra, imported only when a constraint is given.

Choices are matched at the token level: each choice is its tokenizer's own
tokenization, so a choice's probability is exactly what ``llmgen score`` gives it, and
no choice is reached through an odd split the model never saw in training.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from llmgen.config import CONSTRAINT_KINDS, SettingError
from llmgen.errors import UsageError

INSTALL = 'pip install -c constraints.txt -e ".[constrain]"'
# JSON is written as Python's json.dumps writes it (", " and ": ", no newlines): a model
# then spends no probability on whitespace, and constraint_mass shows what that costs.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
SEARCH_BUDGET = 2000  # matcher states tried while proving a grammar can be finished with a vocabulary


def llguidance():
    """The llguidance module, or a one-line error naming the extra that installs it."""
    try:
        import llguidance as lg
    except ImportError:
        raise UsageError(f"constrained generation needs llguidance: in llmgen's source tree, {INSTALL}") from None
    return lg


def _one_line(message: str) -> str:
    """llguidance's error (several lines, with a caret) as one line: its first line, and
    the line that says what is wrong when that comes later."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    first = lines[0].split(": ", 1)[1] if lines and lines[0].startswith("at ") and ": " in lines[0] else (lines or [""])[0]
    detail = next((ln.removeprefix("error: ") for ln in lines[1:] if ln.startswith("error:")), "")
    return f"{first.rstrip(':')}: {detail}" if detail else first.rstrip(":")


def schema_text(value: Any) -> str:
    """A JSON Schema as the setting holds it (JSON text), from an object or from text."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def grammar_source(kind: str, value: Any) -> str | None:
    """The llguidance grammar for a setting that needs no vocabulary (choices do: None);
    a ``ValueError`` with one line saying what is wrong."""
    lg = llguidance()
    if kind in ("json_schema", "format"):
        schema = json.loads(value) if kind == "json_schema" else ANY_OBJECT
        if not isinstance(schema, (dict, bool)):
            raise ValueError("is not a JSON Schema (an object)")
        source = lg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
    elif kind == "regex":
        source = lg.LLMatcher.grammar_from_regex(value)
    elif kind == "grammar":
        source = lg.LLMatcher.grammar_from_lark(value)
    else:
        return None
    problem = lg.LLMatcher.validate_grammar(source)
    if problem and not problem.startswith("WARNING"):
        raise ValueError(_one_line(problem))
    return source


def problem(kind: str, value: Any) -> str | None:
    """What is wrong with a constraint setting's value, as the end of a one-line error (None if nothing)."""
    if kind == "choice":
        return None if all(value) else "must not be empty"
    try:
        grammar_source(kind, value)
    except json.JSONDecodeError as e:
        return f"is not JSON ({e.msg}, line {e.lineno} column {e.colno})"
    except ValueError as e:
        return f"is invalid: {e}"
    return None


@lru_cache(maxsize=4)
def _adapter(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]):
    """llguidance's view of a vocabulary (its token trie): built once per tokenizer. A
    model without an end-of-sequence id gets one past its vocabulary, which it never
    writes, so a grammar there ends only when it allows nothing more."""
    lg = llguidance()
    n_vocab, eos_ids = (vocab_size, list(eos)) if eos else (vocab_size + 1, [vocab_size])
    try:
        return lg.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos_ids)
    except ValueError:  # a tokenizer.json llguidance cannot read (no decoder): give it each token's text
        return lg.LLTokenizer(lg.TokenizerWrapper(_Spelled(tokenizer_json, eos_ids[0])), n_vocab=n_vocab, eos_token=eos_ids)


class _Spelled:
    """A vocabulary as llguidance's ``TokenizerWrapper`` reads one: each token's bytes
    (its text as the tokenizer decodes it alone), and text -> ids."""

    def __init__(self, tokenizer_json: str, eos: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        size = self.tokenizer.get_vocab_size()
        self.tokens = [t.encode() for t in self.tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)]
        self.eos_token_id, self.bos_token_id = eos, None

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


# The bytes of UTF-8 text other than control characters and the planes past U+3FFFF
# (unassigned, or tags): SmolLM2's vocabulary, for one, has no token for \x04 or 0xF1.
TEXT_BYTES = frozenset([0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF1)])


@lru_cache(maxsize=4)
def _spells_text(adapter, vocab_size: int) -> bool:
    """Whether each byte of ``TEXT_BYTES`` is a token of its own (byte-level BPE: GPT-2,
    SmolLM2, Llama 3, Qwen): then any such text can be written, and the search that
    proves a grammar can be finished is skipped. A grammar that needs a rarer byte the
    vocabulary lacks fails at the step that needs it, with a one-line error."""
    singles = {adapter.decode_bytes([i]) for i in range(vocab_size)}
    return all(bytes([b]) in singles for b in TEXT_BYTES)


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled against one vocabulary: what each row's matcher starts from.
    It holds the vocabulary as text, not llguidance's object, so it pickles (``batch
    --ray`` sends jobs to workers); the object is rebuilt once per process (``_adapter``
    is cached)."""

    kind: str  # which setting it came from
    source: str  # the llguidance grammar
    tokenizer_json: str = field(repr=False)
    vocab_size: int  # the model's: masks are this wide
    eos: tuple[int, ...]

    @property
    def adapter(self):  # llguidance.LLTokenizer
        return _adapter(self.tokenizer_json, self.vocab_size, self.eos)

    def matcher(self):
        lg = llguidance()
        return lg.LLMatcher(self.adapter, self.source, log_level=0)

    def accepts(self, token_ids: list[int]) -> bool:
        """Whether these tokens are a complete string of the language."""
        m = self.matcher()
        return m.consume_tokens(token_ids) and m.is_accepting()


def compile_for(values: dict[str, Any], vocabulary, vocab_size: int, eos: tuple[int, ...]) -> Grammar | None:
    """The constraint that ``values`` (a SamplingConfig's fields) sets, compiled for this
    vocabulary; None when none is set. A constraint the vocabulary cannot satisfy is a
    ``SettingError`` for its field, before anything is generated."""
    kind = next((k for k in CONSTRAINT_KINDS if values.get(k)), None)
    if kind is None:
        return None
    tokenizer_json = _tokenizer_json(vocabulary)
    source = _choices(values[kind], vocabulary) if kind == "choice" else grammar_source(kind, values[kind])
    grammar = Grammar(kind, source, tokenizer_json, vocab_size, tuple(eos))
    adapter = grammar.adapter
    m = grammar.matcher()
    if m.is_error():
        raise SettingError(kind, f"cannot be used with this vocabulary: {_one_line(m.get_error())}")
    # Choices are spelled by construction; a vocabulary with a token for every byte spells any text.
    if kind != "choice" and not _spells_text(adapter, vocab_size) and finishable(grammar) is False:
        raise SettingError(kind, "cannot be satisfied with this model's vocabulary: no sequence of its tokens spells a string it allows")
    return grammar


_JSON: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_json(vocabulary) -> str:
    """The vocabulary's tokenizer.json text, one string per vocabulary, so that every
    grammar compiled for it shares it (a pickle of many jobs then carries it once)."""
    if vocabulary not in _JSON:
        _JSON[vocabulary] = vocabulary.tokenizer.to_str()
    return _JSON[vocabulary]


def _choices(choices: tuple[str, ...], vocabulary) -> str:
    """A token-level Lark grammar: each choice as its tokenizer's own token ids. A choice
    the tokenizer cannot spell (a character it maps to an unknown token) is an error."""
    alternatives = []
    for choice in choices:
        ids = vocabulary.encode(choice)
        if not ids or vocabulary.tokenizer.decode(ids, skip_special_tokens=False) != choice:
            raise SettingError("choice", f"{choice!r} cannot be written with this model's vocabulary")
        alternatives.append("".join(f"<[{i}]>" for i in ids))
    return llguidance().LLMatcher.grammar_from_lark("start: " + " | ".join(dict.fromkeys(alternatives)))


def finishable(grammar: Grammar, budget: int = SEARCH_BUDGET) -> bool | None:
    """Whether some sequence of the vocabulary's tokens is a complete string of the
    language: True when one is found, False when every allowed path was tried and none
    finished, None when the budget of matcher states ran out first (generation then
    finds out, and says so if it gets stuck). Depth first, shortest tokens first: for
    vocabularies that lack some bytes (word-level, SentencePiece without byte fallback)."""
    import torch

    from llmgen.sampling.grammar import allowed_tokens

    lengths = torch.tensor([len(grammar.adapter.decode_bytes([i])) for i in range(grammar.vocab_size)])
    shortest_first = torch.argsort(lengths, stable=True)

    def children(m):
        allowed = allowed_tokens(grammar, [m], grammar.vocab_size)[0]
        return iter(shortest_first[allowed[shortest_first]].tolist())

    root = grammar.matcher()
    stack, spent = [(root, children(root))], 0
    while stack:
        m, todo = stack[-1]
        if m.is_accepting():
            return True
        tok = next(todo, None)
        if tok is None or m.is_stopped():
            stack.pop()
            continue
        if spent == budget:
            return None
        spent += 1
        child = m.deep_copy()
        if child.consume_token(tok):
            stack.append((child, children(child)))
    return False
