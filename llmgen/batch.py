"""Generating for a file of prompts: JSONL out, batch by batch, safe to interrupt.

Records are grouped by sampling settings, sorted by prompt length to reduce padding,
and generated in batches (``decoding.greedy_sample.generate_batch``). Each batch's
records are appended and flushed as soon as they are done, so after a crash or
``kill -9`` re-running the same command repairs a torn last line, skips the records
already written and generates only the rest. Every record carries its ``index`` (its
position in the input), so the output can be put back in input order with
``jq -s 'sort_by(.index)[]'``.

Seeds: a record's own ``seed``, else ``--seed`` + index (a random base when no
``--seed``; a resumed run reuses the base the first run wrote down in its records).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgen import config
from llmgen.errors import LlmgenError, UsageError

# A record may set any generation setting by its name (``top_p``), besides these.
RECORD_KEYS = {"prompt", "id", "seed", *config.BY_NAME}
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class InputRecord:
    index: int
    line: int
    prompt: str = ""
    id: Any = None
    seed: int | None = None
    overrides: dict = field(default_factory=dict)  # settings the record gives, checked
    error: str | None = None


def parse_shard(value: str | None) -> tuple[int, int]:
    if value is None:
        return 0, 1
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard I/N needs 0 <= I < N, got {value!r}")
    return i, n


def read_input(path: str, stdin=None) -> list[InputRecord]:
    """Every record of INPUT, each with an ``error`` if it is malformed (never raised here)."""
    if path == "-":
        raw = (stdin or sys.stdin.buffer).read()
        name = "<stdin>"
        jsonl = raw.lstrip()[:1] == b"{"
    else:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise LlmgenError(f"{path}: cannot read input ({e.strerror or e})") from None
        name, jsonl = path, p.suffix.lower() in JSONL_SUFFIXES
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LlmgenError(f"{name}:{line}: not valid UTF-8") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = InputRecord(index=len(records), line=number)
        if jsonl:
            _parse_json_record(rec, line)
        else:
            rec.prompt = line
        records.append(rec)
    return records


def _parse_json_record(rec: InputRecord, line: str) -> None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        rec.error = f"not JSON ({e.msg})"
        return
    if not isinstance(obj, dict):
        rec.error = "expected a JSON object"
        return
    unknown = set(obj) - RECORD_KEYS
    if unknown:
        rec.error = f"unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(RECORD_KEYS))})"
        return
    if not isinstance(obj.get("prompt"), str):
        rec.error = 'needs a "prompt" string'
        return
    rec.prompt, rec.id = obj["prompt"], obj.get("id")
    try:
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise config.SettingError("seed", "must be a number (integer)")
        config.check_seed(seed)
        rec.seed = seed
        for key, value in obj.items():
            if key in config.BY_NAME and value is not None:
                rec.overrides[key] = config.from_json(key, value)
                config.check(key, rec.overrides[key])
    except config.SettingError as e:
        rec.error = e.in_record()


# ---------------------------------------------------------------- the output file


def load_existing(path: Path, records: list[InputRecord], overwrite: bool) -> dict[int, dict]:
    """Records already in OUTPUT, after repairing a torn last line.

    Refuses (unless ``overwrite``) when OUTPUT holds records that do not match INPUT."""
    if not path.exists():
        return {}
    if overwrite:
        path.write_bytes(b"")
        return {}
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    done: dict[int, dict] = {}
    for number, line in enumerate(data[:good_end].decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out = json.loads(line)
            index = out["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlmgenError(f"{path}:{number}: not an llmgen batch record; use --overwrite or another -o") from None
        if not (isinstance(index, int) and 0 <= index < len(records)) or out.get("prompt", records[index].prompt) != records[index].prompt:
            raise LlmgenError(f"{path} holds records of a different input (line {number}); use --overwrite to replace it")
        done[index] = out
    return done


def base_seed_from(done: dict[int, dict], records: list[InputRecord]) -> int | None:
    """The ``--seed`` base a previous run used, read back from a record that had no seed of its own."""
    for index, out in done.items():
        if isinstance(out.get("seed"), int) and records[index].seed is None:
            return out["seed"] - index
    return None


class Sink:
    """Appends JSON lines and flushes after each batch, so a kill loses at most one batch.

    With ``order`` (the indices to expect, in input order) a record is held until every
    one before it has been written, so the output reads in input order; a kill then
    loses what was held, which the next run regenerates."""

    def __init__(self, path: Path | None, order: list[int] | None = None) -> None:
        self.path = path
        self.order, self.held, self.next = order, {}, 0
        try:
            self.stream = open(path, "a", encoding="utf-8") if path else None
        except OSError as e:
            raise LlmgenError(f"{path}: cannot write output ({e.strerror or e})") from None

    def write(self, records: list[dict]) -> None:
        if self.order is not None:
            self.held.update((r["index"], r) for r in records)
            records = []
            while self.next < len(self.order) and self.order[self.next] in self.held:
                records.append(self.held.pop(self.order[self.next]))
                self.next += 1
            if not records:
                return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if self.stream is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            self.stream.write(text)
            self.stream.flush()
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    """A record ready to generate: its prompt ids and its settings, resolved once."""

    record: InputRecord
    prompt_ids: list[int]
    gen: config.GenerationConfig


def plan(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Group jobs by sampling config, sort each group by prompt length, cut into batches."""
    groups: dict[config.SamplingConfig, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.gen.sampling, []).append(job)
    batches = []
    for group in groups.values():
        group.sort(key=lambda j: (len(j.prompt_ids), j.record.index))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def run_batches(ckpt, batches: list[list[Job]], sink: Sink, on_batch: Callable[[int, int], None] | None = None,
                model: str = "embedded") -> None:
    """Generate batch after batch, writing each batch's records as soon as it is done.
    Jobs in one batch share their sampling config and stop rules; each keeps its own
    seed and length limit."""
    from llmgen.decoding.greedy_sample import Row, generate_batch

    for jobs in batches:
        gen = jobs[0].gen
        rows = [Row(j.prompt_ids, j.gen.seed, j.gen.max_new_tokens) for j in jobs]  # greedy rows ignore their seed
        samples = generate_batch(ckpt.model, rows, gen, ckpt.decode)
        sink.write([output_record(j, s, model) for j, s in zip(jobs, samples)])
        if on_batch is not None:
            on_batch(len(jobs), sum(len(s.token_ids) for s in samples))


def output_record(job: Job, sample, model: str = "embedded") -> dict:
    """The record of ``run --json``, plus where it sits in INPUT (``index``, ``id``); its
    ``model`` and ``settings`` let any one record be replayed with ``run``."""
    rec = {"index": job.record.index}
    if job.record.id is not None:
        rec["id"] = job.record.id
    rec.update(
        prompt=job.record.prompt,
        prompt_token_ids=job.prompt_ids,
        text=sample.text,
        token_ids=sample.token_ids,
        logprobs=sample.logprobs,
        finish_reason=sample.finish_reason,
        seed=sample.seed,
        model=model,
        settings=config.effective(job.gen),
    )
    return rec


def error_record(rec: InputRecord) -> dict:
    out = {"index": rec.index}
    if rec.id is not None:
        out["id"] = rec.id
    out.update(prompt=rec.prompt, line=rec.line, error=rec.error)
    return out


