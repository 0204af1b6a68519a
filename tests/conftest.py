import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Commands join piped stdin to their PROMPT: whatever pipe the harness left on fd 0 must
# not reach the llmgen processes that tests start (they pass input= when they mean it).
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)

from checkpoints import build_gpt2, build_six_word_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A 2-layer GPT-2 written by transformers; returns (directory, transformers model)."""
    path = tmp_path_factory.mktemp("gpt2")
    return path, build_gpt2(path, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def ckpt(gpt2_dir):
    from llmgen.checkpoint import load_checkpoint

    return load_checkpoint(gpt2_dir[0], device="cpu")


@pytest.fixture(scope="session")
def six_dir(tmp_path_factory):
    """The six-word GPT-2 (every continuation can be enumerated), as a model directory path."""
    path = tmp_path_factory.mktemp("six")
    build_six_word_model(path)
    return str(path)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory, tokenizer):
    """Another random GPT-2 over the same tokenizer, one layer deep: a speculative draft
    model that is mostly wrong."""
    path = tmp_path_factory.mktemp("draft")
    build_gpt2(path, tokenizer=tokenizer, seed=1, n_layer=1)
    return path
