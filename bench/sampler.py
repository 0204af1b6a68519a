"""What each sampler stage costs per token, on its own: the chain's ``choose`` and
``accept`` over random logits of a real vocabulary size, no model.

    python bench/sampler.py [--vocab 50257] [--rows 1,16] [--steps 64] [--repeats 7]

Prints one row per chain: microseconds per step (all rows together), median of the
repeats. A decode step of the GPT-2-124M shape takes 20-30 ms on this project's CPU, so
the chain's share of a token is these numbers over that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmgen.config import SamplingConfig  # noqa: E402
from llmgen.sampling import TokenRules, build_sampler  # noqa: E402

CHAINS: dict[str, dict] = {
    "greedy": {"temperature": 0},
    "draw (the default chain, T=1)": {},
    "T=0.8, top-p 0.95 (the embedded model's)": {"temperature": 0.8, "top_p": 0.95},
    "top-k 40": {"top_k": 40},
    "min-p 0.05": {"min_p": 0.05},
    "typical 0.9": {"typical_p": 0.9},
    "epsilon 3e-4": {"epsilon_cutoff": 3e-4},
    "eta 3e-4": {"eta_cutoff": 3e-4},
    "top-n-sigma 1": {"top_n_sigma": 1.0},
    "xtc 0.5 / 0.1": {"xtc_probability": 0.5, "xtc_threshold": 0.1},
    "dynatemp 0.5": {"dynatemp_range": 0.5},
    "penalties (repetition 1.1, presence 0.5, last 64)": {"repetition_penalty": 1.1, "presence_penalty": 0.5, "repeat_last_n": 64},
    "dry 0.8 (whole text)": {"dry_multiplier": 0.8},
    "no-repeat-ngram 3": {"no_repeat_ngram_size": 3},
    "mirostat 2": {"mirostat": 2},
}


def step_microseconds(cfg: SamplingConfig, rows: int, vocab: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (64,), generator=gen).tolist() for _ in range(rows)]
    tokens = TokenRules(dry_breakers={0: [()]}) if cfg.dry_multiplier else None
    sampler = build_sampler(cfg, prompts, [None if cfg.greedy else i for i in range(rows)], vocab, "cpu", (0,), tokens)
    for _ in range(3):
        sampler.accept(sampler.choose(logits))
    start = time.perf_counter()
    for _ in range(steps):
        sampler.accept(sampler.choose(logits))
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(r) for r in args.rows.split(",")]
    print(f"sampler chain alone, vocabulary {args.vocab}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats} x {args.steps} steps")
    width = max(map(len, CHAINS))
    print(f"{'chain':{width}} " + " ".join(f"{f'{r} row' + ('s' if r > 1 else ''):>12}" for r in sizes) + "   (µs per step)")
    with torch.inference_mode():
        for name, settings in CHAINS.items():
            cfg = SamplingConfig(**settings)
            cells = [statistics.median(step_microseconds(cfg, r, args.vocab, args.steps) for _ in range(args.repeats)) for r in sizes]
            print(f"{name:{width}} " + " ".join(f"{c:12.0f}" for c in cells))


if __name__ == "__main__":
    main()
