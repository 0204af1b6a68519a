"""--threads, $LLMGEN_THREADS, and a default that leaves busy cores alone."""

import pytest
import torch

from llmgen import threads
from llmgen.cli import main


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_flag_then_environment_then_idle_cores(monkeypatch):
    monkeypatch.delenv("LLMGEN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "others_running", lambda: 3)
    assert threads.resolve(None) == 5  # three cores are taken
    monkeypatch.setattr(threads, "others_running", lambda: 20)
    assert threads.resolve(None) == 1  # never fewer than one
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    assert threads.resolve(None) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve(None) == 3
    monkeypatch.setenv("LLMGEN_THREADS", "2")
    assert threads.resolve(None) == 2
    assert threads.resolve(6) == 6


def test_others_running_reads_the_instant_count(monkeypatch, tmp_path):
    fake = tmp_path / "loadavg"
    fake.write_text("3.10 2.00 1.50 4/312 9999\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k))
    assert threads.others_running() == 3  # four running, one of them us; the 3.10 average is not used


def test_the_flag_reaches_torch(capsys):
    assert main(["run", "I like", "-n", "2", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["score", "I like", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["run", "I like", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
