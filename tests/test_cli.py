"""The command line, in-process through ``main(argv)`` and, for stdin and pipes, as a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from llmgen.cli import main


@pytest.fixture
def cli(capsys, gpt2_dir):
    def invoke(*args, model=True):
        argv = list(args)
        if model:
            argv += ["--model", str(gpt2_dir[0])]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_run_json_record_fields(cli):
    code, out, _ = cli("run", "I like", "-n", "8", "--seed", "4", "--num-samples", "2", "--json", "--ignore-eos")
    assert code == 0
    recs = records(out)
    assert len(recs) == 2
    for i, rec in enumerate(recs):
        assert set(rec) >= {"prompt", "prompt_token_ids", "text", "token_ids", "logprobs", "finish_reason", "seed"}
        assert rec["prompt"] == "I like" and rec["seed"] == 4 + i
        assert len(rec["token_ids"]) == len(rec["logprobs"]) == 8 and rec["finish_reason"] == "length"
        assert not rec["text"].startswith("I like")


def test_run_plain_prints_only_the_continuation(cli):
    _, as_json, _ = cli("run", "I like", "-n", "8", "-t", "0", "--json")
    code, out, _ = cli("run", "I like", "-n", "8", "-t", "0")
    assert code == 0 and out == records(as_json)[0]["text"] + "\n"
    _, echoed, _ = cli("run", "I like", "-n", "8", "-t", "0", "--echo")
    assert echoed == "I like" + out


def test_random_seed_is_reported_and_reproduces(cli):
    _, out, _ = cli("run", "I like", "-n", "8", "--json")
    rec = records(out)[0]
    assert isinstance(rec["seed"], int)
    _, again, _ = cli("run", "I like", "-n", "8", "--json", "--seed", str(rec["seed"]))
    assert records(again)[0]["token_ids"] == rec["token_ids"]


def test_score_json(cli, ckpt):
    code, out, _ = cli("score", "I like cold coffee", "--json")
    rec = records(out)[0]
    assert code == 0 and rec["token_ids"] == ckpt.encode("I like cold coffee")
    assert len(rec["logprobs"]) == len(rec["token_ids"]) and all(lp < 0 for lp in rec["logprobs"])
    assert rec["perplexity"] == pytest.approx(2.718281828 ** (-sum(rec["logprobs"]) / len(rec["logprobs"])))


def test_score_table(cli):
    code, out, _ = cli("score", "I like")
    assert code == 0 and "perplexity" in out and '" like"' in out  # tokens quoted as in every view


@pytest.mark.parametrize(
    "flags",
    [["--top-p", "1.5"], ["--top-p", "0"], ["-t", "-1"], ["--top-k", "-2"], ["-n", "0"], ["--min-p", "2"],
     ["--num-samples", "0"], ["--top-k", "abc"], ["--no-such-flag"], ["--repetition-penalty", "0"]],
)
def test_bad_flags_are_one_line_usage_errors(cli, flags):
    code, out, err = cli("run", "I like", *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err


def test_runtime_errors_exit_1_without_traceback(cli, tmp_path):
    code, _, err = cli("run", "I like", "--model", str(tmp_path / "missing"), model=False)
    assert code == 1 and err.count("\n") == 1 and "missing" in err
    code, _, err = cli("run", "I like", "--device", "cuda") if not _has_cuda() else (1, "", "x\n")
    assert code == 1 and err.count("\n") == 1


def test_no_model_anywhere_is_a_clear_error(cli, monkeypatch):
    import llmgen.checkpoint as checkpoint

    monkeypatch.delenv("LLMGEN_MODEL", raising=False)
    monkeypatch.setattr(checkpoint, "__file__", "/nonexistent/llmgen/checkpoint.py")
    code, _, err = cli("run", "I like", model=False)
    assert code == 1 and "--model" in err and "LLMGEN_MODEL" in err


def test_model_from_environment(cli, gpt2_dir, monkeypatch):
    monkeypatch.setenv("LLMGEN_MODEL", str(gpt2_dir[0]))
    code, out, _ = cli("run", "I like", "-n", "3", "--json", model=False)
    assert code == 0 and len(records(out)[0]["token_ids"]) == 3


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def _script(*args, stdin: bytes = b"", env=None):
    return subprocess.run(
        [sys.executable, "-m", "llmgen", *args], input=stdin, capture_output=True, env={**os.environ, **(env or {})}
    )


def test_stdin_prompt_and_dash(gpt2_dir):
    model = ["--model", str(gpt2_dir[0])]
    piped = _script("run", *model, "-n", "5", "-t", "0", "--json", stdin=b"I like\n")
    dashed = _script("run", "-", *model, "-n", "5", "-t", "0", "--json", stdin=b"I like")
    argued = _script("run", "I like", *model, "-n", "5", "-t", "0", "--json")
    assert piped.returncode == dashed.returncode == argued.returncode == 0, piped.stderr
    records = [json.loads(p.stdout) for p in (piped, dashed, argued)]
    for r in records:
        r.pop("timings")  # wall-clock, different every run
    assert records[0] == records[1] == records[2]


@pytest.mark.parametrize("fmt", ["", "--json", "--json --stream", "--separator '\\0'"])
def test_closed_pipe_ends_quietly(gpt2_dir, fmt):
    """Far more output than a pipe buffers (~150 kB), so the writer really meets a closed
    pipe: in plain output, records, token events, and between separated samples."""
    many = "--num-samples 1500 -n 100"
    cmd = f"{sys.executable} -m llmgen run 'I like' --model {gpt2_dir[0]} {many} -t 0 --ignore-eos {fmt} | head -c 3"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True)
    assert proc.returncode == 0 and proc.stderr == b"" and len(proc.stdout) == 3


def test_a_stream_into_a_closed_pipe_ends_quietly():
    """One long streamed sample: the writer meets the closed pipe while flushing a token."""
    cmd = f"{sys.executable} -m llmgen run 'I like' -n 3000 --ignore-eos --seed 1 | head -c 3"
    for _ in range(3):
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True)
        assert proc.returncode == 0 and proc.stderr == b"" and len(proc.stdout) == 3


def test_piped_output_has_no_control_codes(gpt2_dir):
    proc = _script("run", "I like", "--model", str(gpt2_dir[0]), "-n", "5", "-t", "0")
    assert proc.returncode == 0 and b"\x1b[" not in proc.stdout


def test_terminal_streams_continuation_and_reports_seed(gpt2_dir):
    """On a real terminal (a pty), the text streams and a summary line names the seed."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: stdout and stderr are the pty
        os.execvp(sys.executable, [sys.executable, "-m", "llmgen", "run", "I like", "--model", str(gpt2_dir[0]),
                                   "-n", "6", "--seed", "5", "--ignore-eos", "--echo"])
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert "I like" in screen and "seed 5" in screen and "6 tokens" in screen


def test_info(cli, gpt2_dir):
    code, out, _ = cli("info", "--json")
    facts = json.loads(out)
    assert code == 0 and facts["architecture"] == "gpt2" and facts["context_length"] == 128
    assert facts["parameters"] == sum(p.numel() for p in gpt2_dir[1].parameters()) - 0  # tied head counted once
    assert "model.safetensors" in facts["files"] and facts["vocab_size"] == facts["tokenizer_vocab_size"]
    code, out, _ = cli("info")  # in a pipe: label: value lines, nothing padded, no Python reprs
    assert code == 0 and "parameters: " in out and "context length: 128" in out
    assert all(line == line.rstrip() for line in out.splitlines()) and "{" not in out
    assert f"path: {gpt2_dir[0]}" in out


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_beam_length_penalty_must_be_finite(cli, value):
    """Found by the fuzz test: alpha = -inf divided a score by 0 (an internal error)."""
    code, out, err = cli("beam", "I like", "-n", "2", "--length-penalty", value)
    assert code == 2 and out == "" and "--length-penalty" in err and err.count("\n") == 1
