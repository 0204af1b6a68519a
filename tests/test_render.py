"""What people see: trees and tables for a fixed tiny model, plain when piped.

The beam-tree snapshot is a readable text file; regenerate it with
``LLMGEN_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_render.py`` after an intended change.
"""

import json
import math
import os
from pathlib import Path

import pytest

from llmgen.cli import main

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture
def cli(capsys, six_dir):
    def invoke(*args):
        code = main([*args, "--model", six_dir])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return invoke


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("LLMGEN_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text()


def test_beam_tree_snapshot(cli):
    out = cli("beam", "I like", "--width", "2", "-n", "3", "--length-penalty", "0", "--show-tree")
    check_snapshot("beam_tree_width2.txt", out)


def test_beam_tree_marks(cli):
    out = cli("beam", "I like", "--width", "2", "-n", "3", "--length-penalty", "0", "--show-tree")
    lines = out.splitlines()
    assert lines[0] == 'beam search, width 2 "I like"'
    starred = [line for line in lines if "★" in line and '"' in line]  # not the legend
    assert [line.split('"')[1] for line in starred] == ["coffee", "coffee", "coffee"]  # the winning path
    assert "■ end score=-2.097" in starred[-1]
    assert any('"like"  p=0.537  Σ=-0.623' in line for line in lines)  # greedy's first step survives, then loses
    assert sum("✗" in line for line in lines) >= 6
    assert "\x1b[" not in out  # piped: plain text


def test_tree_stays_bounded_for_wide_beams(cli):
    out = cli("beam", "I like", "--width", "6", "-n", "4", "--show-tree", "--tree-top", "1")
    assert len(out.splitlines()) < 120


def test_exact_tree_and_json(cli, capsys):
    out = cli("exact", "I like", "-n", "3", "--show-tree")
    assert "★" in out and "■ end" in out and out.rstrip().endswith("like coffee coffee")
    rec = json.loads(cli("exact", "I like", "-n", "3", "--json"))
    assert rec["text"] == "like coffee coffee" and rec["proven"] is True
    assert rec["expanded"] >= 1 and rec["logprob"] == pytest.approx(sum(rec["logprobs"]))


def test_beam_json(cli):
    rec = json.loads(cli("beam", "I like", "-w", "3", "-n", "3", "--num-return", "3", "--json"))
    assert len(rec["beams"]) == 3
    assert [b["score"] for b in rec["beams"]] == sorted((b["score"] for b in rec["beams"]), reverse=True)
    assert rec["text"] == rec["beams"][0]["text"] and rec["prompt"] == "I like"


def test_probs_table_marks_filters(cli):
    out = cli("probs", "I like", "-t", "0.7", "-k", "2", "--seed", "0")
    assert "top-k" in out and "model p" in out and "after T" in out and "◀" in out
    assert "2 of 7 tokens can be drawn" in out
    out = cli("probs", "I like", "-p", "0.5", "--seed", "0", "--steps", "2")
    assert out.count("tokens can be drawn") == 2 and "top-p" in out


def test_probs_json_renormalises(cli):
    recs = [json.loads(line) for line in cli("probs", "I like", "-k", "3", "--json", "--top", "7").splitlines()]
    final = [c["final_prob"] for c in recs[0]["candidates"]]
    assert sum(final) == pytest.approx(1.0) and sum(p > 0 for p in final) == 3
    assert [c["removed_by"] for c in recs[0]["candidates"]].count("top-k") == 4


def test_run_show_probs_and_sample_tree(cli):
    out = cli("run", "I like", "-n", "3", "-t", "0", "--show-probs")
    assert "step by step" in out and "next best" in out
    out = cli("run", "I like", "-n", "3", "--num-samples", "20", "--seed", "1", "--show-tree")
    assert out.startswith('samples "I like"  ×20')
    counts = [int(line.split("×")[1].split()[0]) for line in out.splitlines()[1:] if line.startswith(("├── ", "└── "))]
    assert sum(counts) == 20


def test_compare_shows_greedy_is_not_optimal(cli):
    out = cli("compare", "I like", "-n", "3", "-w", "2", "--seed", "1")
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()}
    assert "-2.441" in rows["greedy"] and "-2.097" in rows["beam (width 2)"] and "-1.997" in rows["exact"]


