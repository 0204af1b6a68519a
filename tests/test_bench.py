"""The benchmark scripts still run (on tiny shapes, one repeat). Nothing here is timed:
the numbers they print are for people, in the README."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(tmp_path, *args) -> str:
    env = {**os.environ, "LLMGEN_BENCH_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_run_prints_every_row(tmp_path):
    """The whole bench on one shape (each run spends ~20 s starting processes to time a
    cold start); the other families' shapes are checked to build and load below."""
    out = _run(tmp_path, str(BENCH / "run.py"), "--quick", "--shape", "gpt2-tiny")
    for row in ("decode tok/s, batch 1", "decode tok/s, batch 16", "beam-4 step / greedy step",
                "prefill tok/s, 512-token prompt", "`run -n 1` minus `import torch`", "peak RSS MB",
                "bandwidth bound", "fraction of the bound"):
        assert row in out, (row, out)


def test_batch_throughput_runs(tmp_path):
    out = _run(tmp_path, str(BENCH / "batch_throughput.py"), "--shape", "gpt2-tiny", "--repeats", "1",
               "--new-tokens", "2", "--sizes", "1,4")
    assert out.splitlines()[-1].split()[0] == "4"


def test_sampler_bench_runs(tmp_path):
    out = _run(tmp_path, str(BENCH / "sampler.py"), "--vocab", "300", "--rows", "1,2", "--steps", "2", "--repeats", "1")
    assert "mirostat 2" in out and "draw (the default chain, T=1)" in out


@pytest.mark.parametrize("shape", ["llama-tiny", "neox-tiny"])
def test_every_bench_shape_builds_and_loads(tmp_path, monkeypatch, shape):
    import importlib.util

    from llmgen.checkpoint import load_checkpoint

    monkeypatch.setenv("LLMGEN_BENCH_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_checkpoints", BENCH / "checkpoints.py")  # tests/ has its own
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = load_checkpoint(bench.checkpoint(shape), device="cpu")
    assert ckpt.model.cfg.n_layer == 2 and ckpt.encode("the clocks")


def test_llamacpp_bench_runs(tmp_path):
    """llmgen's rows of the side-by-side bench on a tiny shape; with llama-cpp-python
    installed (it is no test dependency) llama.cpp's own Q8_0 and Q4_0 files are made
    and llmgen's rows for them appear too."""
    out = _run(tmp_path, str(BENCH / "llamacpp.py"), "--quick", "--model", "gpt2-tiny", "--engines", "llmgen")
    rows = {line.split("  ")[0] for line in out.splitlines()}
    assert {"llmgen float32", "llmgen int8", "llmgen int4"} <= rows, out
    if "llama-cpp-python is not installed" not in out:  # llama.cpp's files, converted with --keep-quant
        assert {"llmgen Q8_0 kept", "llmgen Q4_0 kept"} <= rows, out


def test_explore_bench_runs(tmp_path):
    out = _run(tmp_path, str(BENCH / "explore.py"), "--model", "embedded", "--steps", "2", "--threads", "1")
    name, forward, _, engine, _, app, _, redraw, *_ = out.splitlines()[-1].split()
    assert name == "embedded" and 0 < float(forward) and 0 < float(engine) and float(redraw) < float(app)


def test_constrain_bench_runs(tmp_path):
    out = _run(tmp_path, str(BENCH / "constrain.py"), "--models", "embedded", "--steps", "4", "--repeats", "1", "--threads", "1")
    for row in ("json schema {name, city}", "regex date", "any JSON object"):
        assert f"embedded   {row}" in out, out


def test_constrain_libraries_bench_runs(tmp_path):
    out = _run(tmp_path, str(BENCH / "constrain_libraries.py"), "--repeats", "1")
    assert "embedded   llguidance" in out, out
