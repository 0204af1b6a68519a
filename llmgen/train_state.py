"""Resumable training state: numbered saves, each one whole or absent.

A save is a directory ``train-state/step-00000080/`` holding ``state.safetensors`` (weights
and AdamW moments), ``tokenizer.json`` (when training from scratch) and ``state.json``
(the step, counters, settings and the sha256 of the other two). It is filled under a
temporary name and renamed into place (``files.atomic_directory``), so a kill at any
instant leaves each save whole or absent: the weights of one save never meet the step
of another, as they did when loose files were replaced one at a time.

The previous save is deleted only once the next is in place. A save found damaged since
(cut short, altered: its sha256 no longer matches) is skipped with a warning for the one
before it; batches are seeded by step, so the run ends with the same weights, only later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save
from tokenizers import Tokenizer

from llmgen.errors import LlmgenError
from llmgen.files import atomic_directory

PREFIX = "step-"
TENSORS, TOKENIZER, META = "state.safetensors", "tokenizer.json", "state.json"


class Damaged(Exception):
    """A save that cannot be trusted; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Save:
    path: Path
    step: int
    meta: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None


def write(state_dir: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer | None) -> None:
    """Put the save for ``step`` in place whole, then delete all but it and the one before.

    Serialised in memory and written by Python: safetensors and tokenizers report a full
    disk as their own exception types, which ``files`` could not name as a disk error."""
    blobs = {TENSORS: save(tensors)}
    if tokenizer is not None:
        blobs[TOKENIZER] = tokenizer.to_str(pretty=True).encode("utf-8")
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    blobs[META] = json.dumps({**meta, "step": step, "sha256": digests}, indent=2).encode("utf-8")
    with atomic_directory(_save_path(state_dir, step), replace=True) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
    _prune(state_dir, keep=step)


def latest(state_dir: Path, warn: Callable[[str], None]) -> Save | None:
    """The newest save that reads back whole, warning about each damaged one skipped;
    None when there is no save yet. Every save damaged is an error naming the newest's file."""
    damaged: list[str] = []
    for step in saved_steps(state_dir):
        try:
            found = read(_save_path(state_dir, step), step)
        except Damaged as e:
            damaged.append(str(e))
            continue
        for problem in damaged:
            warn(f"{problem}; resuming from the save before it, at step {step}")
        return found
    if damaged:
        raise LlmgenError(f"cannot resume: {damaged[0]}, and no earlier save is whole (delete {state_dir} to start over)")
    warn(f"no save in {state_dir} yet: starting from step 0")
    return None


def read(path: Path, step: int) -> Save:
    """One save, checked file by file against the digests in its state.json."""
    meta = _read_meta(path / META, step)
    blobs = {name: _read_checked(path / name, digest) for name, digest in meta["sha256"].items()}
    tokenizer = Tokenizer.from_str(blobs[TOKENIZER].decode("utf-8")) if TOKENIZER in blobs else None
    return Save(path, step, meta, load(blobs[TENSORS]), tokenizer)


def saved_steps(state_dir: Path) -> list[int]:
    """The steps of the saves in ``state_dir``, newest first."""
    steps = []
    for path in state_dir.glob(f"{PREFIX}*"):
        number = path.name.removeprefix(PREFIX)
        if number.isdigit() and path.is_dir():
            steps.append(int(number))
    return sorted(steps, reverse=True)


def remove(path: Path) -> None:
    """Delete a directory so that a kill midway leaves nothing that looks like a save:
    it is renamed to a hidden name first, and emptied after. Best effort: a save that
    cannot be deleted stays whole, and is deleted with the next."""
    hidden = path.with_name(f".{path.name}.{os.getpid()}.deleting")
    with contextlib.suppress(OSError):
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def _save_path(state_dir: Path, step: int) -> Path:
    return state_dir / f"{PREFIX}{step:08d}"


def _prune(state_dir: Path, keep: int) -> None:
    """Keep the save at ``keep`` and the newest before it (the fallback, should ``keep``
    be damaged later); delete the others, skipped damaged ones after ``keep`` included,
    and what killed runs left half-written or half-deleted."""
    older = [step for step in saved_steps(state_dir) if step < keep]
    for step in saved_steps(state_dir):
        if step > keep or step in older[1:]:
            remove(_save_path(state_dir, step))
    for leftover in state_dir.glob(f".{PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _read_meta(path: Path, step: int) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise Damaged(f"{path} is missing") from None
    except OSError as e:
        raise Damaged(f"{path} cannot be read ({e.strerror})") from None
    except ValueError:
        raise Damaged(f"{path} is damaged (cut short, or not JSON)") from None
    digests = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(digests, dict) or TENSORS not in digests or meta.get("step") != step:
        raise Damaged(f"{path} is damaged (not the state of step {step})")
    return meta


def _read_checked(path: Path, digest: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Damaged(f"{path} is missing") from None
    except OSError as e:
        raise Damaged(f"{path} cannot be read ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise Damaged(f"{path} is damaged (its sha256 differs from the one in {META})")
    return data
