"""Every command works on every family unchanged: one tiny checkpoint per family through
the command line (the numbers are checked against transformers in test_llama/test_neox)."""

import json

import pytest

from checkpoints import build_llama, build_neox
from llmgen.cli import main

FAMILIES = {
    "qwen3": {"head_dim": 24},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {},
    "gemma2": {"head_dim": 16, "sliding_window": 4, "attn_implementation": "eager"},
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "num_hidden_layers": 3},
    "gpt_neox": {},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model_dir(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt_neox":
        build_neox(path, tokenizer=tokenizer)
    else:
        build_llama(path, request.param, tokenizer=tokenizer, **FAMILIES[request.param])
    return str(path)


@pytest.mark.parametrize(
    "command",
    [["run", "-n", "6", "--seed", "1", "--top-k", "20", "--dry-multiplier", "0.5"], ["beam", "-n", "4", "-w", "2"],
     ["exact", "-n", "2", "--max-expansions", "50"], ["probs", "--steps", "2", "--mirostat", "2"], ["compare", "-n", "3"],
     ["score"], ["info"]],
)
def test_command_runs(model_dir, command, capsys):
    args = [command[0]] + (["The quick brown fox jumps over"] if command[0] != "info" else []) + command[1:]
    assert main([*args, "--model", model_dir, "--json"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records


def test_batch_runs(model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "I like"}\n{"prompt": "The quick brown fox jumps over the lazy dog", "top_p": 0.9}\n')
    assert main(["batch", str(inp), "--model", model_dir, "-n", "5", "--seed", "2"]) == 0
    assert sorted(json.loads(line)["index"] for line in capsys.readouterr().out.splitlines()) == [0, 1]
