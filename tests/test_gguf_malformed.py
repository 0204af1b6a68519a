"""`llmgen convert` on GGUF files no converter would write, and into places it cannot write.

Each file is a tiny, valid llama.cpp-style GGUF with one thing changed: a key missing,
of the wrong type, out of range or disagreeing with the tensors; a tensor misnamed,
missing or misshapen. Every one must be refused before anything is converted, as one
line naming the file and the key or tensor, with nothing written. Output paths that are
files, inside files, unwritable, or a disk that fills up mid-write must likewise end in
one line and leave no half-written directory.
"""

import errno
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints import build_llama
from gguf_writer import rewrite_gguf, write_gguf
from llmgen.cli import main

U64, I32, F32, STR, BOOL = (gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32,
                            gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tokenizer):
    """A 2-layer Llama (width 64, 4 heads of 16, 2 key/value heads, FFN 96, 320 tokens)."""
    path = tmp_path_factory.mktemp("gguf")
    write_gguf(path / "m.gguf", build_llama(path / "hf", "llama", tokenizer=tokenizer), tokenizer)
    return path / "m.gguf"


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("llmgen: error: ") and "internal error" not in err and "Traceback" not in err


def convert_fails(tmp_path, capsys, gguf_path, *extra, out=None) -> str:
    """Run `llmgen convert`; it must fail with one line and write nothing. The line."""
    out = out or tmp_path / "out"
    before = set(out.parent.iterdir()) if out.parent.is_dir() else set()
    capsys.readouterr()  # what building the file printed
    assert main(["convert", str(gguf_path), str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err), err
    if out.parent.is_dir():
        assert set(out.parent.iterdir()) == before  # no output, no .partial beside it
    return err


def renamed(old: str, new: str):
    return lambda tensors: {new if name == old else name: t for name, t in tensors.items()}


def without(*prefixes: str):
    return lambda tensors: {name: t for name, t in tensors.items() if not name.startswith(prefixes)}


def reshaped(name: str, shape: tuple):
    """``shape`` in PyTorch's order; GGUF arrays are stored the same way (rows first)."""
    return lambda tensors: {n: (np.zeros(shape, np.float32) if n == name else t) for n, t in tensors.items()}


def test_the_unchanged_copy_converts(llama_gguf, tmp_path, capsys):
    """The copying helper itself changes nothing a conversion notices."""
    rewrite_gguf(llama_gguf, tmp_path / "copy.gguf")
    assert main(["convert", str(tmp_path / "copy.gguf"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


# (changes to the file, the key or tensor the message must name, words it must contain)
METADATA = {
    "no block_count": ({"drop": ["llama.block_count"]}, "llama.block_count", "missing"),
    "no head_count": ({"drop": ["llama.attention.head_count"]}, "llama.attention.head_count", "missing"),
    "no embedding_length": ({"drop": ["llama.embedding_length"]}, "llama.embedding_length", "missing"),
    "no feed_forward_length": ({"drop": ["llama.feed_forward_length"]}, "llama.feed_forward_length", "missing"),
    "head_count 0": ({"fields": {"llama.attention.head_count": 0}}, "llama.attention.head_count", "between 1"),
    "head_count_kv 0": ({"fields": {"llama.attention.head_count_kv": 0}}, "llama.attention.head_count_kv", "between 1"),
    # 64 wide: 3 heads of one size do not fit (no rotary count to give the head size)
    "head_count not dividing the width": (
        {"fields": {"llama.attention.head_count": 3, "llama.attention.head_count_kv": 1}, "drop": ["llama.rope.dimension_count"]},
        "llama.attention.head_count", "does not divide llama.embedding_length"),
    # with heads of 16 stated, 3 heads make Q 48 rows where the tensor has 64
    "head_count disagreeing with attn_q": (
        {"fields": {"llama.attention.head_count": 3, "llama.attention.head_count_kv": 1}},
        "blk.0.attn_q.weight", "llama.attention.head_count"),
    "head_count_kv not dividing head_count": (
        {"fields": {"llama.attention.head_count_kv": 3}}, "llama.attention.head_count_kv", "does not divide"),
    "head_count_kv disagreeing with attn_k": (
        {"fields": {"llama.attention.head_count_kv": 4}}, "blk.0.attn_k.weight", "llama.attention.head_count_kv"),
    "odd head size": ({"fields": {"llama.rope.dimension_count": 15}}, "llama.rope.dimension_count", "even"),
    "block_count a string": ({"fields": {"llama.block_count": "2"}}, "llama.block_count", "integer, not str"),
    "block_count a float": ({"fields": {"llama.block_count": (2.0, F32)}}, "llama.block_count", "integer, not float"),
    "block_count a bool": ({"fields": {"llama.block_count": (True, BOOL)}}, "llama.block_count", "integer, not bool"),
    "block_count a list": ({"fields": {"llama.block_count": [2, 2]}}, "llama.block_count", "integer, not a list"),
    "block_count negative": ({"fields": {"llama.block_count": (-2, I32)}}, "llama.block_count", "is -2"),
    "block_count huge": ({"fields": {"llama.block_count": 10**6}}, "llama.block_count", "2 layers"),
    "block_count at the uint32 limit": ({"fields": {"llama.block_count": 2**31 - 1}}, "llama.block_count", "2 layers"),
    "block_count past uint32": ({"fields": {"llama.block_count": (2**40, U64)}}, "llama.block_count", "between 1"),
    "block_count short": ({"fields": {"llama.block_count": 1}}, "llama.block_count", "2 layers"),
    "block_count long": ({"fields": {"llama.block_count": 3}}, "llama.block_count", "2 layers"),
    "embedding_length huge": ({"fields": {"llama.embedding_length": (2**40, U64)}}, "llama.embedding_length", "between 1"),
    "embedding_length wrong": ({"fields": {"llama.embedding_length": 48}}, "token_embd.weight", "llama.embedding_length"),
    "feed_forward_length wrong": ({"fields": {"llama.feed_forward_length": 50}}, "blk.0.ffn_gate.weight", "llama.feed_forward_length"),
    "context_length huge": ({"fields": {"llama.context_length": (2**40, U64)}}, "llama.context_length", "between 1"),
    "rope base negative": ({"fields": {"llama.rope.freq_base": -1.0}}, "llama.rope.freq_base", "above 0"),
    "rope base a string": ({"fields": {"llama.rope.freq_base": "1e4"}}, "llama.rope.freq_base", "number"),
    "linear rope without a factor": ({"fields": {"llama.rope.scaling.type": "linear"}}, "llama.rope.scaling.factor", "missing"),
    "vocab_size below the tokens": ({"fields": {"llama.vocab_size": 100}}, "llama.vocab_size", "320 tokens"),
    "vocab_size above the embedding": ({"fields": {"llama.vocab_size": 400}}, "token_embd.weight", "llama.vocab_size"),
    "no token list": ({"drop": ["tokenizer.ggml.tokens"]}, "tokenizer.ggml.tokens", "missing"),
    "token list of numbers": ({"fields": {"tokenizer.ggml.tokens": [1, 2, 3]}}, "tokenizer.ggml.tokens", "str"),
    "token list a string": ({"fields": {"tokenizer.ggml.tokens": "abc"}}, "tokenizer.ggml.tokens", "list"),
    "no tokenizer model": ({"drop": ["tokenizer.ggml.model"]}, "tokenizer.ggml.model", "missing"),
    "BOS beyond the vocabulary": ({"fields": {"tokenizer.ggml.bos_token_id": 10**6}}, "tokenizer.ggml.bos_token_id", "320 tokens"),
    "EOS just past the vocabulary": ({"fields": {"tokenizer.ggml.eos_token_id": 320}}, "tokenizer.ggml.eos_token_id", "320 tokens"),
    "EOS negative": ({"fields": {"tokenizer.ggml.eos_token_id": (-1, I32)}}, "tokenizer.ggml.eos_token_id", "is -1"),
    "BOS a string": ({"fields": {"tokenizer.ggml.bos_token_id": "0"}}, "tokenizer.ggml.bos_token_id", "integer"),
    "merge without a space": ({"fields": {"tokenizer.ggml.merges": ["ab"]}}, "tokenizer.ggml.merges", "entry 0"),
    "merge of unknown tokens": ({"fields": {"tokenizer.ggml.merges": ["\u0100\u0101 zz"]}}, "tokenizer.ggml.merges", "token list"),
    "token types of strings": ({"fields": {"tokenizer.ggml.token_type": ["x"]}}, "tokenizer.ggml.token_type", "int"),
    "chat template a number": ({"fields": {"tokenizer.chat_template": 7}}, "tokenizer.chat_template", "string"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_bad_metadata_is_refused_naming_the_key(llama_gguf, tmp_path, capsys, case):
    changes, named, words = METADATA[case]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(llama_gguf, bad, **changes)
    err = convert_fails(tmp_path, capsys, bad)
    assert "bad.gguf" in err and repr(named) in err and words in err, err


# (tensors of the file -> those written, what the message must contain)
TENSORS = {
    "layer index not a number": (renamed("blk.0.attn_q.weight", "blk.x.attn_q.weight"), ["'blk.x.attn_q.weight'", "no layer index"]),
    "no layer index at all": (renamed("blk.0.attn_q.weight", "blk.attn_q.weight"), ["'blk.attn_q.weight'", "no layer index"]),
    "layer index without a kind": (renamed("blk.0.attn_q.weight", "blk.0"), ["'blk.0'", "blk.N.KIND.weight"]),
    "layer tensor without a leaf": (renamed("blk.0.attn_q.weight", "blk.0.attn_q"), ["'blk.0.attn_q'", "blk.N.KIND.weight"]),
    "unknown kind": (renamed("blk.0.attn_q.weight", "blk.0.attn_zz.weight"), ["'blk.0.attn_zz.weight'", "no Hugging Face counterpart"]),
    "unknown leaf": (renamed("output_norm.weight", "output_norm.scale"), ["'output_norm.scale'", "no Hugging Face counterpart"]),
    "a whole layer missing": (without("blk.1."), ["'llama.block_count'", "1 layer (blk.0 to blk.0)"]),
    "the first layer missing": (without("blk.0."), ["'llama.block_count'", "none for layer 0"]),
    "a layer past block_count": (renamed("blk.1.attn_q.weight", "blk.7.attn_q.weight"), ["'llama.block_count'", "none for layer 2"]),
    "an absurd layer index": (renamed("blk.1.attn_q.weight", f"blk.{10**30}.attn_q.weight"), ["'llama.block_count'", "none for layer 2"]),
    "one tensor of a layer missing": (without("blk.1.attn_k.weight"), ["layer 1 has no tensor 'blk.1.attn_k.weight'"]),
    "an extra tensor in a layer": (lambda t: {**t, "blk.1.attn_q.bias": np.zeros(64, np.float32)}, ["layer 0 has no tensor 'blk.0.attn_q.bias', which layer 1 has"]),
    "no embedding": (without("token_embd."), ["'token_embd.weight'"]),
    "no final norm": (without("output_norm."), ["'output_norm.weight'"]),
    "a matrix transposed": (reshaped("blk.1.ffn_down.weight", (96, 64)), ["'blk.1.ffn_down.weight'", "[96, 64]", "[64, 96]"]),
    "a norm too short": (reshaped("blk.0.attn_norm.weight", (63,)), ["'blk.0.attn_norm.weight'", "[63]", "llama.embedding_length"]),
    "a vector where a matrix goes": (reshaped("output.weight", (320 * 64,)), ["'output.weight'", "[20480]"]),
    "a bias of the wrong length": (lambda t: {**t, **{f"blk.{i}.attn_q.bias": np.zeros(60, np.float32) for i in (0, 1)}},
                                   ["'blk.0.attn_q.bias'", "[60]", "[64]"]),
    "integer weights": (lambda t: {n: (v.astype(np.int32) if n == "blk.0.ffn_up.weight" else v) for n, v in t.items()},
                        ["'blk.0.ffn_up.weight'", "I32"]),
}


@pytest.mark.parametrize("case", sorted(TENSORS))
def test_tensors_that_disagree_with_the_metadata_are_refused(llama_gguf, tmp_path, capsys, case):
    change, expected = TENSORS[case]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(llama_gguf, bad, tensors=change)
    err = convert_fails(tmp_path, capsys, bad)
    assert "bad.gguf" in err and all(words in err for words in expected), err


def test_a_gemma3_window_pattern_must_cover_every_layer(tmp_path, tokenizer, capsys):
    ref = build_llama(tmp_path / "hf", "gemma3_text", tokenizer=tokenizer, head_dim=16, num_hidden_layers=3,
                      tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    write_gguf(tmp_path / "g.gguf", ref, tokenizer)
    rewrite_gguf(tmp_path / "g.gguf", tmp_path / "bad.gguf", fields={"gemma3.attention.sliding_window_pattern": [True, False]})
    err = convert_fails(tmp_path, capsys, tmp_path / "bad.gguf")
    assert "'gemma3.attention.sliding_window_pattern'" in err and "2 entries" in err and "is 3" in err


# ---- where the converted model goes ---------------------------------------------------

def test_output_that_is_a_file_is_refused_even_with_force(llama_gguf, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    for extra in ([], ["--force"]):
        err = convert_fails(tmp_path, capsys, llama_gguf, *extra, out=target)
        assert "notes.txt is a file" in err
        assert target.read_text() == "mine\n"


def test_converting_onto_the_gguf_or_its_directory_never_deletes_it(llama_gguf, tmp_path, capsys):
    gguf_path = tmp_path / "here" / "m.gguf"
    gguf_path.parent.mkdir()
    shutil.copy(llama_gguf, gguf_path)
    data = gguf_path.read_bytes()
    assert "is a file" in convert_fails(tmp_path, capsys, gguf_path, "--force", out=gguf_path)
    assert "holds m.gguf" in convert_fails(tmp_path, capsys, gguf_path, "--force", out=gguf_path.parent)
    assert gguf_path.read_bytes() == data


@pytest.mark.parametrize("where", ["under a file", "deeper under a file", "in /proc"])
def test_unwritable_output_is_one_line(llama_gguf, tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = {"under a file": tmp_path / "f" / "model", "deeper under a file": tmp_path / "f" / "a" / "model",
           "in /proc": Path("/proc/llmgen-model")}[where]
    assert main(["convert", str(llama_gguf), str(out)]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and f"cannot write {out}" in err, err
    assert not out.exists() and (tmp_path / "f").read_text() == "x"


def test_converting_into_an_empty_directory_is_allowed(llama_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(llama_gguf), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_in_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("how", ["save_weights", "safetensors", "tokenizer.json"])
def test_a_full_disk_mid_convert_leaves_nothing(llama_gguf, tmp_path, capsys, monkeypatch, how):
    """Whichever write meets the full disk (safetensors reports it as its own error, not
    an OSError), the message is one line naming the output, and no directory is left."""
    if how == "save_weights":
        monkeypatch.setattr("llmgen.checkpoint.save_weights", _full_disk)
    elif how == "safetensors":
        monkeypatch.setattr("safetensors.torch.save_file", _full_disk_in_safetensors)
    else:
        real = Path.write_text
        monkeypatch.setattr("pathlib.Path.write_text",
                            lambda self, *a, **k: _full_disk() if self.name == "tokenizer.json" else real(self, *a, **k))
    err = convert_fails(tmp_path, capsys, llama_gguf)
    assert "no space left" in err and str(tmp_path / "out") in err


def test_a_failed_replacement_keeps_the_old_model(llama_gguf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["convert", str(llama_gguf), str(out), "--dtype", "float32"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("llmgen.checkpoint.save_weights", _full_disk)
    assert "no space left" in convert_fails(tmp_path, capsys, llama_gguf, "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupted_convert_leaves_nothing(llama_gguf, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmgen.checkpoint.save_weights", interrupt)
    assert main(["convert", str(llama_gguf), str(tmp_path / "out")]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A Llama with a SentencePiece vocabulary (scores, an unknown token, BOS added)."""
    import io

    import sentencepiece

    from checkpoints import CORPUS, train_tokenizer

    path = tmp_path_factory.mktemp("sp")
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 5), model_writer=proto, vocab_size=400,
                                             model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    ref = build_llama(path / "hf", "llama", tokenizer=train_tokenizer(), vocab_size=sp.get_piece_size(),
                      bos_token_id=1, eos_token_id=2)
    write_gguf(path / "sp.gguf", ref, sentencepiece=sp)
    return path / "sp.gguf"


SENTENCEPIECE = {
    "scores short": ({"tokenizer.ggml.scores": [0.0] * 10}, "tokenizer.ggml.scores", "10 entries for the 400 tokens"),
    "scores of strings": ({"tokenizer.ggml.scores": ["x"] * 400}, "tokenizer.ggml.scores", "str"),
    "unknown token beyond the vocabulary": ({"tokenizer.ggml.unknown_token_id": 400}, "tokenizer.ggml.unknown_token_id", "400 tokens"),
    "add_bos_token a number": ({"tokenizer.ggml.add_bos_token": 1}, "tokenizer.ggml.add_bos_token", "true or false"),
}


@pytest.mark.parametrize("case", sorted(SENTENCEPIECE))
def test_bad_sentencepiece_vocabulary_is_refused(sentencepiece_gguf, tmp_path, capsys, case):
    fields, named, words = SENTENCEPIECE[case]
    rewrite_gguf(sentencepiece_gguf, tmp_path / "bad.gguf", fields=fields)
    err = convert_fails(tmp_path, capsys, tmp_path / "bad.gguf")
    assert repr(named) in err and words in err, err


def test_the_sentencepiece_file_converts(sentencepiece_gguf, tmp_path):
    assert main(["convert", str(sentencepiece_gguf), str(tmp_path / "out")]) == 0
