"""--chat and --system on every command that takes a prompt: the same rendered prompt
ids as `run --chat`, and the end of turn as a stop."""

import json

import pytest

from llmgen.cli import main


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from checkpoints import build_chat_model

    path = tmp_path_factory.mktemp("chatml")
    build_chat_model(path)
    return str(path)


def _out(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("command", [["beam"], ["exact", "--max-expansions", "50"], ["probs"], ["compare", "--max-expansions", "50"]])
def test_every_prompt_command_takes_chat_and_system(chat_model, capsys, command):
    base = ["Hi there", "--model", chat_model, "--chat", "--system", "Be brief.", "-n", "2", "--json"]
    assert main(["run", *base, "-t", "0"]) == 0
    expected = _out(capsys)[0]["prompt_token_ids"]
    argv = [command[0], *base, *command[1:]]
    if command[0] == "probs":
        argv.remove("-n"), argv.remove("2")
    assert main(argv) == 0
    assert all(r["prompt_token_ids"] == expected for r in _out(capsys))
    assert main([command[0], "Hi", "--model", chat_model, "--system", "x"]) == 2  # --system needs --chat
    assert "--system needs --chat" in capsys.readouterr().err


def test_compare_marks_every_row_that_is_the_best_sequence():
    from llmgen.render import compare_table

    rows = [{"strategy": "greedy", "token_ids": [1, 2], "logprob": -1.00002, "text": "a"},
            {"strategy": "beam", "token_ids": [1, 2], "logprob": -1.00000, "text": "a"},
            {"strategy": "sample", "token_ids": [3, 4], "logprob": -5.0, "text": "b"}]
    table = compare_table(rows)
    assert [r.style for r in table.rows] == ["bold green", "bold green", ""]


def test_compare_says_when_its_sample_is_not_what_was_asked(capsys):
    assert main(["compare", "I like", "-t", "0", "-n", "3", "--max-expansions", "50", "--json"]) == 0
    sample = _out(capsys)[-1]
    assert sample["strategy"].startswith("sample (T=1") and "-t 0 is the greedy row" in sample["note"]


def test_score_a_reply_in_its_chat_context(chat_model, capsys):
    """--chat --reply-to scores TEXT as the assistant's answer: each token given the
    rendered conversation, exactly the logprobs run --chat reports for those tokens."""
    from llmgen.checkpoint import load_checkpoint
    from llmgen.scoring import score

    assert main(["run", "Hi there", "--model", chat_model, "--chat", "-n", "4", "-t", "0", "--json", "--ignore-eos"]) == 0
    rec = _out(capsys)[0]
    ckpt = load_checkpoint(chat_model, device="cpu")
    scored = score(ckpt.model, rec["token_ids"], ckpt.bos_token_id, rec["prompt_token_ids"])
    assert scored.logprobs == pytest.approx(rec["logprobs"], abs=1e-4)
    assert main(["score", "a reply", "--model", chat_model, "--chat", "--reply-to", "Hi there", "--json"]) == 0
    out = _out(capsys)[0]
    assert out["prompt_token_ids"] == rec["prompt_token_ids"] and None not in out["logprobs"]
    assert main(["score", "a reply", "--model", chat_model, "--chat"]) == 2
    assert "--reply-to" in capsys.readouterr().err
