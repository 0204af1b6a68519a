"""What a constraint costs per token: the constraint stage (llguidance's mask, the
masked softmax for constraint_mass, the matcher's advance) against one decode step of
the model, on the embedded model and SmolLM2 (when pulled: ``llmgen pull smollm2``).

    python bench/constrain.py [--steps 40] [--repeats 5] [--models embedded,smollm2] [--threads 2]

For each model and constraint, a greedy constrained run writes the text; the stage is
then timed alone replaying that text (apply + accept per step, on the run's own
logits), and a plain decode step (one token through the model with its KV cache) is
timed on the same prompt. The target is a stage under 15% of a decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmgen import orchestrate as orch  # noqa: E402
from llmgen.decoding.greedy_sample import generate  # noqa: E402
from llmgen.sampling.grammar import Constrain  # noqa: E402
from llmgen.sampling.stage import Rows  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
          "required": ["name", "city"], "additionalProperties": False}
CONSTRAINTS = {
    "json schema {name, city}": {"json_schema": json.dumps(SCHEMA)},
    "regex date": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"},
    "any JSON object": {"format": "json"},
}
PROMPT = "Anna lives in Paris. As JSON:"


def available(names: list[str]) -> list[str]:
    """The names that can be loaded: the embedded model, and pulled models."""
    from llmgen.models_cache import is_pulled

    found = []
    for name in names:
        if name == "embedded" or is_pulled(name):
            found.append(name)
        else:
            print(f"{name}: not pulled; skipped (llmgen pull {name})")
    return found


def decode_step_ms(ckpt, ids: list[int], steps: int) -> float:
    """Median time of one token through the model with its cache, over ``steps`` tokens."""
    model = ckpt.model
    cache = model.new_cache(1, len(ids) + steps + 1)
    logits = model(torch.tensor([ids]), None, cache)[:, -1]
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            token = logits.argmax(-1)[:, None]
            start = time.perf_counter()
            logits = model(token, None, cache)[:, -1].float()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def stage_step_ms(ckpt, ids: list[int], settings: dict, steps: int) -> tuple[float, int]:
    """Median time of the constraint stage per step (apply + accept), replaying the
    greedy constrained text on the logits the model gave it; and how many steps that was."""
    gen = orch.generation(ckpt, {**settings, "temperature": 0, "max_new_tokens": steps}, seed=0)
    text = generate(ckpt.model, ids, gen, ckpt.decode)[0].token_ids
    full = torch.tensor([ids + text])
    logits = ckpt.model(full)[0, len(ids) - 1 : -1].float()  # (len(text), vocab)
    stage = Constrain(Rows([ids], [None], "cpu"), gen.tokens.grammar)
    times = []
    for row, token in zip(logits, text):
        start = time.perf_counter()
        stage.apply(row[None])
        stage.accept([token])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, len(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="embedded,smollm2")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads; medians of {args.repeats} repeats")
    print(f"{'model':<10} {'constraint':<26} {'steps':>5} {'decode ms':>10} {'stage ms':>9} {'stage/decode':>13}")
    for name in available(args.models.split(",")):
        ckpt = orch.load(None if name == "embedded" else name, "cpu", "auto", threads=args.threads)  # as the commands load it
        ids = ckpt.encode(PROMPT)
        decode = statistics.median(decode_step_ms(ckpt, ids, args.steps) for _ in range(args.repeats))
        for label, settings in CONSTRAINTS.items():
            runs = [stage_step_ms(ckpt, ids, settings, args.steps) for _ in range(args.repeats)]
            stage, n = statistics.median(r[0] for r in runs), runs[0][1]
            print(f"{name:<10} {label:<26} {n:>5} {decode:>10.3f} {stage:>9.3f} {stage / decode:>12.1%}")


if __name__ == "__main__":
    main()
