"""batch --ray on a local Ray instance (2 CPUs): the records of a local batch, greedy and
seeded; a worker killed mid-run; a driver killed mid-run and re-run; bad addresses and
a missing extra, refused before INPUT is read."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

# The local instance advertises 127.0.0.1, not this machine's network address (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

from llmgen import batch as batching  # noqa: E402
from llmgen import batch_ray  # noqa: E402
from llmgen.cli import main  # noqa: E402
from llmgen.errors import LlmgenError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog and I like cold coffee with water".split()
RECORDS = 24
FLAGS = ["-n", "16", "--ignore-eos", "-b", "1", "-t", "0.9", "--top-k", "20", "--seed", "7", "--threads", "1"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this file's tests; its workers import this tree's llmgen.
    Module-scoped so that it stops (and frees both cores) as soon as these tests end."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([before] if before else [])])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if before is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Greedy records (their own temperature 0) among sampled ones (-t 0.9 --seed 7,
    two with seeds of their own), prompts of 1 to 12 words."""
    path = tmp_path_factory.mktemp("ray") / "in.jsonl"
    records = []
    for i in range(RECORDS):
        rec = {"prompt": " ".join(WORDS[i % 5 : i % 5 + 1 + i % 12]), "id": f"r{i}"}
        if i % 3 == 0:
            rec["temperature"] = 0
        if i in (4, 11):
            rec["seed"] = 1000 + i
        records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def local(gpt2_dir, prompts, tmp_path_factory):
    """What a local `llmgen batch` writes for the input, by index."""
    out = tmp_path_factory.mktemp("local") / "out.jsonl"
    assert main(["batch", str(prompts), "-o", str(out), "-m", str(gpt2_dir[0]), *FLAGS]) == 0
    return by_index(out)