def test_compare_marks_where_beam_lost_the_optimum(cli):
    """Width 2 drops " like coffee" at step 2 (test_search finds such prompts by brute force)."""
    out = cli("compare", "I like", "-n", "3", "-w", "2", "--seed", "1")
    notes = " ".join(line.split("│")[5].strip() for line in out.splitlines() if line.startswith("│"))  # the note column, wrapped
    assert "lost the optimum at step 2 (-0.099 logprob)" in notes
    beam, exact = [json.loads(line) for line in cli("compare", "I like", "-n", "3", "-w", "2", "--seed", "1", "--json").splitlines()][1:3]
    assert beam["lost_optimum_at_step"] == 2 and beam["optimum_proven"] is True
    assert beam["gap"] == pytest.approx(beam["logprob"] - exact["logprob"]) and beam["gap"] < 0
    beam = json.loads(cli("compare", "I", "-n", "3", "-w", "2", "--seed", "1", "--json").splitlines()[1])
    assert beam["lost_optimum_at_step"] is None and beam["gap"] == 0 and beam["note"] == "found the optimum"


def test_exact_top_k_table_and_json(cli, capsys, six_dir):
    out = cli("exact", "I like", "-n", "3", "--top", "4")
    assert out.startswith('the 4 most probable continuations of "I like"') and "mass covered" in out
    recs = [json.loads(line) for line in cli("exact", "I like", "-n", "3", "--top", "4", "--json").splitlines()]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4] and recs[0]["text"] == "like coffee coffee"
    assert all(r["proven"] for r in recs) and len({r["mass"] for r in recs}) == 1
    assert recs[0]["mass"] == pytest.approx(sum(math.exp(r["logprob"]) for r in recs))
    assert [r["logprob"] for r in recs] == sorted((r["logprob"] for r in recs), reverse=True)
    recs = [json.loads(line) for line in cli("exact", "I like", "-n", "6", "--top", "4", "--max-expansions", "2", "--json").splitlines()]
    assert not recs[-1]["proven"]  # past the budget: the best found, not proven
    assert main(["exact", "I like", "-n", "6", "--top", "4", "--max-expansions", "2", "--model", six_dir]) == 0
    assert "proven within --max-expansions 2; the rest are the best found" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("width", [60, 80, 120])
def test_probs_table_at_several_widths(width):
    """Every probability stays whole and every stage name readable; narrow, the bars give way."""
    from rich.console import Console

    from llmgen.decoding.probs import StepDistribution
    from llmgen.render import distribution_table

    raw = [0.5, 0.25, 0.15, 0.1]
    dist = StepDistribution(0, raw, [0.6, 0.3, 0.05, 0.05], [0.0, 0.8571, 0.1429, 0.0], ["xtc", None, None, "top-k"], 1,
                            ["logit-bias", "temperature", "top-k", "xtc", "draw"], {2: ["logit-bias"]})
    console = Console(width=width, record=True, color_system=None)
    console.print(distribution_table(dist, lambda t: f" word{t}", 4, "after x", width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for number in ("0.5000", "0.2500", "0.8571", "0.1429", "0.6000"):
        assert number in text
    assert "✗ xtc" in text and "✗ top-k" in text and "logit-bias" in text.replace("\n", "")
    assert "samplers: logit-bias → temperature → top-k → xtc → draw" in " ".join(text.split())
    assert ("█" in text) == (width >= 72)


def test_a_long_beam_tree_stays_a_screenful(capsys):
    """With the embedded model the default -n 20 drew 351 lines; below --tree-depth only
    the answer's path goes on, as one line that still ends in the answer's score."""
    assert main(["beam", "I like", "--show-tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 80
    joined = " ".join(" ".join(lines).replace("│", " ").split())  # wrapped lines, guides removed
    assert "more steps, below --tree-depth" in joined and "■ end score=-1.685" in joined
    assert main(["beam", "I like", "--show-tree", "--tree-depth", "20"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 3 * len(lines)


def test_show_tree_reaches_json_for_beam_and_exact(capsys):
    """The tree a terminal would draw, as nested JSON: the answer's path marked best."""
    for argv in (["beam", "I like", "--width", "2", "-n", "3"], ["exact", "I like", "-n", "2"]):
        assert main([*argv, "--show-tree", "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        node, path = rec["tree"], []
        while True:
            best = [c for c in node["children"] if c["best"]]
            if not best:
                break
            node = best[0]
            path.append(node["token_id"])
        assert path == rec["token_ids"]
        assert main([*argv, "--json"]) == 0
        assert "tree" not in json.loads(capsys.readouterr().out)
