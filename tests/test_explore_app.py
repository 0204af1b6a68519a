"""``llmgen explore``'s app, driven by Textual's Pilot: keys, selections, back and forth,
filtering, live settings, export, and the screen itself at a fixed size.

The screen snapshot is a readable text file; regenerate it with
``LLMGEN_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_explore_app.py`` after an intended change.
"""

import asyncio
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from llmgen import orchestrate as orch
from llmgen.explore.app import ExploreApp
from llmgen.explore.session import Session

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZE = (100, 28)


@pytest.fixture(scope="module")
def six(six_dir):
    return orch.load(six_dir, "cpu", "auto", threads=1)


def drive(ckpt, steps, prompt="I", settings=None):
    """Open the app on ``prompt``, run ``steps(app, pilot)`` (a coroutine function), close it."""
    session = Session(ckpt, orch.prompt_ids(ckpt, prompt), settings or {}, seed=1, prompt=prompt)
    app = ExploreApp(session)

    async def go():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await steps(app, pilot)

    asyncio.run(go())
    return app


async def settle(app, pilot):
    """Wait for the model's worker, then for the redraw it asked for."""
    await app.workers.wait_for_complete()
    await pilot.pause()


async def press(app, pilot, *keys):
    for key in keys:
        await pilot.press(key)
        await settle(app, pilot)


async def answer(app, pilot, key, text, typed=True):
    """Press ``key``, type ``text`` into the question it asks (or, not ``typed``, paste
    it: a long path key by key costs seconds), and Enter."""
    await pilot.press(key)
    await pilot.pause()
    if typed:
        await pilot.press(*text)
    else:
        app.screen.query_one("#answer").value = text
    await press(app, pilot, "enter")


def rows(app) -> list[int]:
    table = app.query_one("DataTable")
    return [int(table.coordinate_to_cell_key((i, 0)).row_key.value) for i in range(table.row_count)]


def cell(app, row: int, column: str) -> str:
    table = app.query_one("DataTable")
    index = [c.label.plain for c in table.ordered_columns].index(column)
    return str(table.get_row_at(row)[index])


def content(app, selector: str) -> str:
    """What a Static shows, drawn whole (a pane may show only part of it)."""
    console = Console(width=300, file=io.StringIO(), record=True)
    console.print(app.query_one(selector).content)
    return console.export_text()


