"""Property: whatever flags, prompt bytes or damaged model files a user throws at the CLI,
it exits 0, 1 or 2 with a message, never with an internal error (an uncaught exception)
or a hang; and every view prints the user's text as text.

The default run is derandomized and short; LLMGEN_FUZZ_EXAMPLES=2000 explores further,
with a fresh random seed, when hunting."""

import io
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import build_six_word_model
from llmgen.cli import main

NUMBERS = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats(-3, 3).map(repr),
    st.sampled_from(["0", "1", "nan", "inf", "-inf", "abc", "", "1e9", "0.5", "1e308", "-1e308", "1e-308", "5e-324",
                     "3.0", str(2**63), str(10**12), str(-(10**18)), "1_000"]),
)
SAMPLERS = ["--typical-p", "--epsilon-cutoff", "--eta-cutoff", "--top-n-sigma", "--xtc-probability", "--xtc-threshold",
            "--dynatemp-range", "--presence-penalty", "--repeat-last-n", "--dry-multiplier", "--dry-sequence-breaker",
            "--min-new-tokens", "--no-repeat-ngram-size", "--bad-words", "--logit-bias", "--mirostat", "--samplers"]
FLAGS = {
    "run": ["-n", "-t", "-k", "-p", "--min-p", "--repetition-penalty", "--seed", "--num-samples", "--stop", "--truncate", "--errors", *SAMPLERS],
    "beam": ["-w", "-n", "--length-penalty", "--num-return", "--no-repeat-ngram-size", "--tree-top", "--truncate"],
    "exact": ["-n", "--max-expansions", "--top", "--tree-top", "--truncate"],
    "probs": ["--steps", "--top", "-t", "-k", "-p", "--min-p", "--seed", *SAMPLERS],
    "compare": ["-n", "-w", "-t", "-k", "-p", "--seed", "--max-expansions"],
    "score": ["--errors"],
    "explore": ["--script", "-t", "-k", "-p", "--seed", "--top", "--truncate", *SAMPLERS],
}
SWITCHES = {"run": ["--json", "--echo", "--ignore-eos", "--show-probs", "--show-tree"], "beam": ["--json", "--show-tree", "--early-stopping"],
            "exact": ["--json", "--show-tree"], "probs": ["--json"], "compare": ["--json"], "score": ["--json"],
            "explore": ["--json"]}
TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\udcff", "\x00", "\n", "…"]), max_size=40)
ACTIONS = st.sampled_from(["take like", "take id 3", "take id 99", "take 'cold water'", "take '\\n'", "take ''", "back",
                           "back 3", "greedy 2", "sample 3", "beam 2 2", "exact 2", "set top-k 2", "set seed -1",
                           "set temperature 0", "set mirostat 2", "show", "tree", "greedy 40", "take 'a"])
SCRIPTS = st.lists(ACTIONS | TEXT, max_size=5).map("; ".join)  # no export: it would write files


@st.composite
def invocations(draw):
    cmd = draw(st.sampled_from(sorted(FLAGS)))
    argv = [cmd]
    for flag in draw(st.lists(st.sampled_from(FLAGS[cmd]), max_size=4, unique=True)):
        value = draw(st.one_of(NUMBERS, st.sampled_from(["none", "left", "strict", "replace", "top-k,xtc", "coffee=-inf", "5=2"]), TEXT))
        argv += [flag, draw(SCRIPTS) if flag == "--script" else value]
    argv += draw(st.lists(st.sampled_from(SWITCHES[cmd]), max_size=2, unique=True))
    stdin = b""
    if draw(st.booleans()):
        argv.append(draw(TEXT))
    else:
        argv.append("-")
        stdin = draw(st.binary(max_size=40))
    return argv, stdin


def test_cli_never_crashes(tmp_path_factory, capsys, monkeypatch):
    model = tmp_path_factory.mktemp("six")
    build_six_word_model(model)

    @fuzz(120)
    @given(invocations())
    def check(invocation):
        argv, stdin = invocation
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        with time_bound(30, argv):
            code = main([*argv, "--model", str(model)])
        out, err = capsys.readouterr()
        assert code in (0, 1, 2), (argv, err)
        assert "internal error" not in err and "Traceback" not in err, (argv, err)

    check()