def by_index(path: Path) -> dict[int, dict]:
    """The records of ``path``, asserting that no index appears twice."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    indices = [r["index"] for r in records]
    assert len(indices) == len(set(indices)), sorted(indices)
    return {r["index"]: r for r in records}


def test_ray_records_equal_the_local_batch(cluster, gpt2_dir, prompts, local, tmp_path, capsys):
    out = tmp_path / "ray.jsonl"
    assert main(["batch", str(prompts), "-o", str(out), "-m", str(gpt2_dir[0]), *FLAGS, "--ray", "--workers", "2"]) == 0
    got = by_index(out)
    assert set(got) == set(range(RECORDS))
    greedy = [i for i in got if i % 3 == 0]
    assert all(got[i]["settings"]["temperature"] == 0 for i in greedy)
    assert all(got[i]["seed"] == (1000 + i if i in (4, 11) else 7 + i) for i in got if i % 3)
    # The same planned batches, run at the same thread count: equal to the bit, logprobs included.
    assert got == local
    assert "24 records written" in capsys.readouterr().err


def test_constrained_records_travel_to_workers(cluster, gpt2_dir, tmp_path):
    """Records with their own constraint (a compiled grammar rides in each job) give the
    local batch's records, each in its language."""
    pytest.importorskip("llguidance", reason="the constrain extra is not installed")
    path = tmp_path / "in.jsonl"
    rows = [{"prompt": "My number is", "regex": "[0-9]{2}"}, {"prompt": "The answer:", "choice": ["yes", "no"]},
            {"prompt": "I like"}, {"prompt": "Now", "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                                    "required": ["a"]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["-m", str(gpt2_dir[0]), "-n", "12", "-t", "0", "--threads", "1"]
    assert main(["batch", str(path), "-o", str(tmp_path / "local.jsonl"), *flags]) == 0
    assert main(["batch", str(path), "-o", str(tmp_path / "ray.jsonl"), *flags, "--ray", "--workers", "1"]) == 0
    local, got = by_index(tmp_path / "local.jsonl"), by_index(tmp_path / "ray.jsonl")
    assert got == local
    assert got[0]["text"].isdigit() and len(got[0]["text"]) == 2 and got[1]["text"] in ("yes", "no")
    assert got[0]["finish_reason"] == got[1]["finish_reason"] == "constraint"
    if got[3]["finish_reason"] == "constraint":  # complete within -n 12: it parses
        assert isinstance(json.loads(got[3]["text"])["a"], int)


def test_a_worker_killed_mid_run_loses_nothing_and_writes_nothing_twice(cluster, gpt2_dir, prompts, local, tmp_path,
                                                                       monkeypatch, capsys):
    finished = batch_ray.Dispatch._finished

    def finished_then_kill(self, ref):
        """After the first chunk is written, kill the worker that wrote it while chunks
        remain: it is idle, so it is the next to be handed one, and dies under it. (Killing
        at a moment chosen by the clock raced with the other worker's start-up.)"""
        worker, _ = self.busy[ref]
        finished(self, ref)
        if not killed and self.queue:
            ray.kill(self.actors[worker])
            killed.append(worker)

    killed = []
    monkeypatch.setattr(batch_ray.Dispatch, "_finished", finished_then_kill)
    out = tmp_path / "ray.jsonl"
    assert main(["batch", str(prompts), "-o", str(out), "-m", str(gpt2_dir[0]), *FLAGS, "--ray", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert killed
    [w] = killed
    assert f"ray: worker {w} died (killed by ray.kill)" in err and f"worker {w} is gone" in err, err
    assert by_index(out) == local


def test_a_killed_driver_is_resumed_by_running_the_command_again(cluster, gpt2_dir, prompts, local, tmp_path):
    out = tmp_path / "ray.jsonl"
    cmd = [sys.executable, "-m", "llmgen", "batch", str(prompts), "-o", str(out), "-m", str(gpt2_dir[0]), *FLAGS,
           "--ray", "auto", "--workers", "2"]
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180  # a bound, not a timing: a loaded machine took over 40 s to start Ray's workers
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1) and driver.poll() is None:
        assert time.monotonic() < deadline, "no record written in 180 s"
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < RECORDS, f"the driver was to die mid-run; {written} records were there"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed: {written} of {RECORDS} were already there" in again.stderr
    assert by_index(out) == local


def planned(model_dir, prompts, n: int) -> list:
    """The first ``n`` records of ``prompts`` planned into batches of 1, as FLAGS plan them."""
    from llmgen import orchestrate as orch

    ckpt = orch.load_vocabulary(str(model_dir))
    records = batching.read_input(str(prompts))[:n]
    options = orch.BatchOptions({"max_new_tokens": 16, "temperature": 0.9, "top_k": 20}, seed=7, ignore_eos=True)
    return batching.plan(orch.batch_jobs(ckpt, records, options, 7), 1)


def test_a_shipped_model_is_read_from_the_object_store(cluster, gpt2_dir, prompts, local, tmp_path):
    """--ship-model: a worker builds its model from the shipped files alone (here, not as
    an actor: the path it is given does not exist)."""
    spec = batch_ray.WorkerSpec(str(gpt2_dir[0]), True, "cpu", "auto", 1, 1, str(gpt2_dir[0]), batching.Extras())
    worker = batch_ray.Worker(replace(spec, model_dir=str(tmp_path / "nowhere")), batch_ray.ship(spec.model_dir))
    assert worker.ready()
    records, tokens = worker.generate(planned(gpt2_dir[0], prompts, 3))
    assert tokens == 16 * 3
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    for rec in records:
        assert rec == local[rec["index"]]


class Quiet:
    """A report that keeps the notes."""

    def __init__(self) -> None:
        self.notes = []

    def update(self, records, tokens):
        pass

    def workers(self, alive):
        pass

    def note(self, text):
        self.notes.append(text)


def test_a_model_a_worker_cannot_load_is_its_one_line_error(cluster, gpt2_dir, prompts, tmp_path):
    spec = batch_ray.WorkerSpec(str(tmp_path / "nowhere"), False, "cpu", "auto", 1, 1, "m", batching.Extras())
    with pytest.raises(LlmgenError, match=r"^\S*nowhere: not a model directory$"):
        batch_ray.generate(spec, planned(gpt2_dir[0], prompts, 2), None, Quiet())


def run_cli(*args: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-m", "llmgen", *args], env=env, capture_output=True, text=True, timeout=60)


def test_an_unreachable_address_is_one_line_before_input_is_read(tmp_path):
    missing = str(tmp_path / "missing.jsonl")  # never read: the address is refused first
    started = time.monotonic()
    got = run_cli("batch", missing, "--ray", "ray://127.0.0.1:1")
    assert got.returncode == 1
    assert got.stderr == "llmgen: error: --ray ray://127.0.0.1:1: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused)\n"
    assert time.monotonic() - started < 30
    got = run_cli("batch", missing, "--ray", "auto", ray_address="127.0.0.1:1")
    assert (got.returncode, got.stderr) == (1, "llmgen: error: --ray auto: cannot reach a Ray cluster at 127.0.0.1:1 "
                                               "(Connection refused)\n")


def test_ray_not_installed_is_one_line_before_input_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["batch", str(tmp_path / "missing.jsonl"), "--ray"]) == 1
    err = capsys.readouterr().err
    assert err == f"llmgen: error: {batch_ray.INSTALL}\n"
    assert "pip install '.[ray]'" in err


@pytest.mark.parametrize("args, message", [
    (["--ray", "prompts.txt"], "--ray prompts.txt: not an address"),
    (["--workers", "2"], "--workers needs --ray"),
    (["--ship-model"], "--ship-model needs --ray"),
    (["--ray", "--device", "cuda:1"], "Ray assigns each worker its GPU"),
])
def test_ray_flags_are_checked_before_anything_runs(tmp_path, capsys, args, message):
    assert main(["batch", str(tmp_path / "missing.jsonl"), *args]) == 2
    assert message in capsys.readouterr().err
