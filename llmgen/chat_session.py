"""A multi-turn conversation with one model, its KV cache kept from turn to turn.

Each reply is generated from the whole conversation rendered in the model's chat
template. Templates only append, so the ids of the conversation so far start with the
ids already in the cache: a new turn prefills just the tokens after them (the new user
message and the template's markers). Where a template rewrites earlier text (some drop
old thinking blocks), the cache is cut back to the longest shared prefix and the rest
is prefilled; the reply is the same either way, only the work differs.

A model without a chat template gets a plain continuation session: the text so far, the
new line, and the model continues it.

The session computes and records; ``cli.chat`` reads input, handles the slash commands
and prints. Nothing here writes to a terminal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgen import chat as chats
from llmgen import orchestrate as orch
from llmgen.errors import LlmgenError


@dataclass
class TurnStats:
    """What one reply cost: tokens prefilled (not the whole conversation, when the
    cache held its start) and tokens generated."""

    conversation_tokens: int
    prefilled: int
    generated: int


@dataclass
class ChatSession:
    ckpt: Any
    settings: dict[str, Any]
    system: str | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    stats: list[TurnStats] = field(default_factory=list)
    last: Any = None  # the last reply's Sample, with its steps (for /probs)
    last_prompt: list[int] = field(default_factory=list)  # the ids that reply answered (for /tree)
    template: str | None = None  # the name of the chat template to use (--chat-template), else default

    def __post_init__(self) -> None:
        """The chat template is found and read once, so a missing one named by
        --chat-template, or an unreadable file, stops the session before its first turn."""
        wanted = self.template is not None or chats.has_template(self.ckpt.path)
        self.chat_template = chats.load(self.ckpt.path, self.template) if wanted else None
        self.templated = self.chat_template is not None
        self.cache = self.ckpt.model.new_cache(1, self.ckpt.model.cfg.context_length)
        self.cached: list[int] = []  # the ids whose keys and values the cache holds, in order

    # -- the conversation

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        """The system message, if any, then ``messages`` (default: the whole exchange)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + (
            self.messages if messages is None else messages)

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """The conversation (or its first ``messages``) as the model sees it, ending where
        the reply begins."""
        turns = self.conversation(messages)
        if self.templated:
            return self.ckpt.encode(self.chat_template.render(turns, self.ckpt.model.cfg.context_length), special=False)
        return orch.prompt_ids(self.ckpt, "".join(m["content"] for m in turns))

    def last_turn_prompt(self) -> list[int]:
        """The ids the last reply answered (also for a transcript just loaded)."""
        if self.last_prompt:
            return self.last_prompt
        messages = self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages
        if not messages:
            raise LlmgenError("no turn yet")
        return self.prompt_ids(messages)

    def reply(self, text: str, on_token=None):
        self.messages.append({"role": "user", "content": text if self.templated else self._continued(text)})
        return self._answer(on_token)

    def retry(self, on_token=None):
        """The last reply again (a new draw when sampling)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise LlmgenError("nothing to retry yet")
        self.messages.pop()
        return self._answer(on_token)

    def undo(self) -> None:
        """Forget the last exchange: its reply and the user turn it answered."""
        if not self.messages:
            raise LlmgenError("nothing to undo")
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def _continued(self, text: str) -> str:
        """A plain session's new line: on a line of its own after the text so far."""
        return ("\n" if self.messages else "") + text

    def _answer(self, on_token):
        from llmgen.decoding.greedy_sample import Row, generate_batch

        ids = self.prompt_ids()
        self.last_prompt = ids
        seed = None if self.seed is None else self.seed + len(self.stats)
        gen = orch.generation(self.ckpt, self.settings, seed=seed, chat=self.templated)
        shared = _shared_prefix(self.cached, ids)
        chosen: list[int] = []

        def record(row, token, logprob, entropy, delta):
            chosen.append(token)
            if on_token is not None:
                on_token(row, token, logprob, entropy, delta)

        try:
            sample = generate_batch(self.ckpt.model, [Row(ids, gen.seed, gen.max_new_tokens)], gen, self.ckpt.decode,
                                    on_token=record, trace_top=6, cache=self.cache, cached=shared)[0]
        except KeyboardInterrupt:  # Ctrl-C stopped the reply: keep what was said of it
            self.messages.append({"role": "assistant", "content": self.ckpt.decode(chosen)})
            raise
        finally:  # either way, the cache holds what it holds
            self.cached = (ids + chosen)[: self.cache.length]
        self.messages.append({"role": "assistant", "content": sample.text})
        self.stats.append(TurnStats(len(ids), len(ids) - shared, len(sample.token_ids)))
        self.last = sample
        return sample

    # -- settings and transcripts

    def set(self, name: str, value: str) -> None:
        """``/set NAME VALUE``: any sampling setting, checked like its flag."""
        from llmgen import config

        key, value = config.parse_text(name, value)
        self.settings[key] = value

    def save(self, path: Path) -> None:
        """The transcript as JSONL: one message a line, the system message first."""
        path.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self.conversation()))

    def load(self, path: Path) -> None:
        try:
            lines = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise LlmgenError(f"{path}: not a transcript ({e})") from None
        if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                   for m in lines):
            raise LlmgenError(f"{path}: every line must be {{\"role\": system|user|assistant, \"content\": TEXT}}")
        self.system = next((m["content"] for m in lines if m["role"] == "system"), None)
        self.messages = [m for m in lines if m["role"] != "system"]
        self.last, self.last_prompt = None, []


def _shared_prefix(cached: list[int], ids: list[int]) -> int:
    """How many leading ids the cache can keep: the shared prefix, less one, so at least
    one token is run through the model to give the next logits."""
    n = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        n += 1
    return min(n, len(ids) - 1)
