"""Top logprobs, prompt logprobs and entropy in records, and tokens coloured by them:
checked against transformers' generate(output_scores=True) on the same model."""

import io
import json
import math

import pytest
import torch

from llmgen import render
from llmgen.cli import main


def records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def reference(gpt2_dir, ckpt, prompt: str, n: int):
    """transformers' greedy continuation and the log-softmax of each step's scores."""
    hf = gpt2_dir[1]
    ids = torch.tensor([ckpt.encode(prompt)])
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                      pad_token_id=0, eos_token_id=None)
    return out.sequences[0, ids.shape[1]:].tolist(), [torch.log_softmax(s[0].double(), -1) for s in out.scores]


def test_top_logprobs_and_entropy_equal_transformers(gpt2_dir, ckpt, capsys):
    tokens, steps = reference(gpt2_dir, ckpt, "I like", 6)
    assert main(["run", "I like", "--model", str(gpt2_dir[0]), "-n", "6", "-t", "0", "--ignore-eos", "--json", "--logprobs", "4"]) == 0
    (rec,) = records(capsys)
    assert rec["token_ids"] == tokens
    for step, token, top, entropy, logprob in zip(steps, tokens, rec["top_logprobs"], rec["entropy"], rec["logprobs"]):
        best = step.topk(4)
        assert [c["token_id"] for c in top] == best.indices.tolist()
        assert top[0]["token_id"] == token  # greedy: the chosen token is the first alternative
        assert [c["logprob"] for c in top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert logprob == pytest.approx(float(step[token]), abs=1e-4)
        assert entropy == pytest.approx(float(-(step.exp() * step).sum()), abs=1e-4)
        assert [c["token"] for c in top] == [ckpt.token_text(c["token_id"]) for c in top]


def test_prompt_logprobs_equal_a_teacher_forced_pass(gpt2_dir, ckpt, capsys):
    assert main(["run", "I like cold coffee", "--model", str(gpt2_dir[0]), "-n", "1", "--json", "--prompt-logprobs", "-t", "0"]) == 0
    (rec,) = records(capsys)
    ids = rec["prompt_token_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(gpt2_dir[1](torch.tensor([ids])).logits[0].double(), -1)
    expected = [lp[i - 1, t].item() for i, t in enumerate(ids) if i]
    assert rec["prompt_logprobs"][0] is None and rec["prompt_logprobs"][1:] == pytest.approx(expected, abs=1e-4)


def test_beam_and_batch_carry_the_same_numbers_as_run(gpt2_dir, capsys, tmp_path):
    model = ["--model", str(gpt2_dir[0]), "-n", "5"]
    assert main(["run", "the fox", *model, "-t", "0", "--ignore-eos", "--json", "--logprobs", "3"]) == 0
    (run,) = records(capsys)
    assert main(["beam", "the fox", *model, "-w", "1", "--json", "--logprobs", "3"]) == 0  # width 1 is greedy
    (beam,) = records(capsys)
    src = tmp_path / "p.txt"
    src.write_text("the fox\n")
    assert main(["batch", str(src), *model, "-t", "0", "--ignore-eos", "--logprobs", "3", "--prompt-logprobs"]) == 0
    (batch,) = records(capsys)
    for other in (beam, beam["beams"][0], batch):
        assert other["token_ids"] == run["token_ids"]
        assert other["entropy"] == pytest.approx(run["entropy"], abs=1e-4)
        assert [[c["token_id"] for c in s] for s in other["top_logprobs"]] == [[c["token_id"] for c in s] for s in run["top_logprobs"]]
    assert batch["prompt_logprobs"][0] is None and len(batch["prompt_logprobs"]) == len(batch["prompt_token_ids"])


def test_every_record_carries_entropy(gpt2_dir, capsys):
    assert main(["run", "I like", "--model", str(gpt2_dir[0]), "-n", "4", "-s", "1", "--num-samples", "2", "--json"]) == 0
    for rec in records(capsys):
        assert len(rec["entropy"]) == len(rec["token_ids"])
        assert all(0 <= h <= math.log(320) + 1e-4 for h in rec["entropy"])


def test_logprob_flags_are_checked(gpt2_dir, capsys):
    model = ["--model", str(gpt2_dir[0])]
    for argv in (["run", "x", "--logprobs", "-1"], ["run", "x", "--prompt-logprobs"], ["beam", "x", "--logprobs", "2"]):
        assert main([*argv, *model]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "logprobs" in err, err


def test_the_step_table_shows_entropy(gpt2_dir, capsys):
    assert main(["run", "I like", "--model", str(gpt2_dir[0]), "-n", "3", "-t", "0", "--show-probs"]) == 0
    out = capsys.readouterr().out
    assert "│ H " in out.replace("┃", "│") or " H " in out
    assert "entropy of the step's distribution" in out


def test_color_by_colours_on_a_terminal_and_nowhere_else():
    assert render.token_color("prob", math.log(0.9), 0) == "green"
    assert render.token_color("prob", math.log(0.01), 0) == "red"
    assert render.token_color("entropy", 0, 0.1) == "green" and render.token_color("entropy", 0, 9.0) == "red"
    for terminal in (True, False):
        buffer = io.StringIO()
        console = render.make_console(file=buffer, force_terminal=terminal, color_system="standard" if terminal else None)
        stream = render.TextStream(console, "prob")
        stream(0, 1, math.log(0.95), 0.2, " sure")
        stream(0, 2, math.log(0.01), 6.0, " maybe")
        text = buffer.getvalue()
        assert (" sure" in text and " maybe" in text)
        assert ("\x1b[32m" in text and "\x1b[31m" in text) if terminal else "\x1b" not in text
    legend = render.make_console(file=io.StringIO(), width=200, record=True)
    legend.print(render.color_legend("entropy"))
    shown = legend.export_text()  # (exporting clears the record)
    assert "H < 0.5" in shown and "H ≥ 5" in shown


def test_color_by_in_a_pipe_is_plain_text(gpt2_dir, capsys):
    assert main(["run", "I like", "--model", str(gpt2_dir[0]), "-n", "3", "-t", "0", "--color-by", "entropy"]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out and err == ""


def test_exact_and_compare_records_carry_entropy(gpt2_dir, capsys):
    model = ["--model", str(gpt2_dir[0]), "-n", "3"]
    assert main(["run", "I like", *model, "-t", "0", "--ignore-eos", "--json"]) == 0
    (greedy,) = records(capsys)
    assert main(["compare", "I like", *model, "--json", "-s", "1"]) == 0
    rows = records(capsys)
    assert main(["exact", "I like", *model, "--json"]) == 0
    for rec in [*rows, *records(capsys)]:
        assert len(rec["entropy"]) == len(rec["token_ids"])
    greedy_row = next(r for r in rows if r["strategy"] == "greedy")
    if greedy_row["token_ids"] == greedy["token_ids"]:
        assert greedy_row["entropy"] == pytest.approx(greedy["entropy"], abs=1e-4)
