"""Loading: what is honoured, and a one-line error naming the culprit for everything else."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from checkpoints import build_gpt2, train_tokenizer
from llmgen.checkpoint import load_checkpoint
from llmgen.errors import LlmgenError, ModelError


@pytest.fixture
def model_dir(tmp_path, gpt2_dir):
    path = tmp_path / "model"
    shutil.copytree(gpt2_dir[0], path)
    return path


def expect_error(path, *fragments, error=ModelError):
    with pytest.raises(error) as info:
        load_checkpoint(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "not a model directory")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    expect_error(model_dir, "config.json", "not found")


def test_unsupported_model_type(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    expect_error(model_dir, "config.json", "'bert'", "supported: ", "gpt2", "gpt_neox", "gemma3_text")


def test_missing_weights_and_pickles_are_never_read(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    expect_error(model_dir, "model.safetensors", "only safetensors")


def test_truncated_safetensors(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(model_dir, "model.safetensors", "not a readable safetensors file")


def test_corrupt_safetensors_header(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_error(model_dir, "model.safetensors", "not a readable safetensors file")


def test_missing_tensor_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    expect_error(model_dir, "missing tensor 'h.1.mlp.c_fc.weight'")


def test_shape_mismatch_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:10].clone()
    save_file(tensors, model_dir / "model.safetensors")
    expect_error(model_dir, "model.safetensors", "'transformer.wpe.weight'", "shape [10, 32]")


def test_unexpected_tensor_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["transformer.h.9.extra"] = tensors["transformer.wpe.weight"].clone()
    save_file(tensors, model_dir / "model.safetensors")
    expect_error(model_dir, "unexpected tensor 'transformer.h.9.extra'")


def test_missing_shard_is_named(tmp_path, tokenizer):
    build_gpt2(tmp_path, tokenizer=tokenizer, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    expect_error(tmp_path, shard.name, "not found")


def test_missing_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    expect_error(model_dir, "tokenizer.json", "not found")


def test_tokenizer_larger_than_model_vocab(model_dir):
    train_tokenizer(vocab_size=400).save(str(model_dir / "tokenizer.json"))
    expect_error(model_dir, "tokenizer.json", "do not belong together")


def test_unknown_device_and_dtype(model_dir):
    with pytest.raises(LlmgenError, match="--device"):
        load_checkpoint(model_dir, device="tpu")
    with pytest.raises(LlmgenError, match="--dtype"):
        load_checkpoint(model_dir, device="cpu", dtype="int3")


def test_generation_config_is_honoured(model_dir):
    gen = {"eos_token_id": [0, 5], "bos_token_id": 0, "do_sample": False, "top_k": 7, "max_new_tokens": 12}
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    ckpt = load_checkpoint(model_dir, device="cpu")
    assert ckpt.eos_token_ids == (0, 5) and ckpt.bos_token_id == 0
    assert ckpt.generation_defaults == {"temperature": 0.0, "top_k": 7, "max_new_tokens": 12}


def test_bfloat16_load(model_dir):
    import torch

    ckpt = load_checkpoint(model_dir, device="cpu", dtype="bfloat16")
    assert ckpt.dtype == torch.bfloat16
    logits = ckpt.model(torch.tensor([ckpt.encode("I like")]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
