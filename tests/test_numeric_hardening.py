"""Model files, settings and sizes at their extremes: one stderr line, never torch's
"probability tensor contains inf/nan", an allocator's crash, or a hang."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmgen.cli import main


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("llmgen: ") and "Traceback" not in err and "internal" not in err


@pytest.fixture
def copy(gpt2_dir, tmp_path):
    """A writable copy of the test model, to damage."""
    path = tmp_path / "model"
    shutil.copytree(gpt2_dir[0], path)
    return path


def test_a_model_that_produces_nan_is_named(copy, capsys):
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    for command in (["run", "I like", "-n", "3"], ["probs", "I like"], ["run", "I like", "-t", "0", "-n", "3"]):
        assert main([*command, "--model", str(copy)]) == 1
        err = capsys.readouterr().err
        assert one_line_error(err) and str(copy) in err and "NaN or infinite" in err, err


@pytest.mark.parametrize("key,value", [("temperature", "0.7"), ("top_k", "40"), ("top_p", [0.9]), ("max_new_tokens", "20"),
                                       ("top_p", 7), ("temperature", -1), ("do_sample", "yes"), ("repetition_penalty", 0)])
def test_generation_config_values_are_checked_like_flags(copy, capsys, key, value):
    path = copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    assert main(["run", "I like", "-n", "2", "--model", str(copy)]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "generation_config.json" in err and key in err, err


def test_a_tokenizer_with_ids_beyond_the_vocabulary(copy, capsys):
    tok = json.loads((copy / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    word = next(w for w, i in vocab.items() if i == max(vocab.values()))
    vocab[word] = 10_000  # sparse: as many tokens as before, one id far past the model's rows
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    for command in (["run", "I like"], ["score", "I like"]):
        assert main([*command, "--model", str(copy)]) == 1
        err = capsys.readouterr().err
        assert one_line_error(err) and "do not belong together" in err, err


def test_a_config_with_absurdly_many_layers_is_refused_before_building(copy, capsys):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "n_layer": 100_000}))
    assert main(["info", "--model", str(copy)]) == 1  # took minutes and gigabytes before
    err = capsys.readouterr().err
    assert one_line_error(err) and "100000 layers" in err, err


@pytest.mark.parametrize("args", [["run", "x", "--num-samples", str(10**12)], ["beam", "x", "--width", str(10**9)],
                                  ["compare", "x", "--width", str(10**9)]])
def test_sizes_that_cannot_fit_say_what_fits(six_dir, capsys, args):
    assert main([*args, "--model", six_dir]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "GiB is free: at most" in err, err


@pytest.mark.parametrize("args", [
    ["exact", "I", "-n", "100", "--max-expansions", "1"],  # |V|^100 overflowed a float
    ["run", "I", "-n", "3", "--xtc-probability", "1", "--xtc-threshold", "0", "-s", "1"],
    ["run", "I", "-n", "3", "-p", "1e-308", "-s", "1"],  # compares as 0 in float32
    ["run", "I", "-n", "3", "--dynatemp-range", "1", "-t", "1", "--dynatemp-exponent", "1e-300", "-s", "1"],
    ["run", "I", "-n", "3", "--dry-multiplier", "1e308", "--dry-base", "1e308", "-s", "1"],
    ["run", "I", "-n", "3", "--mirostat", "2", "--mirostat-tau", "1e308", "--mirostat-eta", "1e308", "-s", "1"],
])
def test_extreme_but_allowed_settings_run(six_dir, capsys, args):
    assert main([*args, "--model", six_dir]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("args", [["beam", "I", "--length-penalty", "1000"], ["run", "I", "-t", "1e-40"],
                                  ["run", "I", "--repetition-penalty", "1e-45"], ["run", "I", "--frequency-penalty", "1e30"]])
def test_extreme_settings_are_refused_with_their_range(six_dir, capsys, args):
    assert main([*args, "--model", six_dir]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and args[2] in err and ("between" in err or "must be" in err), err


def test_the_cache_grows_without_changing_a_token(tmp_path, tokenizer, monkeypatch):
    """The KV cache starts at the prompt plus 256 slots and doubles: a 500-token run
    equals one whose cache was allocated whole at the start."""
    from checkpoints import build_gpt2

    from llmgen import cache
    from llmgen.checkpoint import load_checkpoint
    from llmgen.config import GenerationConfig, SamplingConfig
    from llmgen.decoding.greedy_sample import generate

    build_gpt2(tmp_path / "long", tokenizer=tokenizer, n_positions=600)
    ckpt = load_checkpoint(tmp_path / "long", device="cpu")
    gen = GenerationConfig(max_new_tokens=500, ignore_eos=True, num_samples=2, seed=3, sampling=SamplingConfig(temperature=0.9))
    grown = generate(ckpt.model, ckpt.encode("I like"), gen, ckpt.decode)
    monkeypatch.setattr(cache, "FIRST_CAPACITY", 10_000)
    whole = generate(ckpt.model, ckpt.encode("I like"), gen, ckpt.decode)
    assert [s.token_ids for s in grown] == [s.token_ids for s in whole] and len(grown[0].token_ids) == 500
