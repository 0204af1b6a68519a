"""What a step costs in ``llmgen explore``: from the key press to the updated table.

    python bench/explore.py [--model embedded] [--model smollm2] [--steps 20] [--threads N]

For each model, medians (ms) over ``--steps`` steps to nodes not seen before, the three
kinds of step alternating:

- a forward pass alone: one token through the model on top of a KV cache (the floor);
- the engine's step: ``Session.take`` then ``candidates`` (the pass, plus copying the
  sampler chain, explaining the distribution and ranking the vocabulary);
- the app: from Enter pressed in the Textual app (headless, Pilot) to the end of the
  redraw that follows the worker, and of that the redraw alone (table, path, tree).
  Textual paints the screen after that, at up to 60 frames a second.

The goal (issue 18) is app step <= forward pass + 20 ms. A model not in the cache is
skipped with a message (``llmgen pull smollm2`` fetches SmolLM2, 93 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmgen import orchestrate as orch  # noqa: E402
from llmgen.explore.session import Session  # noqa: E402

PROMPT = "The old ship sailed into the harbour, and the captain"
SETTINGS = {"temperature": 0.8, "top_p": 0.95}  # the embedded model's own; a chain that sorts the vocabulary


def ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


class Forward:
    """One token through the model on top of a KV cache holding the prompt: the floor."""

    def __init__(self, ckpt, ids: list[int]) -> None:
        self.model = ckpt.model
        self.cache = self.model.new_cache(1, self.model.cfg.context_length)
        with torch.inference_mode():
            self.model(torch.tensor([ids]), None, self.cache)
        self.token = torch.tensor([[ids[-1]]])

    @torch.inference_mode()
    def __call__(self) -> float:
        start = time.perf_counter()
        self.model(self.token, None, self.cache)[:, -1].float()
        self.cache.length -= 1
        return time.perf_counter() - start


def measure(ckpt, ids: list[int], steps: int) -> dict[str, list[float]]:
    """The three measurements, alternating step by step so that a machine whose load
    changes (a shared one) weighs on all three alike."""
    from llmgen.explore.app import ExploreApp

    forward = Forward(ckpt, ids)
    engine = Session(ckpt, ids, SETTINGS, seed=0)
    ranked = engine.candidates().ranked
    app = ExploreApp(Session(ckpt, ids, SETTINGS, seed=0, prompt=PROMPT))
    times: dict[str, list[float]] = {"forward": [], "engine": [], "app": [], "redraw": []}
    drawn: list[tuple[float, float]] = []
    redraw = app.redraw

    def timed_redraw(*args):
        start = time.perf_counter()
        redraw(*args)
        drawn.append((start, time.perf_counter()))

    app.redraw = timed_redraw

    async def settle(pilot) -> None:
        await app.workers.wait_for_complete()
        await pilot.pause()

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            for i in range(steps + 2):  # a new branch each time: the cache is cut back, one token fed
                times["forward"].append(forward())
                start = time.perf_counter()
                engine.take(ranked[i])
                engine.candidates()
                times["engine"].append(time.perf_counter() - start)
                engine.back()
                await pilot.press(*["down"] * i)
                await settle(pilot)
                before = app.session.forward_passes
                start = time.perf_counter()
                await pilot.press("enter")
                await settle(pilot)
                assert app.session.forward_passes == before + 1 and app.table_node == app.session.current
                times["app"].append(drawn[-1][1] - start)  # to the end of the redraw, not of Pilot's waiting
                times["redraw"].append(drawn[-1][1] - drawn[-1][0])
                await pilot.press("backspace")
                await settle(pilot)

    asyncio.run(go())
    return {k: v[2:] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a model name or directory (repeatable; default: embedded, smollm2)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from llmgen.models_cache import is_pulled

    print(f"{'model':<10} {'forward pass':>13} {'engine step':>12} {'app step':>9} {'of it, redraw':>14} {'goal':>10}")
    for name in args.model or ["embedded", "smollm2"]:
        if name == "smollm2" and not is_pulled(name):
            print(f"{name:<10} skipped: not in the cache (llmgen pull smollm2 fetches it, 93 MB)")
            continue
        ckpt = orch.load(None if name == "embedded" else name, "cpu", "auto", threads=args.threads)
        ids = orch.prompt_ids(ckpt, PROMPT)
        forward, engine, app, redraw = (ms(t) for t in measure(ckpt, ids, args.steps).values())
        goal = "✓" if app <= forward + 20 else "✗"
        print(f"{name:<10} {forward:>10.1f} ms {engine:>9.1f} ms {app:>6.1f} ms {redraw:>11.1f} ms "
              f"{'<= ' + format(forward + 20, '.1f'):>8} {goal}")


if __name__ == "__main__":
    main()
