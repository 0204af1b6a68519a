"""Batch's output file is never damaged, and odd inputs and outputs end in one line.

Each case drives the CLI as a user would and checks the exit code, a single stderr line
(no traceback, no internal error), and, where a file was refused, that not a byte of it
changed."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from llmgen.cli import main


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("llmgen: ") and "Traceback" not in err and "internal" not in err


@pytest.fixture
def job(gpt2_dir, tmp_path):
    """Three prompts and the flags that turn them into a short greedy batch."""
    src = tmp_path / "in.txt"
    src.write_text("I like\nthe fox\ncold coffee\n")
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(gpt2_dir[0]), "-n", "3", "-t", "0"]
    return src, out, flags


def records(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def test_a_file_llmgen_did_not_write_is_never_touched(job, capsys):
    src, out, flags = job
    for content in [b"my notes, no newline at the end", b'{"index": 0, "prompt": "I like"}\nnotes without newline',
                    b'{"other": "tool"}\n', b'{"index": true, "prompt": "I like"}\n']:
        out.write_bytes(content)
        assert main(["batch", str(src), "-o", str(out), *flags]) == 1
        err = capsys.readouterr().err
        assert one_line_error(err) and "nothing was changed" in err, err
        assert out.read_bytes() == content


def test_a_torn_record_of_this_input_is_repaired(job, capsys):
    src, out, flags = job
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    whole = out.read_bytes()
    lines = whole.split(b"\n")
    out.write_bytes(lines[0] + b"\n" + lines[1][:25])  # killed in the middle of the second record
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    again = records(out)
    assert sorted(r["index"] for r in again) == [0, 1, 2]
    assert {r["index"]: r["text"] for r in again} == {r["index"]: r["text"] for r in records_of(whole)}


def records_of(data: bytes):
    return [json.loads(line) for line in data.decode().split("\n") if line]


def test_line_separators_inside_records_are_text_not_line_ends(gpt2_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    prompts = ["one\u2028two", "three\u2029four", "five\u0085six"]
    src.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(gpt2_dir[0]), "-n", "2", "-t", "0"]
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    assert [r["prompt"] for r in sorted(records(out), key=lambda r: r["index"])] == prompts
    capsys.readouterr()
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0  # resumes: reads its own records back
    assert "nothing to do" in capsys.readouterr().err
    text = tmp_path / "in.txt"
    text.write_text("a\u2028b\nc\n", encoding="utf-8")
    assert main(["batch", str(text), *flags]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.split("\n") if line] in (["a\u2028b", "c"], ["c", "a\u2028b"])


def test_resuming_with_other_settings_is_refused(job, capsys):
    src, out, flags = job
    lines = src.read_text().split("\n")
    src.write_text(lines[0] + "\n")
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    src.write_text("\n".join(lines))
    before = out.read_bytes()
    for other in (["-n", "4"], ["--top-k", "5", "-t", "0.7", "-s", "1"], ["--chat"], ["--stop", "x"], ["--ignore-eos"], ["--model", str(out.parent / "x")]):
        capsys.readouterr()
        code = main(["batch", str(src), "-o", str(out), *flags, *other])
        err = capsys.readouterr().err
        assert code != 0 and one_line_error(err), err
        assert out.read_bytes() == before
    assert "max_new_tokens: 3 in record 0, 4 now" in _error(src, out, flags + ["-n", "4"], capsys)
    assert main(["batch", str(src), "-o", str(out), *flags, "-n", "4", "--overwrite"]) == 0
    assert [r["settings"]["max_new_tokens"] for r in records(out)] == [4, 4, 4]


def _error(src, out, flags, capsys) -> str:
    capsys.readouterr()
    assert main(["batch", str(src), "-o", str(out), *flags]) == 1
    return capsys.readouterr().err


def test_a_second_writer_is_refused_naming_the_first(job, capsys):
    src, out, flags = job
    out.touch()
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["batch", str(src), "-o", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and f"PID {os.getpid()}" in err, err
    assert out.read_bytes() == b""


def test_resume_drops_duplicate_records_keeping_the_first(job, capsys):
    src, out, flags = job
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    lines = out.read_text().split("\n")[:-1]
    first = json.loads(lines[0])
    twice = [lines[0], *lines, lines[0].replace(json.dumps(first["text"]), '"changed"')]
    out.write_text("\n".join(twice) + "\n")
    assert main(["batch", str(src), "-o", str(out), *flags]) == 0
    got = records(out)
    assert len(got) == 3 and len({r["index"] for r in got}) == 3
    assert next(r for r in got if r["index"] == first["index"])["text"] == first["text"]


def test_special_outputs(job, tmp_path, capsys):
    src, _, flags = job
    assert main(["batch", str(src), "-o", "/dev/null", *flags]) == 0  # written to, never read
    capsys.readouterr()
    assert main(["batch", str(src), "-o", str(tmp_path), *flags]) == 1
    assert one_line_error(err := capsys.readouterr().err) and "directory" in err
    if os.path.exists("/dev/full"):
        assert main(["batch", str(src), "-o", "/dev/full", *flags]) == 1
        assert one_line_error(err := capsys.readouterr().err) and "no space left" in err, err
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["batch", str(src), "-o", str(fifo), *flags]) == 1  # no reader: an error, not a wait
    assert one_line_error(err := capsys.readouterr().err) and "no reader" in err


def _cli(args, stdin=b"", **kwargs):
    return subprocess.run([sys.executable, "-m", "llmgen", *args], input=stdin, capture_output=True, timeout=120, **kwargs)


def test_dev_stdout_into_a_pipe_and_a_reader_that_leaves(job):
    src, _, flags = job
    proc = _cli(["batch", str(src), "-o", "/dev/stdout", *flags])
    assert proc.returncode == 0 and len(proc.stdout.decode().splitlines()) == 3, proc.stderr
    many = src.parent / "many.txt"
    many.write_text("I like\n" * 200)
    head = subprocess.Popen([sys.executable, "-m", "llmgen", "batch", str(many), "-b", "1", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head.stdout.readline()
    head.stdout.close()  # | head -1
    assert head.wait(timeout=120) == 0
    assert b"error" not in head.stderr.read()


def test_odd_input_records(gpt2_dir, tmp_path):
    flags = ["--model", str(gpt2_dir[0]), "-n", "2", "-t", "0"]
    bom = _cli(["batch", *flags], stdin=b'\xef\xbb\xbf{"prompt": "I like", "id": "a"}\n')
    assert bom.returncode == 0 and json.loads(bom.stdout)["prompt"] == "I like"  # JSON, not a prompt '{"prompt"...'
    for line, words in [(b'{"prompt": "x", "id": NaN}', "NaN is not JSON"), (b'{"prompt": "x", "id": Infinity}', "Infinity"),
                        (b'{"prompt": "x", "id": "\\ud800"}', "lone surrogate")]:
        proc = _cli(["batch", "-", *flags], stdin=line + b"\n")
        err = proc.stderr.decode()
        assert proc.returncode == 1 and one_line_error(err) and words in err, err
    proc = _cli(["batch", "-", *flags, "-t", "0.5", "--seed", str(2**63 - 1)], stdin=b"a\nb\n")
    assert proc.returncode == 2 and one_line_error(proc.stderr.decode()) and "largest seed" in proc.stderr.decode()
