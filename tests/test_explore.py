"""``llmgen explore``'s engine and --script, without the app: the explored tree, the KV
cache of the current path, and numbers that agree with probs, score, run, beam and exact."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmgen import orchestrate as orch
from llmgen.cli import main
from llmgen.errors import LlmgenError, UsageError
from llmgen.explore import script
from llmgen.explore.session import Session

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "I like cold coffee"


@pytest.fixture
def session(ckpt):
    return Session(ckpt, orch.prompt_ids(ckpt, PROMPT), {}, seed=3)


def fresh_logits(ckpt, ids):
    with torch.inference_mode():
        return ckpt.model(torch.tensor([ids]))[0, -1].float()


def test_a_step_is_one_forward_pass_and_going_back_is_free(session, ckpt):
    top = session.candidates().ranked
    assert session.forward_passes == 1  # the prompt's prefill
    session.take(top[0])
    session.take(top[1])
    assert session.forward_passes == 3
    assert session.cache.length == len(session.prompt_ids) + 2
    session.back()
    session.back()
    assert session.current == 0 and session.forward_passes == 3
    session.take(top[0])  # a node seen before: its logits are kept
    assert session.forward_passes == 3
    session.back()
    session.take(top[2])  # a new branch: the cache is cut back to the prompt, one token fed
    assert session.forward_passes == 4 and session.cache.length == len(session.prompt_ids) + 1
    with pytest.raises(LlmgenError, match="already at the prompt"):
        session.back()
        session.back()


def test_only_the_most_recent_nodes_keep_their_numbers(ckpt, monkeypatch):
    """A long session's memory is bounded: beyond KEPT_NODES, the least recently used
    node's logits, candidates and chain are dropped. Coming back to it costs one pass and
    gives the same numbers as before (a sampler with state, to show its chain is rebuilt)."""
    monkeypatch.setattr(Session, "KEPT_NODES", 3)
    session = Session(ckpt, orch.prompt_ids(ckpt, PROMPT), {"repetition_penalty": 1.5}, seed=3)
    first = session.candidates().ranked[0]
    session.take(first)
    before = session.candidates()
    for _ in range(4):
        session.take(session.candidates().ranked[1])
    kept = [n.id for n in session.nodes if n.logits is not None]
    assert len(kept) <= 3 and len(session._explained) <= 3 and len(session._chains) <= 3
    assert session.nodes[1].logits is None and 1 not in session._explained
    passes = session.forward_passes
    again = session.candidates(1)
    assert session.forward_passes == passes + 1
    assert torch.allclose(again.raw, before.raw, atol=1e-6) and torch.allclose(again.final, before.final, atol=1e-6)
    assert list(again.removed_by) == list(before.removed_by)


def test_cached_logits_equal_a_fresh_forward_pass(session, ckpt):
    """Stepping along branches through the cut-back cache gives every node the logits a
    whole forward pass over its path gives (float sums in another order: 1e-5)."""
    ranked = session.candidates().ranked
    session.take(ranked[0])
    session.take(ranked[0])
    session.back()
    session.take(ranked[3])
    session.take(ranked[1])
    session.goto(2)
    session.take(ranked[5])
    for node in session.nodes:
        if node.logits is not None:
            ids = session.prompt_ids + session.tokens(node.id)
            torch.testing.assert_close(node.logits, fresh_logits(ckpt, ids), atol=1e-5, rtol=1e-5)
            assert node.logprob == pytest.approx(
                0.0 if node.parent is None else
                float(torch.log_softmax(fresh_logits(ckpt, ids[:-1]), -1)[node.token_id]), abs=1e-5)


CHAINS = [  # a chain that draws as it goes (XTC), one that moves with each token (mirostat), one that only counts
    {"temperature": 0.7, "top_k": 12, "top_p": 0.9, "repetition_penalty": 1.3, "xtc_probability": 0.5, "xtc_threshold": 0.05},
    {"temperature": 0.9, "mirostat": 2, "mirostat_tau": 3.0, "presence_penalty": 0.5},
    {"top_k": 8, "min_p": 0.05, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
]


@pytest.mark.parametrize("settings", CHAINS, ids=["xtc", "mirostat", "counting"])
def test_the_tree_agrees_with_probs_and_score(ckpt, settings):
    """At every node of a path: the model's and each stage's probabilities are what
    ``probs`` shows for that path, and the path's tokens have the logprobs ``score``
    gives them and the sampler probabilities ``score --sampler`` gives them, XTC's
    seeded draws included."""
    from llmgen.decoding.probs import follow
    from llmgen.sampler_score import sampler_score
    from llmgen.scoring import score

    prompt = orch.prompt_ids(ckpt, PROMPT)
    s = Session(ckpt, prompt, settings, seed=5)
    gen = s.gen
    path = []
    for rank in (0, 2, 1, 0, 0):
        cands = s.candidates()
        shown = follow(ckpt.model, prompt + path, gen.sampling, 1, 5, gen.stop_token_ids, gen.tokens)[0]
        torch.testing.assert_close(cands.raw, torch.tensor(shown.raw), atol=1e-5, rtol=0)
        # probs starts its chain afresh at this prompt: the same chain at the root, and at
        # every node when no stage carries state from step to step (XTC's draws, mirostat's mu)
        if len(path) == 0 or not ("xtc_probability" in settings or "mirostat" in settings):
            torch.testing.assert_close(cands.final, torch.tensor(shown.final), atol=1e-5, rtol=0)
            assert [cands.removed_by[t] for t in cands.ranked] == [shown.removed_by[t] for t in cands.ranked]
        token = cands.ranked[rank]
        path.append(token)
        s.take(token)
    scored = score(ckpt.model, path, ckpt.bos_token_id, context=prompt)
    assert [n.logprob for n in s.path()[1:]] == pytest.approx(scored.logprobs, abs=1e-5)
    judged = sampler_score(ckpt.model, path, ckpt.bos_token_id, gen.sampling, 5, gen.stop_token_ids, gen.tokens,
                           context=prompt)
    ours = [float(s.candidates(n.parent).final[n.token_id]) for n in s.path()[1:]]
    assert ours == pytest.approx(judged.probs, abs=1e-5)
    assert 0 in judged.probs or any(p < 1 for p in judged.probs)  # the settings did something


def test_probs_and_score_commands_agree_with_explore(six_dir, capsys):
    def run(*args):
        assert main([*args, "--model", six_dir]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    # An empty prompt is BOS alone, where score starts too.
    (probs,) = run("probs", "", "-k", "3", "--seed", "1", "--json", "--top", "7")
    show, record = run("explore", "", "-k", "3", "--seed", "1", "--json", "--top", "7", "--script",
                       "show; take I; take like; take cold; take water")
    assert [c["token_id"] for c in show["candidates"]] == [c["token_id"] for c in probs["candidates"]]
    for ours, theirs in zip(show["candidates"], probs["candidates"]):
        assert ours["prob"] == pytest.approx(theirs["prob"], abs=1e-6)
        assert ours["final_prob"] == pytest.approx(theirs["final_prob"], abs=1e-6)
        assert ours["removed_by"] == theirs["removed_by"]
    (scored,) = run("score", "I like cold water", "--json")
    assert record["token_ids"] == scored["token_ids"]
    assert record["logprobs"] == pytest.approx(scored["logprobs"], abs=1e-5)


def test_top_and_rank_break_ties_by_id(session):
    cands = session.candidates()
    cands.raw = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.05, 0.1, 0.05])
    assert cands.ranked == [1, 3, 0, 2, 5, 4, 6]
    assert [cands.top(n) for n in (1, 3, 7, 50)] == [[1], [1, 3, 0], cands.ranked, cands.ranked]
    assert [cands.rank(t) for t in range(7)] == [3, 1, 4, 2, 6, 5, 7]
    assert cands.matching(["a", "ba", "c", "ab", "b", "x", "y"], "A", 3) == [1, 3, 0]


def test_greedy_and_sample_are_runs_continuation(ckpt):
    from llmgen.decoding.greedy_sample import generate

    prompt = orch.prompt_ids(ckpt, PROMPT)
    s = Session(ckpt, prompt, {"temperature": 0.9, "top_k": 20, "repetition_penalty": 1.2}, seed=11)
    first = s.sample(6)
    s.goto(0)
    second = s.sample(6)
    s.goto(0)
    greedy = s.greedy(6)
    gen = replace(s.gen, max_new_tokens=6, ignore_eos=True, seed=11, num_samples=2)
    runs = generate(ckpt.model, prompt, gen, ckpt.decode)
    assert [n.token_id for n in first] == runs[0].token_ids[: len(first)]
    assert [n.token_id for n in second] == runs[1].token_ids[: len(second)]  # sample i: seed + i
    plain = generate(ckpt.model, prompt, replace(gen, sampling=replace(gen.sampling, temperature=0), num_samples=1), ckpt.decode)
    assert [n.token_id for n in greedy] == plain[0].token_ids[: len(greedy)]
    assert greedy[-1].marks == {"greedy": ""} and first[-1].marks["sampled"] == "seed 11"
    assert second[-1].marks["sampled"] == "seed 12" and s.current == greedy[-1].id


def test_beam_and_exact_graft_their_answers(session, ckpt):
    from llmgen.decoding.beam import BeamConfig, beam_search
    from llmgen.decoding.exact import ExactConfig, exact_search

    session.take(session.candidates().ranked[1])
    here, prefix = session.current, session.prompt_ids + session.tokens()
    ends = session.beam(3, 4)
    hyps = beam_search(ckpt.model, prefix, BeamConfig(3, 4, 1.0, 3, eos_token_ids=ckpt.eos_token_ids, tree_top=0)).hypotheses
    assert [session.tokens(e.id)[1:] for e in ends] == [h.token_ids for h in hyps]
    for end, h in zip(ends, hyps):
        assert end.cumulative - session.node.cumulative == pytest.approx(h.logprob, abs=1e-5)
    assert ends[0].marks["beam"].startswith("#1 score ")
    end, proven = session.exact(4)
    best = exact_search(ckpt.model, prefix, ExactConfig(4, eos_token_ids=ckpt.eos_token_ids))
    assert proven == best.proven and session.tokens(end.id)[1:] == best.token_ids
    assert all("exact" in session.nodes[n.id].marks for n in session.path(end.id)[2:])
    assert session.current == here


def test_settings_change_live_and_are_checked(session):
    before = session.candidates()
    session.set("top_k", "2")
    after = session.candidates()
    assert after.drawable == 2 and after.order == ["top-k", "draw"]
    assert after.removed_by[after.ranked[2]] == "top-k" and before.removed_by[before.ranked[2]] is None
    with pytest.raises(UsageError, match="--top-p must be in"):
        session.set("top-p", "2")
    with pytest.raises(UsageError, match="no setting 'tops'"):
        session.set("tops", "2")
    with pytest.raises(LlmgenError, match="seed takes an int"):
        session.set("seed", "x")
    assert session.settings == {"top_k": 2}
    session.set("seed", "9")
    assert session.seed == 9


def test_script_language():
    assert script.split("take ';'; back ;greedy 3") == ["take ';'", "back", "greedy 3"]
    actions = script.parse("take ' a'; take id 7; back; back 2; beam 2 5; set top-p 0.9; export t.svg; show")
    assert [(a.name, a.args) for a in actions] == [
        ("take", ("text", " a")), ("take", ("id", 7)), ("back", (1,)), ("back", (2,)), ("beam", (2, 5)),
        ("set", ("top-p", "0.9")), ("export", ("t.svg",)), ("show", ())]
    assert script.parse(r"take '\n'")[0].args == ("text", "\n")
    for bad, why in [("greed 3", "unknown action 'greed'"), ("greedy", "takes 1 number"), ("beam 2", "takes 2 numbers"),
                     ("greedy 0", "must be >= 1"), ("take", "one TEXT"), ("export t.txt", ".json, .svg or .html"),
                     ("take 'a", "No closing quotation"), ("show 3", "takes nothing")]:
        with pytest.raises(UsageError, match=why):
            script.parse(f"take a; {bad}")
    with pytest.raises(UsageError, match="--script: no action given"):
        script.parse(" ; ")


def test_script_mode_writes_the_export(six_dir, tmp_path, capsys):
    out = tmp_path / "tree.json"
    code = main(["explore", "I", "--model", six_dir, "--seed", "1", "--script",
                 f"take ' like'; take cold; greedy 2; back 3; beam 2 2; exact 2; export {out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "like\n"  # the current path's text
    data = json.loads(out.read_text())
    assert data["prompt"] == "I" and data["text"] == "like" and data["seed"] == 1
    assert set(data) >= {"prompt_token_ids", "token_ids", "logprobs", "cumulative", "settings", "tree"}
    root = data["tree"]
    assert root["token_id"] is None and root["current"]
    like = next(c for c in root["children"] if c["token"] == "like")
    assert like["current"] and like["logprob"] == pytest.approx(data["logprobs"][0])
    cold = next(c for c in like["children"] if c["token"] == "cold")
    assert not cold["current"] and cold["children"][0]["marks"] == {"greedy": ""}
    marks = set()

    def walk(node):
        marks.update(node["marks"])
        assert [c["cumulative"] for c in node["children"]] == sorted((c["cumulative"] for c in node["children"]), reverse=True)
        for c in node["children"]:
            assert c["cumulative"] == pytest.approx(node["cumulative"] + c["logprob"], abs=1e-9)
            walk(c)

    walk(root)
    assert marks == {"greedy", "beam", "exact"}


def test_script_exports_svg_and_html(six_dir, tmp_path, capsys):
    svg, html = tmp_path / "t.svg", tmp_path / "t.html"
    assert main(["explore", "I", "--model", six_dir, "--script", f"take like; take water; export {svg}; export {html}"]) == 0
    assert svg.read_text().startswith("<svg") and "water" in svg.read_text()
    assert "<html" in html.read_text() and "explored" in html.read_text()


def test_script_errors_are_one_line_with_the_exit_code(six_dir, capsys):
    assert main(["explore", "I", "--model", six_dir, "--script", "take like; back; back"]) == 1
    assert capsys.readouterr().err == "llmgen: error: --script action 3 (back): already at the prompt\n"
    # checked before the model loads: the bad model directory is never opened
    assert main(["explore", "I", "--model", "/nonexistent", "--script", "take like; greed 3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmgen: error: --script action 2 (greed 3): unknown action 'greed'") and err.count("\n") == 1
    assert main(["explore", "I", "--model", six_dir, "--script", "set top_k -1"]) == 2
    assert "--top-k must be >= 0" in capsys.readouterr().err


def test_show_prints_the_table(six_dir, capsys):
    assert main(["explore", "I", "--model", six_dir, "-k", "2", "--script", "take like; show", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "I like"
    assert "top-k" in out and "removed by" in out and "2 of 7 tokens can be drawn" in out


def test_the_app_needs_textual_and_a_terminal(six_dir, capsys, monkeypatch):
    import importlib.util

    assert main(["explore", "I", "--model", six_dir]) == 2  # pytest's stdout is no terminal
    assert "needs a terminal: use --script" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textual" else real(name, *a))
    assert main(["explore", "I", "--model", six_dir]) == 1
    assert "pip install '.[tui]'" in capsys.readouterr().err


def test_no_other_command_imports_textual(six_dir):
    code = (f"import sys; from llmgen.cli import main; "
            f"assert main(['run', 'I', '-n', '2', '--model', {six_dir!r}]) == 0; "
            f"assert main(['explore', 'I', '--model', {six_dir!r}, '--script', 'take like; show']) == 0; "
            "assert 'textual' not in sys.modules, 'textual imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr



def test_tree_action_and_json_records(six_dir, capsys):
    assert main(["explore", "I", "--model", six_dir, "--script", "take like; greedy 2; back 2; tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ['explored "I"', '└── ▶ "like"  p=0.030  Σ=-3.494',
                         '    └── "like"  p=0.537  Σ=-4.116  greedy', '        └── "like"  p=0.400  Σ=-5.033  greedy']
    assert main(["explore", "I", "--model", six_dir, "--json", "--script", "take like; show; tree"]) == 0
    show, tree, record = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert show["event"] == "show" and show["token_ids"] == record["token_ids"] == [2]
    assert tree == {"event": "tree", "prompt": "I", "tree": record["tree"]}
    assert record["forward_passes"] == 2 and record["text"] == "like"


def test_chat_prompt_and_its_end_of_turn(tmp_path, capsys):
    """--chat renders the prompt as run --chat does, and greedy goes where run -t 0 goes."""
    from checkpoints import build_chat_model

    build_chat_model(tmp_path)
    base = ["Hi there", "--model", str(tmp_path), "--chat", "--system", "Be brief.", "--json"]
    assert main(["run", *base, "-t", "0", "-n", "12"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert main(["explore", *base, "--script", "greedy 12"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt_token_ids"] == run["prompt_token_ids"] and record["token_ids"] == run["token_ids"]
    assert record["logprobs"] == pytest.approx(run["logprobs"], abs=1e-5)


def test_eos_ends_a_branch(six_dir, capsys):
    argv = ["explore", "I", "--model", six_dir, "--logit-bias", "<end>=10", "--json", "--script"]
    assert main([*argv, "greedy 5"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["token_ids"] == [0] and record["tree"]["children"][0]["ended"]
    assert main([*argv, "greedy 5; take like"]) == 1
    assert "action 2 (take like): the text ended here" in capsys.readouterr().err
    assert main([*argv, "greedy 1; back; take like; show"]) == 0
    show = json.loads(capsys.readouterr().out.splitlines()[0])
    end = next(c for c in show["candidates"] if c["token"] == "<end>")
    assert end["changed_by"] == ["logit-bias"] and end["final_prob"] > 0.99 and show["token_ids"] == [2]


def test_the_context_ends_a_path(six_dir, capsys):
    """The six-word model's context is 32 positions: greedy stops there, and a step past it
    is an error naming it."""
    argv = ["explore", "I", "--model", six_dir, "--json", "--script"]
    assert main([*argv, "greedy 40"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["prompt_token_ids"]) + len(record["token_ids"]) == 32 and record["finish_reason"] == "context"
    assert main([*argv, "greedy 40; take like"]) == 1
    assert "action 2 (take like): the model's context (32 tokens) is full here" in capsys.readouterr().err
