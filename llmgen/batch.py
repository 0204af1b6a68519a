"""Generating for a file of prompts: JSONL out, batch by batch, safe to interrupt.

Records are grouped by sampling settings, sorted by prompt length to reduce padding,
and generated in batches (``decoding.greedy_sample.generate_batch``). Each batch's
records are appended and flushed as soon as they are done, so after a crash or
``kill -9`` re-running the same command repairs a torn last line, skips the records
already written and generates only the rest (``batch_output`` guards the file). Every record carries its ``index`` (its
position in the input), so the output can be put back in input order with
``jq -s 'sort_by(.index)[]'``.

Seeds: a record's own ``seed``, else ``--seed`` + index (a random base when no
``--seed``; a resumed run reuses the base the first run wrote down in its records).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgen import config
from llmgen.batch_output import Sink, lines_of
from llmgen.errors import LlmgenError, UsageError

# A record may set any generation setting by its name (``top_p``), besides these.
RECORD_KEYS = {"prompt", "id", "seed", *config.BY_NAME}
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BOM = b"\xef\xbb\xbf"  # Windows editors begin UTF-8 files with it


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
        raw = (stdin or sys.stdin.buffer).read().removeprefix(BOM)
        name = "<stdin>"
        jsonl = raw.lstrip()[:1] == b"{"
    else:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise LlmgenError(f"{path}: cannot read input ({e.strerror or e})") from None
        name, jsonl = path, p.suffix.lower() in JSONL_SUFFIXES
        raw = raw.removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LlmgenError(f"{name}:{line}: not valid UTF-8") from None
    records = []
    for number, line in enumerate(lines_of(text), 1):
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
        obj = json.loads(line, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        rec.error = f"not JSON ({e.msg})"
        return
    except ValueError as e:
        rec.error = str(e)
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
    text = next((v for v in _strings(obj) if not _encodable(v)), None)
    if text is not None:
        rec.error = f"holds a lone surrogate ({_short(text)}): not text that can be written as UTF-8"
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


def base_seed(seed: int | None, done: dict[int, dict], records: list[InputRecord], todo: list[InputRecord],
              draw: Callable[[], int]) -> int:
    """The base a record without its own seed adds its index to: ``--seed``, else the one a
    previous run used (read back from its records), else a fresh ``draw()``. Refused when
    base + an index would pass the largest seed, which ``run`` would not take."""
    base = seed if seed is not None else _base_seed_from(done, records)
    base = base if base is not None else draw()
    last = max(r.index for r in todo)
    if base + last >= 2**63:
        raise UsageError(f"--seed {base} + a record's index ({last}) passes the largest seed, 2**63 - 1")
    return base


def _base_seed_from(done: dict[int, dict], records: list[InputRecord]) -> int | None:
    """The ``--seed`` base a previous run used, read back from a record that had no seed of its own."""
    for index, out in done.items():
        if isinstance(out.get("seed"), int) and records[index].seed is None:
            return out["seed"] - index
    return None


def check_resume(done: dict[int, dict], jobs: list[Job], model: str, path: Path) -> None:
    """Refuse to resume OUTPUT with different settings: its records and the new ones would
    mix two experiments in one file. Each record already written is compared with what
    this run would write for it: model, prompt tokens (chat template, system message and
    truncation live there), settings and seed."""
    for job in jobs:
        out = done.get(job.record.index)
        if out is None:
            continue
        now = {"model": model, "prompt_token_ids": job.prompt_ids, "settings": config.effective(job.gen), "seed": job.gen.seed}
        for key, value in now.items():
            before = out.get(key)
            if key == "seed" and (before is None or value is None):
                continue
            if before != value:
                if key == "settings":
                    key, before, value = _first_difference(before or {}, value)
                raise LlmgenError(f"{path} was written with other settings ({key}: {_short(before)} in record "
                                  f"{job.record.index}, {_short(value)} now); nothing was changed. Resume with the "
                                  "same flags, or use --overwrite or another -o")


def _first_difference(before: dict, now: dict) -> tuple[str, Any, Any]:
    key = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
    return key, before.get(key, "unset"), now.get(key, "unset")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _not_json(word: str):
    raise ValueError(f"{word} is not JSON (JSON numbers are finite)")


def _strings(value: Any):
    """Every string inside a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


@dataclass(frozen=True)
class Extras:
    """What a record holds beyond run --json's fields when asked: ``top_logprobs`` (the N
    best tokens per step) and ``prompt_logprobs``."""

    top_logprobs: int = 0
    prompt_logprobs: bool = False


def run_batches(ckpt, batches: list[list[Job]], sink: Sink, on_batch: Callable[[int, int], None] | None = None,
                model: str = "embedded", extras: Extras = Extras()) -> None:
    """Generate batch after batch, writing each batch's records as soon as it is done.
    Jobs in one batch share their sampling config and stop rules; each keeps its own
    seed and length limit."""
    from llmgen.decoding.greedy_sample import Row, generate_batch

    for jobs in batches:
        gen = jobs[0].gen
        rows = [Row(j.prompt_ids, j.gen.seed, j.gen.max_new_tokens) for j in jobs]  # greedy rows ignore their seed
        samples = generate_batch(ckpt.model, rows, gen, ckpt.decode, trace_top=extras.top_logprobs)
        sink.write([output_record(j, s, model, _extra(ckpt, j, s, extras)) for j, s in zip(jobs, samples)])
        if on_batch is not None:
            on_batch(len(jobs), sum(len(s.token_ids) for s in samples))


def _extra(ckpt, job: Job, sample, extras: Extras) -> dict:
    from llmgen import orchestrate as orch
    from llmgen import render

    out = {}
    if extras.prompt_logprobs:
        out["prompt_logprobs"] = orch.prompt_logprobs(ckpt, job.prompt_ids)
    if extras.top_logprobs:
        out["top_logprobs"] = render.top_logprobs_record([st.alternatives for st in sample.steps], ckpt.token_text,
                                                         extras.top_logprobs)
    return out


def output_record(job: Job, sample, model: str = "embedded", extra: dict | None = None) -> dict:
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
        entropy=sample.entropies,
        **sample.constraint_record(),
        model=model,
        settings=config.effective(job.gen),
        **(extra or {}),
    )
    return rec


def error_record(rec: InputRecord) -> dict:
    out = {"index": rec.index}
    if rec.id is not None:
        out["id"] = rec.id
    out.update(prompt=rec.prompt, line=rec.line, error=rec.error)
    return out


