"""Explore's actions as words: ``--script "take ' a'; greedy 3; export tree.json"`` and the
app's ``:`` command line read the same language, checked before anything runs.

``parse`` turns a script into ``Action``s (a usage error names the action it cannot
read); ``apply`` performs one on a ``Session`` and says in a line what happened.
``show``, ``tree`` and ``export`` produce views and files, so the caller handles them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from llmgen.config import read_escapes
from llmgen.errors import LlmgenError, UsageError

# name -> (how its arguments read, in help and errors; how many integers it takes)
GRAMMAR: dict[str, tuple[str, int]] = {
    "take": ("take TEXT | take id N", 0),
    "back": ("back [N]", 0),
    "greedy": ("greedy N", 1),
    "sample": ("sample N", 1),
    "beam": ("beam WIDTH N", 2),
    "exact": ("exact N", 1),
    "set": ("set NAME VALUE", 0),
    "export": ("export PATH (.json, .svg or .html)", 0),
    "show": ("show", 0),
    "tree": ("tree", 0),
}
EXPORT_KINDS = (".json", ".svg", ".html")


@dataclass(frozen=True)
class Action:
    """One action: its name, its arguments (ints already parsed) and its text as written."""

    name: str
    args: tuple
    source: str


def split(script: str) -> list[str]:
    """The actions of a script: its parts between semicolons outside quotes."""
    parts, current, quote = [], [], None
    for c in script:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ";":
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse(script: str, label: str = "--script action") -> list[Action]:
    """Every action of ``script``; a ``UsageError`` says which (``label`` N, from 1) and why."""
    actions = [parse_one(text, f"{label} {i} ({text})") for i, text in enumerate(split(script), 1)]
    if not actions:
        raise UsageError(f"{label.split()[0]}: no action given")
    return actions


def parse_one(text: str, where: str) -> Action:
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    name, args = words[0], words[1:]
    if name not in GRAMMAR:
        raise UsageError(f"{where}: unknown action {name!r} (known: {', '.join(GRAMMAR)})")
    usage, ints = GRAMMAR[name]
    try:
        return Action(name, _arguments(name, args, ints), text)
    except ValueError as e:
        raise UsageError(f"{where}: {e} (usage: {usage})") from None


def _arguments(name: str, args: list[str], ints: int) -> tuple:
    if ints:
        if len(args) != ints:
            raise ValueError(f"takes {ints} number{'s' * (ints > 1)}, got {len(args)}")
        return tuple(_positive(a) for a in args)
    if name == "take":
        if len(args) == 2 and args[0] == "id":
            return ("id", _count(args[1], "a token id", 0))
        if len(args) != 1:
            raise ValueError("takes one TEXT (quote it: take ' a') or id N")
        return ("text", read_escapes(args[0]))
    if name == "back":
        if len(args) > 1:
            raise ValueError("takes at most one number")
        return (_positive(args[0]),) if args else (1,)
    if name == "set":
        if len(args) != 2:
            raise ValueError("takes a NAME and a VALUE")
        return tuple(args)
    if name == "export":
        if len(args) != 1 or not args[0].lower().endswith(EXPORT_KINDS):
            raise ValueError("takes one PATH ending in .json, .svg or .html")
        return tuple(args)
    if args:
        raise ValueError("takes nothing")
    return ()


def _positive(text: str) -> int:
    return _count(text, "a number", 1)


def _count(text: str, what: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {what}") from None
    if value < least:
        raise ValueError(f"{text!r} must be >= {least}")
    return value


def apply(session, action: Action) -> str:
    """Perform a tree or model action on ``session``; a line saying what it did.
    ``show``, ``tree`` and ``export`` are the caller's (they make views)."""
    token_text = session.ckpt.token_text
    name, args = action.name, action.args
    if name == "take":
        tokens = [args[1]] if args[0] == "id" else session.encode(args[1])
        for token in tokens:
            node = session.take(token)
        return f"took {', '.join(repr(token_text(t)) for t in tokens)} · Σ={node.cumulative:.3f}"
    if name == "back":
        for _ in range(args[0]):
            session.back()
        return f"back at depth {session.node.depth}"
    if name in ("greedy", "sample"):
        seed = session.next_seed
        made = getattr(session, name)(args[0])
        return f"{name}: {len(made)} tokens, {session.ckpt.decode([n.token_id for n in made])!r}" + (
            f" (seed {seed})" if name == "sample" else "")
    if name == "beam":
        ends = session.beam(*args)
        return f"beam: {len(ends)} branches; the best ends {token_text(ends[0].token_id)!r} ({ends[0].marks['beam']})"
    if name == "exact":
        end, proven = session.exact(args[0])
        return f"exact: the optimum ends {token_text(end.token_id)!r}, Σ={end.cumulative:.3f}" + ("" if proven else " (not proven)")
    if name == "set":
        session.set(*args)
        return f"{args[0]} = {args[1]}"
    raise LlmgenError(f"{name} is not a tree action")
