"""Writing files so that a crash, a kill or a full disk never leaves one half-written.

Every file llmgen writes for later (weights, tokenizer, training state, pulled models)
goes to a temporary name beside its destination, is flushed to disk, and is renamed into
place: a reader sees the old file or the new one, never a torn one. Disk errors become a
one-line ``LlmgenError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmgen.errors import LlmgenError


def disk_error(path: Path | str, exc: OSError) -> LlmgenError:
    """An OSError while writing ``path`` as the one line a user reads."""
    if exc.errno == errno.ENOSPC:
        return LlmgenError(f"no space left on the device writing {path}")
    if exc.errno == errno.EDQUOT:
        return LlmgenError(f"disk quota exceeded writing {path}")
    if isinstance(exc, PermissionError):
        return LlmgenError(f"cannot write {path}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return LlmgenError(f"cannot write {path}: it is a directory")
    if isinstance(exc, NotADirectoryError):
        return LlmgenError(f"cannot write {path}: a part of the path is a file, not a directory")
    return LlmgenError(f"cannot write {path}: {exc.strerror or exc}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power cut (where the platform allows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on a clean exit it is fsynced, given
    ``mode`` and renamed onto ``path``. On any error it is removed and ``path`` is as it
    was; an OSError becomes a one-line error naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise disk_error(path, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: Path | str, replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``path`` to fill; on a clean exit it takes ``path``'s
    place (replacing an existing one only when ``replace``). On any error it is deleted,
    so a failed convert, pull or train leaves no half-written model behind."""
    shown, path = path, Path(os.path.abspath(path))  # "." and "out/.." have a name only when absolute
    if not path.name:
        raise LlmgenError(f"{shown} cannot be replaced by a model directory")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists() or path.is_symlink():
            if not replace:
                raise LlmgenError(f"{shown} already exists")
            _swap(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise disk_error(shown, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, path: Path) -> None:
    """Put ``new`` where ``path`` is; if that fails, ``path`` is put back as it was."""
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash of an earlier process with this id
    os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def rust_io_error(exc: Exception) -> OSError | None:
    """The OSError inside an error from a Rust library (safetensors, tokenizers), which
    reports one only as text ending in ``(os error N)``; None if it is not one."""
    import re

    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))
