"""`llmgen chat`: the KV cache carried between turns, the slash commands, scripted
through a pipe and driven through a pseudo-terminal."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from llmgen.chat_session import ChatSession


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from checkpoints import build_chat_model

    path = tmp_path_factory.mktemp("chatml")
    build_chat_model(path)
    return path


@pytest.fixture(scope="module")
def ckpt(chat_model):
    from llmgen.checkpoint import load_checkpoint

    return load_checkpoint(chat_model, device="cpu")


GREEDY = {"temperature": 0, "max_new_tokens": 6}


def test_a_new_turn_prefills_only_its_new_tokens(ckpt):
    session = ChatSession(ckpt, dict(GREEDY), system="Be brief.")
    session.reply("Hi there")
    second = session.reply("And then?")
    first_stats, second_stats = session.stats
    assert first_stats.prefilled == first_stats.conversation_tokens  # nothing cached yet
    assert second_stats.prefilled < second_stats.conversation_tokens - first_stats.conversation_tokens + 2
    # the same reply as a session that computes the whole conversation afresh
    fresh = ChatSession(ckpt, dict(GREEDY), system="Be brief.")
    fresh.messages = session.messages[:-1]
    again = fresh._answer(None)
    assert again.token_ids == second.token_ids
    assert again.logprobs == pytest.approx(second.logprobs, abs=1e-4)


def test_a_rewritten_history_cuts_the_cache_back(ckpt):
    """After /undo the conversation is shorter than the cache: the shared prefix is kept,
    the rest recomputed, and the reply is what a fresh session gives."""
    session = ChatSession(ckpt, dict(GREEDY))
    session.reply("Hi there")
    session.reply("Tell me more")
    session.undo()
    redo = session.reply("Something else")
    fresh = ChatSession(ckpt, dict(GREEDY))
    fresh.messages = session.messages[:-1]
    assert fresh._answer(None).token_ids == redo.token_ids
    assert session.stats[-1].prefilled < session.stats[-1].conversation_tokens


def test_settings_retry_undo_and_transcripts(ckpt, tmp_path):
    session = ChatSession(ckpt, dict(GREEDY), seed=5)
    session.reply("Hi")
    session.set("temperature", "0.9")
    session.set("top-k", "20")
    assert session.settings["temperature"] == 0.9 and session.settings["top_k"] == 20
    with pytest.raises(Exception, match="top-p must be"):
        session.set("top-p", "1.5")
    with pytest.raises(Exception, match="no setting"):
        session.set("warmth", "3")
    session.retry()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    session.system = "You are terse."
    session.save(tmp_path / "t.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines[0] == {"role": "system", "content": "You are terse."} and len(lines) == 3
    other = ChatSession(ckpt, dict(GREEDY))
    other.load(tmp_path / "t.jsonl")
    assert other.conversation() == session.conversation()
    session.undo()
    assert session.messages == []


def _chat(*args, stdin: str):
    return subprocess.run([sys.executable, "-m", "llmgen", "chat", *args], input=stdin.encode(), capture_output=True)


def test_piped_turns_and_commands(chat_model, tmp_path):
    script = f"Hi there\n/set temperature 0\nHow are you?\n/retry\n/undo\n/probs\n/save {tmp_path / 's.jsonl'}\n/bogus\n"
    proc = _chat("--model", str(chat_model), "-n", "4", "--seed", "1", stdin=script)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "temperature = 0" in err and "forgot the last exchange" in err and "unknown command /bogus" in err
    assert "step by step" in proc.stdout.decode()
    saved = [json.loads(line)["role"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert saved == ["user", "assistant"]
    again = _chat("--model", str(chat_model), "-n", "4", "--seed", "1", stdin=f"/load {tmp_path / 's.jsonl'}\n/tree\n")
    assert again.returncode == 0 and "beam search, width 2" in again.stdout.decode()


def test_without_a_template_it_continues_text():
    proc = _chat("-n", "4", "--seed", "2", "-t", "0", stdin="I like\n")
    assert proc.returncode == 0
    run = subprocess.run([sys.executable, "-m", "llmgen", "run", "I like", "-n", "4", "-t", "0"], capture_output=True)
    assert proc.stdout == run.stdout


def test_a_terminal_session_survives_ctrl_c():
    """Typed turns, a reply stopped by Ctrl-C (the session goes on), /undo, Ctrl-D."""
    master, slave = pty.openpty()
    # EOS banned and -n past the context: the reply is long enough to be interrupted
    argv = [sys.executable, "-m", "llmgen", "chat", "-t", "1", "--seed", "3", "--threads", "1", "-n", "1000",
            "--logit-bias", "0=-inf"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "LLMGEN_HOME": "/tmp/llmgen-chat-test"})
    os.close(slave)
    seen, pos = b"", 0

    def pump(timeout: float) -> None:
        nonlocal seen
        if select.select([master], [], [], timeout)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                pass

    def wait_for(marker: bytes, timeout: float = 60) -> bool:
        """The next ``marker`` after the last one found."""
        nonlocal pos
        deadline = time.time() + timeout
        while (i := seen.find(marker, pos)) == -1:
            if time.time() > deadline:
                return False
            pump(0.2)
        pos = i + len(marker)
        return True

    try:
        assert wait_for(b"> ")
        os.write(master, b"Once upon a time\n")
        assert wait_for(b"Once upon a time")
        start = len(seen)
        while len(seen) < start + 20:  # some of the reply is on screen
            pump(0.2)
        proc.send_signal(signal.SIGINT)
        assert wait_for(b"interrupted"), seen[-300:]
        assert wait_for(b"> ")
        os.write(master, b"/undo\n")
        assert wait_for(b"forgot the last exchange")
        assert wait_for(b"> ")
        os.write(master, b"\x04")  # Ctrl-D on an empty line
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
