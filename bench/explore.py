"""What a step costs in ``llmgen explore``: from the key press to the updated table.

    python bench/explore.py [--model embedded] [--model smollm2] [--steps 20] [--threads N]

For each model, three medians (ms), each over ``--steps`` steps to nodes not seen before:

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


@torch.inference_mode()
def forward_alone(ckpt, ids: list[int], steps: int) -> list[float]:
    model = ckpt.model
    cache = model.new_cache(1, model.cfg.context_length)
    model(torch.tensor([ids]), None, cache)
    token = torch.tensor([[ids[-1]]])
    out = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        model(token, None, cache)[:, -1].float()
        out.append(time.perf_counter() - start)
        cache.length -= 1
    return out[2:]


def engine_steps(ckpt, ids: list[int], steps: int) -> list[float]:
    session = Session(ckpt, ids, SETTINGS, seed=0)
    ranked = session.candidates().ranked
    out = []
    for i in range(steps + 2):  # a new branch each time: the cache is cut back, one token fed
        start = time.perf_counter()
        session.take(ranked[i])
        session.candidates()
        out.append(time.perf_counter() - start)
        session.back()
    return out[2:]


def app_steps(ckpt, ids: list[int], steps: int) -> tuple[list[float], list[float]]:
    from llmgen.explore.app import ExploreApp

    session = Session(ckpt, ids, SETTINGS, seed=0)
    app = ExploreApp(session, PROMPT)
    redraws: list[float] = []
    drawn_at: list[float] = []
    redraw = app.redraw

    def timed_redraw(*args):
        start = time.perf_counter()
        redraw(*args)
        drawn_at.append(time.perf_counter())
        redraws.append(drawn_at[-1] - start)

    app.redraw = timed_redraw
    out = []

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            for i in range(steps + 2):
                await pilot.press(*["down"] * i)
                before = session.forward_passes
                start = time.perf_counter()
                await pilot.press("enter")
                await app.workers.wait_for_complete()
                await pilot.pause()
                out.append(drawn_at[-1] - start)  # to the end of the redraw, not of Pilot's waiting
                assert session.forward_passes == before + 1 and app.table_node == session.current
                await pilot.press("backspace")
                await app.workers.wait_for_complete()
                await pilot.pause()

    asyncio.run(go())
    step_redraws = redraws[1::2][2:]  # each take's redraw (the others are the backs and the start)
    return out[2:], step_redraws


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
        forward = ms(forward_alone(ckpt, ids, args.steps))
        engine = ms(engine_steps(ckpt, ids, args.steps))
        app, redraw = (ms(t) for t in app_steps(ckpt, ids, args.steps))
        goal = "✓" if app <= forward + 20 else "✗"
        print(f"{name:<10} {forward:>10.1f} ms {engine:>9.1f} ms {app:>6.1f} ms {redraw:>11.1f} ms "
              f"{'<= ' + format(forward + 20, '.1f'):>8} {goal}")


if __name__ == "__main__":
    main()
