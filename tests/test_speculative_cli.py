"""Speculative decoding at the command line: run's flags, its JSON field and view, and
the combinations it refuses before loading a model."""

import json

import pytest

from llmgen.cli import main

PROMPT = "I like cold coffee and I like"


@pytest.fixture
def cli(capsys, gpt2_dir):
    def invoke(*args):
        code = main([*args, "--model", str(gpt2_dir[0])])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_run_json_carries_the_speculation(cli, other_dir):
    _, plain, _ = cli("run", PROMPT, "-t", "0", "-n", "12", "--ignore-eos", "--json")
    code, out, err = cli("run", PROMPT, "-t", "0", "-n", "12", "--ignore-eos", "--json", "--draft-model", str(other_dir),
                         "--draft-tokens", "3")
    assert code == 0, err
    rec, base = json.loads(out), json.loads(plain)
    assert rec["token_ids"] == base["token_ids"] and rec["text"] == base["text"]
    s = rec["speculation"]
    assert s["method"] == "draft-model" and s["draft_tokens"] == 3 and s["draft_model"] == str(other_dir)
    assert s["drafted"] == sum(len(r["draft"]) for r in s["rounds"]) and s["accepted"] == sum(r["accepted"] for r in s["rounds"])
    assert s["acceptance_rate"] == round(s["accepted"] / s["drafted"], 4)
    assert sum(r["accepted"] + (r["token_id"] is not None) for r in s["rounds"]) == 12
    first = s["rounds"][0]
    assert set(first) == {"draft", "accepted", "token_id", "token", "p", "resampled"}
    assert set(first["draft"][0]) == {"token_id", "token", "q", "p", "accepted"}


def test_run_show_speculation_draws_the_rounds(cli):
    code, out, err = cli("run", PROMPT, "-t", "0", "-n", "10", "--prompt-lookup", "2", "--show-speculation")
    assert code == 0, err
    _, plain, _ = cli("run", PROMPT, "-t", "0", "-n", "10")
    assert out.startswith(plain.rstrip("\n"))
    assert "speculative decoding: prompt lookup" in out and "tokens per pass" in out


@pytest.mark.parametrize("args,says", [
    (["--draft-model", "x", "--prompt-lookup", "2"], "give --draft-model or --prompt-lookup, not both"),
    (["--show-speculation"], "--show-speculation needs --draft-model or --prompt-lookup"),
    (["--draft-tokens", "3"], "--draft-tokens needs --draft-model or --prompt-lookup"),
])
def test_flag_combinations_are_usage_errors(cli, args, says):
    code, _, err = cli("run", "I like", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_a_draft_model_with_another_vocabulary_is_refused(cli, six_dir):
    code, _, err = cli("run", "I like", "--draft-model", six_dir)
    assert code == 1 and "must share the model's vocabulary" in err and len(err.strip().splitlines()) == 1
