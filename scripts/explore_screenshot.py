#!/usr/bin/env python3
"""Draw docs/explore.svg: ``llmgen explore`` on the tests' six-word model, after the README's
walkthrough (take "like", look at "cold" and "water", take "cold", back, take "water").

    python scripts/explore_screenshot.py [OUTPUT]     # needs the test extra (transformers)

The app runs headless (Textual's Pilot) at 100 x 30 and saves its screen as SVG.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import build_six_word_model  # noqa: E402

from llmgen import orchestrate as orch  # noqa: E402
from llmgen.explore.app import ExploreApp  # noqa: E402
from llmgen.explore.session import Session  # noqa: E402


async def walk(app: ExploreApp, output: Path) -> None:
    async with app.run_test(size=(100, 30)) as pilot:
        async def keys(*names: str) -> None:
            for name in names:
                await pilot.press(name)
                await app.workers.wait_for_complete()
                await pilot.pause()

        await keys()
        like = app.session.candidates().ranked.index(app.session.encode("like")[0])
        await keys(*["down"] * like, "enter")  # "like"
        await keys("down", "down", "enter")  # "cold", third
        await keys("backspace", *["down"] * 4, "enter")  # back, then "water", fifth
        await keys("backspace")
        output.write_text(app.export_screenshot(title="llmgen explore"))


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "explore.svg"
    with tempfile.TemporaryDirectory() as tmp:
        build_six_word_model(Path(tmp))
        ckpt = orch.load(tmp, "cpu", "auto", threads=1)
        session = Session(ckpt, orch.prompt_ids(ckpt, "I"), {"top_k": 3}, seed=1, prompt="I")
        asyncio.run(walk(ExploreApp(session), output))
    print(f"wrote {output} ({output.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
