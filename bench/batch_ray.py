"""`llmgen batch` on one machine against `llmgen batch --ray` with 1 and 2 workers: records/s.

    python bench/batch_ray.py [--shape gpt2-124m] [--records 64] [--new-tokens 32] [--batch-size 8] [--repeats 1]

Each row runs the whole command in a fresh process, as a user would: greedy, EOS
ignored, prompts of 4 to 19 words, ``--threads 1`` for the local run and for each Ray
worker. The Ray rows start a local Ray instance (``--ray`` alone) every time. Two
rates per row: over the whole command (process start, Ray's start, model loads
included) and over the generating phase that the command's summary line times (for
Ray it includes starting the workers, each of which loads the model). With
``--repeats`` the rows take turns (local, 1 worker, 2 workers, local, ...), so a
neighbour's load falls on all of them, and each row shows its median.

On a 2-core machine two workers can at best double one worker's rate, and Ray's own
processes (GCS, raylet, the driver) share those cores; the point of the rows is what
Ray costs and that a second worker adds, not cluster numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import SHAPES, checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog and I like cold coffee with water".split()
SUMMARY = re.compile(r"([\d,]+) tokens in ([\d.]+) s")


def run(args, prompts: Path, out: Path, ray: list[str]) -> tuple[float, float]:
    """Seconds for the whole command, and the generating phase's seconds from its summary."""
    cmd = [sys.executable, "-m", "llmgen", "batch", str(prompts), "-o", str(out), "--overwrite", "-m", str(args.model),
           "-n", str(args.new_tokens), "--ignore-eos", "-t", "0", "-b", str(args.batch_size), "--threads", "1", *ray]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    match = SUMMARY.search(done.stderr)
    assert out.read_text().count("\n") == args.records, done.stderr
    return wall, float(match.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-124m")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    args.model = checkpoint(args.shape)
    rows = [("local batch", []), ("--ray, 1 worker", ["--ray", "--workers", "1"]),
            ("--ray, 2 workers", ["--ray", "--workers", "2"])]
    with tempfile.TemporaryDirectory() as tmp:
        prompts, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[: 4 + i % 16])}) + "\n"
                                   for i in range(args.records)))
        print(f"{args.shape} shape, {args.records} records x {args.new_tokens} new tokens, greedy, batch "
              f"{args.batch_size}, --threads 1 per process or worker, {os.cpu_count()} cores")
        rounds = [[run(args, prompts, out, ray) for _, ray in rows] for _ in range(args.repeats)]
        print(f"{'':<18} {'command s':>10} {'records/s':>10} {'generating s':>13} {'records/s':>10}")
        for i, (label, _) in enumerate(rows):
            wall = statistics.median(r[i][0] for r in rounds)
            generating = statistics.median(r[i][1] for r in rounds)
            rate = f"{args.records / generating:.2f}" if generating else "-"  # under 0.05 s: too quick to time
            print(f"{label:<18} {wall:>10.1f} {args.records / wall:>10.2f} {generating:>13.1f} {rate:>10}")


if __name__ == "__main__":
    main()
