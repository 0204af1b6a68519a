"""Batch generation throughput: tokens/s at batch sizes 1, 4 and 16.

    python bench/batch_throughput.py [--shape gpt2-124m] [--threads 2] [--new-tokens 32] [--repeats 3]

GPT-2-124M-shaped (or --shape) random weights, float32 on CPU, greedy, EOS ignored, 16-token
prompts of mixed lengths (so left padding is exercised). Prints the median of
``--repeats`` runs per batch size and the speed-up over batch size 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import SHAPES, checkpoint  # noqa: E402

from llmgen.checkpoint import load_checkpoint  # noqa: E402
from llmgen.config import GenerationConfig, SamplingConfig  # noqa: E402
from llmgen.decoding.greedy_sample import Row, generate_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default=SHAPES[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1,4,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(checkpoint(args.shape), device="cpu", dtype="float32")
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, sampling=SamplingConfig(temperature=0))
    base = list(range(1, 17))
    print(f"{args.shape} shape, float32, CPU, {args.threads} threads, {args.new_tokens} new tokens per prompt")
    print(f"{'batch':>5}  {'tokens/s':>9}  {'vs batch 1':>10}")
    first = None
    for size in (int(s) for s in args.sizes.split(",")):
        rows = [Row(base[: 12 + i % 5], None, args.new_tokens) for i in range(size)]
        generate_batch(ckpt.model, rows[:1], gen, ckpt.decode)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            samples = generate_batch(ckpt.model, rows, gen, ckpt.decode)
            rates.append(sum(len(s.token_ids) for s in samples) / (time.perf_counter() - start))
        rate = statistics.median(rates)
        first = first or rate
        print(f"{size:>5}  {rate:>9.1f}  {rate / first:>9.2f}x")


if __name__ == "__main__":
    main()
