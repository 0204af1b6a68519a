"""The bad-input contract at the command line: one line on stderr, exit 1 or 2, no traceback.

(Model-file problems are covered in test_checkpoint.py, flag ranges in test_cli.py,
malformed batch records and unwritable outputs in test_batch.py.)"""

import json
import subprocess
import sys

import pytest

from llmgen.cli import main


def run_cli(args, stdin: bytes = b""):
    proc = subprocess.run([sys.executable, "-m", "llmgen", *args], input=stdin, capture_output=True)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("llmgen: ") and "Traceback" not in err


def test_empty_prompt_starts_from_bos_when_the_model_has_one(gpt2_dir, capsys):
    assert main(["run", "", "--model", str(gpt2_dir[0]), "-n", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_token_ids"] == [0]


def test_empty_prompt_without_bos_is_an_error(gpt2_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "nobos"
    shutil.copytree(gpt2_dir[0], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["bos_token_id"] = None
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert main(["run", "", "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "empty" in err and "BOS" in err


def test_prompt_longer_than_the_context(gpt2_dir, capsys):
    long = "word " * 400
    assert main(["run", long, "--model", str(gpt2_dir[0]), "-n", "5"]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "--truncate left" in err
    assert main(["run", long, "--model", str(gpt2_dir[0]), "-n", "5", "--truncate", "left", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["prompt_token_ids"]) + 5 <= 128 and len(rec["token_ids"]) >= 1


def test_invalid_utf8_on_stdin(gpt2_dir):
    code, out, err = run_cli(["run", "-", "--model", str(gpt2_dir[0]), "-n", "2"], stdin=b"I like \xff\xfe")
    assert code == 1 and out == "" and one_line_error(err) and "UTF-8" in err
    code, out, _ = run_cli(["run", "-", "--model", str(gpt2_dir[0]), "-n", "2", "--json", "--errors", "replace"], stdin=b"I like \xff")
    assert code == 0 and json.loads(out)["prompt"] == "I like \ufffd"


def test_invalid_utf8_in_the_prompt_argument(gpt2_dir):
    code, _, err = run_cli([b"run".decode(), "I like \udcff", "--model", str(gpt2_dir[0])])
    assert code == 1 and one_line_error(err)


def test_missing_batch_file(gpt2_dir, tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.txt"), "--model", str(gpt2_dir[0])]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "nope.txt" in err


@pytest.mark.parametrize("flag,value", [("--truncate", "right"), ("--errors", "ignore"), ("--device", "tpu")])
def test_unknown_choices(gpt2_dir, capsys, flag, value):
    code = main(["run", "I like", "--model", str(gpt2_dir[0]), flag, value])
    assert code in (1, 2) and one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("args", [
    ["run", "x", "-n", "1000000000.0"], ["run", "x", "-t", "inf"], ["run", "x", "-t", "nan"], ["probs", "x", "--top-p", "NaN"],
    ["beam", "x", "--length-penalty", "nan"], ["beam", "x", "--width", "2.0"], ["batch", "-", "-b", "1e3"],
    ["train", "x", "--lr", "inf"], ["exact", "x", "--max-expansions", "-inf"], ["run", "x", "--dry-base", "infinity"],
])
def test_numbers_are_strict_and_finite(args, capsys):
    """Typer's lax parsing took '3.0' as an integer and 'inf'/'nan' as floats."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "Invalid value for" in err and ("not an integer" in err or "not a finite number" in err), err
