"""Decode speed by thread count, on an idle machine and beside busy processes.

    python bench/threads.py [--model smollm2|gpt2-124m|...] [--busy 0,1,2] [--rounds 3] [--new-tokens 48]

For each number of busy processes (each a Python loop spinning on one core, started
before and stopped after), runs whole ``llmgen run`` processes, greedy with EOS
ignored, with ``--threads 1``, ``--threads 2`` (up to the cores) and with no flag (the
default, ``llmgen.threads``), alternating, and prints each one's generation tokens/s
(from ``--json``'s timings: after the prompt, so loading and prefill do not count).
The default should stay within 1.5x of the best fixed count in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SPIN = "while True: pass"


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from llamacpp import smollm2

        return smollm2()[0]
    from checkpoints import checkpoint

    return checkpoint(name)


def tokens_per_second(path: Path, threads: int | None, new_tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMGEN_THREADS", "OMP_NUM_THREADS")}
    flag = [] if threads is None else ["--threads", str(threads)]
    out = subprocess.run(
        [sys.executable, "-m", "llmgen", "run", "The history of", "--model", str(path), "-n", str(new_tokens), "-t", "0",
         "--ignore-eos", "--json", *flag], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.splitlines()[0])["timings"]["tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--busy", default="0,1,2", help="numbers of busy processes to run beside, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    path = model_dir(args.model)
    cores = len(os.sched_getaffinity(0))
    settings = {f"--threads {n}": n for n in sorted({1, min(2, cores), cores})} | {"default": None}
    print(f"{args.model}, {cores} cores, generation tok/s, medians of {args.rounds}")
    print(f"{'busy':>5} " + " ".join(f"{name:>12}" for name in settings) + "  default / best")
    for busy in (int(b) for b in args.busy.split(",")):
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            rates = {name: [] for name in settings}
            for _ in range(args.rounds):
                for name, threads in settings.items():
                    rates[name].append(tokens_per_second(path, threads, args.new_tokens))
        finally:
            for p in spinners:
                p.kill()
        med = {name: statistics.median(r) for name, r in rates.items()}
        best = max(v for name, v in med.items() if name != "default")
        print(f"{busy:>5} " + " ".join(f"{v:12.1f}" for v in med.values()) + f"  {med['default'] / best:.2f}")


if __name__ == "__main__":
    main()