def screen_text(app) -> str:
    """The screen as text, drawn as ``App.export_screenshot`` draws it, without styles."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, force_terminal=True,
                      color_system="truecolor", legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True))
    return "\n".join(line.rstrip() for line in console.export_text(styles=False).splitlines()) + "\n"


def test_enter_takes_and_backspace_goes_back(six):
    seen = {}

    async def steps(app, pilot):
        s = app.session
        root = s.candidates()
        seen["root rows"] = rows(app)
        like = s.ckpt.encode("like", special=False)[0]
        await press(app, pilot, *["down"] * root.ranked.index(like), "enter")
        seen["after take"] = (s.text(), app.table_node, rows(app), s.candidates().ranked, s.forward_passes)
        await press(app, pilot, "backspace")
        seen["after back"] = (s.current, rows(app), s.forward_passes, app.status)
        await press(app, pilot, "enter")  # the cursor is back on the first row: the most probable token
        seen["again"] = (s.tokens(), s.forward_passes)

    app = drive(six, steps)
    assert seen["root rows"] == app.session.candidates(0).ranked
    text, shown, table, ranked, passes = seen["after take"]
    assert text == "like" and shown == 1 and table == ranked and passes == 2
    assert seen["after back"] == (0, seen["root rows"], 2, "back at depth 0")
    assert seen["again"] == ([seen["root rows"][0]], 3)


def test_typing_filters_the_table_and_keys_stay_in_the_filter(six):
    seen = {}

    async def steps(app, pilot):
        await press(app, pilot, "slash", "c", "o")
        seen["co"] = [app.session.ckpt.token_text(t) for t in rows(app)]
        await press(app, pilot, "l", "g")  # g is greedy's key, but here it is typed
        seen["colg"] = (rows(app), len(app.screen_stack), app.query_text)
        await press(app, pilot, "escape")
        seen["cleared"] = (len(rows(app)), app.query_text, app.focused.id)

    drive(six, steps)
    assert seen["co"] == ["coffee", "cold"]  # most probable first
    assert seen["colg"] == ([], 1, "colg")
    assert seen["cleared"] == (7, "", "candidates")


def test_settings_change_live(six):
    seen = {}

    async def steps(app, pilot):
        seen["before"] = [c.label.plain for c in app.query_one("DataTable").ordered_columns]
        await answer(app, pilot, "k", "2")
        seen["columns"] = [c.label.plain for c in app.query_one("DataTable").ordered_columns]
        seen["removed"] = [cell(app, i, "removed by") for i in range(7)]
        seen["summary"] = content(app, "#summary")
        await answer(app, pilot, "t", "0.5")
        seen["temperature"] = (app.session.gen.sampling.temperature, app.status)
        await answer(app, pilot, "p", "7")
        seen["bad"] = (app.status, app.session.gen.sampling.top_p)

    drive(six, steps)
    assert "top-k" not in seen["before"] and "top-k" in seen["columns"]
    assert seen["removed"] == ["", ""] + ["top-k"] * 5
    assert "2 of 7 tokens can be drawn" in seen["summary"]
    assert seen["temperature"] == (0.5, "temperature = 0.5")
    assert seen["bad"] == ("error: --top-p must be in (0, 1], got 7", 1.0)


def test_greedy_sample_beam_exact_keys(six):
    seen = {}

    async def steps(app, pilot):
        s = app.session
        await answer(app, pilot, "g", "3")
        seen["greedy"] = (len(s.tokens()), dict(s.node.marks))
        await press(app, pilot, "backspace", "backspace", "backspace")
        await answer(app, pilot, "s", "2")
        seen["sample"] = dict(s.node.marks)
        await press(app, pilot, "backspace", "backspace")
        await pilot.press("b")
        await pilot.pause()
        await press(app, pilot, "enter")  # the default, width 2 and 5 tokens
        await answer(app, pilot, "x", "3")
        seen["marks"] = {m for n in s.nodes for m in n.marks}
        seen["tree"] = content(app, "#tree")
        seen["current"] = s.current

    drive(six, steps)
    assert seen["greedy"] == (3, {"greedy": ""})
    assert seen["sample"]["sampled"] == "seed 1"
    assert seen["marks"] == {"greedy", "sampled", "beam", "exact"} and seen["current"] == 0
    assert "★" in seen["tree"] and "beam #1 score" in seen["tree"] and "sampled seed 1" in seen["tree"]


def test_export_key_writes_the_tree(six, tmp_path):
    path = tmp_path / "tree.json"

    async def steps(app, pilot):
        await press(app, pilot, "enter", "enter")
        await answer(app, pilot, "e", str(path), typed=False)

    app = drive(six, steps)
    assert app.status == f"wrote {path}"
    data = json.loads(path.read_text())
    assert data["token_ids"] == app.session.tokens() and len(data["token_ids"]) == 2
    assert data["tree"]["children"][0]["current"]


def test_a_command_line_runs_any_action(six):
    async def steps(app, pilot):
        await answer(app, pilot, "colon", "take like; take cold", typed=False)
        seen["two"] = (app.session.text(), app.status)
        await answer(app, pilot, "colon", "take sugar", typed=False)
        seen["unknown"] = app.status
        await answer(app, pilot, "colon", "back; greed 2", typed=False)
        seen["checked first"] = (app.session.text(), app.status)
        await answer(app, pilot, "colon", "set seed 4", typed=False)
        await press(app, pilot, "question_mark")
        seen["help"] = (len(app.screen_stack), "Backspace       go back one token (free)" in content(app.screen, "#help"))
        await press(app, pilot, "escape")
        seen["closed"] = len(app.screen_stack)

    seen = {}
    app = drive(six, steps)
    assert seen["two"] == ("like cold", "took 'like' · Σ=-3.494; took 'cold' · Σ=-6.183")
    assert seen["unknown"] == "error: 'sugar' holds text the tokenizer has no token for"
    assert seen["checked first"] == ("like cold", "error: action 2 (greed 2): unknown action 'greed' (known: take, back, "
                                     "greedy, sample, beam, exact, set, export, show, tree)")
    assert app.session.seed == 4 and app.status == "seed = 4"
    assert seen["help"] == (2, True) and seen["closed"] == 1


def test_screen_snapshot(six):
    """The whole screen after a few steps, at 100 x 28: the path coloured by probability
    (as text here), the candidates with each stage's column, the tree with its marks."""
    shot = {}

    async def steps(app, pilot):
        await answer(app, pilot, "colon", "take like")
        await answer(app, pilot, "colon", "take cold")
        await press(app, pilot, "backspace")
        await answer(app, pilot, "g", "2")
        await press(app, pilot, "backspace", "backspace")
        shot["text"] = screen_text(app)

    drive(six, steps, settings={"top_p": 0.9})
    path = SNAPSHOTS / "explore_screen.txt"
    if os.environ.get("LLMGEN_UPDATE_SNAPSHOTS"):
        path.write_text(shot["text"])
    assert shot["text"] == path.read_text()


def test_settings_that_leave_no_token_are_an_error_not_a_crash(six):
    """With every word used once, no-repeat-ngram 1 bans them all and min-new-tokens the
    end token: the job and the table say so, and the app goes on."""
    seen = {}

    async def steps(app, pilot):
        await answer(app, pilot, "colon", "take like; take cold; take coffee; take water; take stop", typed=False)
        seen["stuck"] = (app.status, content(app, "#summary"), app.query_one("DataTable").row_count)
        await press(app, pilot, "backspace")
        seen["back"] = (app.session.text(), app.query_one("DataTable").row_count, content(app, "#summary"))

    drive(six, steps, settings={"no_repeat_ngram_size": 1, "min_new_tokens": 10})
    status, summary, rows_left = seen["stuck"]
    assert status.startswith("error: every token is banned at this step") and "every token is banned" in summary
    text, rows_back, summary_back = seen["back"]
    assert rows_left == 0 and (text, rows_back) == ("like cold coffee water", 7)
    assert "1 of 7 tokens can be drawn" in summary_back  # "stop": the rest are used, or the end token