def fuzz(default_examples: int):
    """Hypothesis settings: derandomized so CI is repeatable, unless LLMGEN_FUZZ_EXAMPLES asks for a hunt."""
    examples = int(os.environ.get("LLMGEN_FUZZ_EXAMPLES", 0))
    return settings(max_examples=examples or default_examples, derandomize=not examples, deadline=None,
                    suppress_health_check=list(HealthCheck))


@contextmanager
def time_bound(seconds: int, case):
    """Fail the case, rather than hang the suite, when it runs past ``seconds``."""
    def expire(*_):
        raise AssertionError(f"took over {seconds} s: {case!r}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BRACKETS = st.lists(st.sampled_from(list("[]/=bold red#x ") + ["[/]", "[/bold]", "[b]", "[link=x]", ":smile:", "\\["]),
                    max_size=12).map("".join)


@fuzz(60)
@given(text=BRACKETS)
def test_every_view_prints_user_text_as_text(text):
    """Prompts, tokens, paths and model names reach Rich in titles, cells and tree labels;
    a '[/bold]' among them raised MarkupError, and '[b]x' lost its brackets."""
    from llmgen import render
    from llmgen.decoding.trace import Candidate, Sample, Step

    console = render.make_console(file=io.StringIO(), width=100, record=True)
    steps = [Step(0, -0.1, (Candidate(0, -0.1), Candidate(1, -2.0)))]
    tokens = {0: text, 1: "[/]"}
    views = [
        render.step_table(Sample(token_ids=[0], steps=steps), tokens.get, 100),
        render.compare_table([{"strategy": text, "token_ids": [0], "logprob": -1.0, "text": text, "note": text}], 100),
        render.score_table([text, "[b]"], [0, 1], [None, -1.0], 2.0),
        render.info_table({**{key: text for key in render.INFO_KEYS}, "features": [text], "generation_defaults": {"x": text},
                           "files": {text: 3}, "eos_token_ids": [1]}),
        render.models_table([{"name": text, "bytes": 10, "source": {"embedded": text}}], False),
        render.sample_header(1, 5, text, 3),
        render.pulled_summary(text, f"/x/{text}"),
    ]
    for view in views:
        console.print(view)
    shown = console.export_text()
    assert text.strip() == "" or render.token_label(text) in shown or text in shown.replace("\n", "")


def _mutations():
    """One damage to one file of a model directory: a JSON key set to an odd value, a file
    cut short, or bytes of the safetensors header overwritten."""
    odd = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5),
                    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    keys = {"config.json": ["n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "model_type", "layer_norm_epsilon",
                            "activation_function", "tie_word_embeddings", "bos_token_id", "eos_token_id"],
            "generation_config.json": ["temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id", "bos_token_id",
                                       "do_sample", "repetition_penalty", "min_p"]}
    set_key = st.tuples(st.just("set"), st.sampled_from(sorted(keys)), st.data()).map(
        lambda t: ("set", t[1], t[2].draw(st.sampled_from(keys[t[1]])), t[2].draw(odd)))
    cut = st.tuples(st.just("cut"), st.sampled_from(["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"]),
                    st.floats(0, 1))
    flip = st.tuples(st.just("flip"), st.integers(0, 200), st.binary(min_size=1, max_size=8))
    return st.one_of(set_key, cut, flip)


def _damage(path, mutation) -> None:
    kind = mutation[0]
    if kind == "set":
        _, name, key, value = mutation
        data = json.loads((path / name).read_text())
        data[key] = value
        (path / name).write_text(json.dumps(data))
    elif kind == "cut":
        _, name, fraction = mutation
        raw = (path / name).read_bytes()
        (path / name).write_bytes(raw[: int(len(raw) * fraction)])
    else:
        _, at, junk = mutation
        raw = bytearray((path / "model.safetensors").read_bytes())
        raw[at : at + len(junk)] = junk
        (path / "model.safetensors").write_bytes(bytes(raw))


def test_damaged_model_directories(gpt2_dir, tmp_path, capsys):
    """Each case damages a copy of a good model and loads it twice (info, run)."""
    good = gpt2_dir[0]

    @fuzz(40)
    @given(_mutations())
    def check(mutation):
        model = tmp_path / "model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(good, model)
        _damage(model, mutation)
        for argv in (["info"], ["run", "I like", "-n", "2", "-s", "1"]):
            with time_bound(30, (mutation, argv)):
                code = main([*argv, "--model", str(model)])
            err = capsys.readouterr().err
            assert code in (0, 1, 2), (mutation, argv, err)
            assert "internal error" not in err and "Traceback" not in err, (mutation, argv, err)

    check()
