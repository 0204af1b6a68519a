"""Batch's output file: what is already in it, who may write to it, and appending safely.

The file is the run's only state, so it is handled as a database would handle its log:
- it is opened and locked before anything is read; a second ``llmgen batch`` on the same
  file is refused, naming the process that holds it;
- it is only ever appended to. The one repair is cutting a torn last line, and only when
  every other line is a record of this same input and the fragment starts as llmgen's
  records do. Anything else (notes, another tool's JSON, another input's records) is
  refused without a byte changed;
- a record written twice (two writers before the lock existed, a copy-paste) is dropped
  on resume, keeping the first;
- devices and pipes (``/dev/null``, ``/dev/stdout``, a FIFO) are written to, never read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
from pathlib import Path

from llmgen.errors import LlmgenError, OutputClosed
from llmgen.files import atomic_path, disk_error

RECORD_START = b'{"index": '  # how json.dumps begins every record batch writes


def lines_of(text: str) -> list[str]:
    """``text`` cut at newlines only. ``str.splitlines`` also cuts at U+2028, U+2029, U+0085
    and other separators that JSON strings and prompts may hold."""
    return [line.removesuffix("\r") for line in text.split("\n")]


class Output:
    """The ``-o`` file of one run: locked, checked, repaired; then appended to."""

    def __init__(self, path: Path, prompts: list[str], overwrite: bool) -> None:
        self.path = path
        self.regular = not path.exists() or path.is_file()
        if path.is_dir():
            raise LlmgenError(f"{path}: is a directory; -o needs a file")
        self.stream = self._open_regular() if self.regular else self._open_special()
        self.done: dict[int, dict] = {}
        if self.regular:
            if overwrite:
                self._rewrite(b"")
            else:
                self.done = self._read_records(prompts)

    # ---------------------------------------------------------------- opening

    def _open_regular(self):
        """Open for appending and take an exclusive lock, or refuse. The path is checked
        again after locking: a resume that rewrote the file (dropping duplicates) renames
        a new file into place, and a lock on the old one would guard nothing."""
        for _ in range(20):
            try:
                stream = open(self.path, "a+b")
            except OSError as e:
                raise disk_error(self.path, e) from None
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stream.close()
                raise LlmgenError(f"{self.path} is being written by another llmgen batch ({_holder(self.path)}); "
                                  "wait for it, or write to another -o") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(stream.fileno()).st_ino:
                    return stream
            stream.close()
        raise LlmgenError(f"{self.path} keeps being replaced by another process")

    def _open_special(self):
        """A device or pipe: opened to write only (reading ``/dev/zero`` never ends, and
        opening a FIFO to read waits for a writer). A FIFO with no reader is an error
        now rather than a silent wait."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise LlmgenError(f"{self.path}: a named pipe with no reader; start the reader first") from None
            raise disk_error(self.path, e) from None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab")

    # ---------------------------------------------------------------- what is there

    def _read_records(self, prompts: list[str]) -> dict[int, dict]:
        self.stream.seek(0)
        data = self.stream.read()
        good_end = data.rfind(b"\n") + 1
        done, keep, dropped = {}, [], 0
        for number, line in enumerate(lines_of(data[:good_end].decode("utf-8", "replace")), 1):
            if not line.strip():
                continue
            out = self._record(line, number, prompts)
            if out["index"] in done:
                dropped += 1
                continue
            done[out["index"]] = out
            keep.append(line)
        torn = data[good_end:]
        if torn and not torn.startswith(RECORD_START[: len(torn)]):
            raise LlmgenError(f"{self.path}: its last line is not an llmgen batch record (no newline at its end); "
                              "nothing was changed. Use --overwrite or another -o")
        if dropped:
            self._rewrite("".join(line + "\n" for line in keep).encode("utf-8"))
        elif torn:
            self.stream.truncate(good_end)  # a write cut off by a kill: the next run writes it whole
            os.fsync(self.stream.fileno())
        self.repaired = dropped
        return done

    def _record(self, line: str, number: int, prompts: list[str]) -> dict:
        try:
            out = json.loads(line)
            index = out["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlmgenError(f"{self.path}:{number}: not an llmgen batch record; nothing was changed. "
                              "Use --overwrite or another -o") from None
        if type(index) is not int or not 0 <= index < len(prompts) or out.get("prompt", prompts[index]) != prompts[index]:
            raise LlmgenError(f"{self.path} holds records of a different input (line {number}); nothing was changed. "
                              "Use --overwrite to replace it")
        return out

    def _rewrite(self, data: bytes) -> None:
        """Replace the file's contents by ``data`` (a new file renamed into place, so a
        kill leaves the old or the new), and lock the new one."""
        with atomic_path(self.path, stat.S_IMODE(os.fstat(self.stream.fileno()).st_mode)) as tmp:
            tmp.write_bytes(data)
        old, self.stream = self.stream, self._open_regular()
        old.close()

    # ---------------------------------------------------------------- writing

    def append(self, text: str) -> None:
        try:
            self.stream.write(text.encode("utf-8"))
            self.stream.flush()
            if self.regular:
                os.fsync(self.stream.fileno())
        except BrokenPipeError:
            raise OutputClosed from None
        except OSError as e:
            raise disk_error(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.close()


def _holder(path: Path) -> str:
    """Which process holds the lock on ``path``, from /proc/locks (Linux), for the error."""
    try:
        st = os.stat(path)
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if "FLOCK" in parts and len(parts) > 5:
                pid, where = parts[4], parts[5].split(":")
                if len(where) == 3 and int(where[2]) == st.st_ino and int(where[0], 16) == os.major(st.st_dev) \
                        and int(where[1], 16) == os.minor(st.st_dev):
                    return f"PID {pid}"
    except (OSError, ValueError):
        pass
    return "another process"


class Sink:
    """Appends JSON lines and flushes after each batch, so a kill loses at most one batch.

    With ``order`` (the indices to expect, in input order) a record is held until every
    one before it has been written, so the output reads in input order; a kill then
    loses what was held, which the next run regenerates."""

    def __init__(self, output: Output | None, order: list[int] | None = None) -> None:
        self.output = output
        self.order, self.held, self.next = order, {}, 0

    def write(self, records: list[dict]) -> None:
        if self.order is not None:
            self.held.update((r["index"], r) for r in records)
            records = []
            while self.next < len(self.order) and self.order[self.next] in self.held:
                records.append(self.held.pop(self.order[self.next]))
                self.next += 1
            if not records:
                return
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        if self.output is not None:
            self.output.append(text)
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # | head: a quiet end, not click's exit 1
            raise OutputClosed from None

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
