"""Property: whatever a model's own files say, in a GGUF's metadata or in a chat template,
llmgen exits 0, 1 or 2, a failure is one line, and nothing is an internal error or a hang.

Two hunts, in the style of test_fuzz_cli (derandomized and short by default;
LLMGEN_FUZZ_EXAMPLES=N hunts longer with a fresh seed):
- GGUF files whose metadata is rewritten with the ``gguf`` writer: a known key set to a
  value of a random GGUF type (odd strings, huge or negative INT64/UINT64, NaN and
  infinities, bools, arrays of the wrong element type or length, a single entry of an
  array changed), dropped, or the file relabelled as another architecture; each is
  converted, and what converts is run and described by ``info``.
- chat templates composed from a small grammar of Jinja constructs (loops, conditions,
  macros that recurse, huge repeats and ranges, loads, unsafe attributes, unclosed tags),
  nested up to three deep, each rendered by ``run --chat``.
"""

import shutil
from pathlib import Path

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gguf_writer import rewrite_gguf
from llmgen.cli import main
from test_fuzz_cli import fuzz, time_bound
from test_gguf_malformed import llama_gguf, sentencepiece_gguf  # noqa: F401  (fixtures, asked for by name)

T = gguf.GGUFValueType


def assert_clean(code: int, err: str, case) -> None:
    """Exit 0, 1 or 2; no internal error; a failure is one line."""
    assert code in (0, 1, 2), (case, code, err)
    assert "internal error" not in err and "Traceback" not in err, (case, err)
    if code:
        assert err.count("\n") == 1 and err.startswith("llmgen: "), (case, err)


# ---------------------------------------------------------------- GGUF metadata


@pytest.fixture(scope="module")
def gguf_bases(request):
    """test_gguf_malformed's two valid 2-layer Llamas, written once: a byte-level BPE
    vocabulary (merges) and a SentencePiece one (scores, an unknown token)."""
    paths = {"bpe": request.getfixturevalue("llama_gguf"), "sp": request.getfixturevalue("sentencepiece_gguf")}
    return {name: (path, _contents(path)) for name, path in paths.items()}


def _contents(path: Path) -> dict:
    """Each metadata key's value and GGUF type."""
    reader = gguf.GGUFReader(str(path))
    return {f.name: (f.contents(), f.types[0]) for f in reader.fields.values() if not f.name.startswith("GGUF.")}


ARCH_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "rope.dimension_count", "rope.freq_base", "attention.layer_norm_rms_epsilon",
             "attention.layer_norm_epsilon", "vocab_size", "attention.key_length", "attention.value_length",
             "attention.sliding_window", "attention.sliding_window_pattern", "rope.scaling.type", "rope.scaling.factor",
             "use_parallel_residual", "attn_logit_softcapping", "final_logit_softcapping"]
FILE_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
             "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "general.name", "general.license"]
ARRAYS = ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]
ARCHS = ["qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3", "gptneox", "mistral", "", "llama\n"]
INTEGERS = {T.UINT8: (0, 2**8 - 1), T.INT8: (-(2**7), 2**7 - 1), T.UINT16: (0, 2**16 - 1), T.INT16: (-(2**15), 2**15 - 1),
            T.UINT32: (0, 2**32 - 1), T.INT32: (-(2**31), 2**31 - 1), T.UINT64: (0, 2**64 - 1), T.INT64: (-(2**63), 2**63 - 1)}
# Values near the real ones (the model is 64 wide, 4 heads of 16, 2 kv heads, FFN 96,
# 320 or 400 tokens), where a check that is off by one would show.
NEAR = [0, 1, 2, 3, 4, 8, 15, 16, 32, 48, 63, 64, 96, 127, 128, 319, 320, 399, 400, 401, 4096, 2**24, 2**24 + 1,
        2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -1, -(2**31), -(2**63)]
TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " ", "2", "64", "1e4", "nan", "gpt2", "llama", "bert", "linear", "none", "yarn", "llama3", "qwen2", "llama-bpe",
     "a b", "a  b", "\u2581", "<unk>", "{{ messages }}", "{% for %}"])


def _int_value(kind):
    low, high = INTEGERS[kind]
    return st.one_of(st.integers(low, high), st.sampled_from([n for n in NEAR if low <= n <= high]))


def _value():
    """A value and the GGUF type it is written as."""
    scalars = [*(_int_value(kind).map(lambda v, k=kind: (v, k)) for kind in INTEGERS),
               st.floats(width=32).map(lambda v: (v, T.FLOAT32)),
               st.sampled_from([0.0, -0.0, 1e-45, 1e-6, 0.5, 1.0, 1e4, 3.4e38, float("nan"), float("inf"), float("-inf")])
               .map(lambda v: (v, T.FLOAT32)),
               st.floats().map(lambda v: (v, T.FLOAT64)),
               st.sampled_from([5e-324, 1e-300, 1e300, 1.7e308]).map(lambda v: (v, T.FLOAT64)),
               st.booleans().map(lambda v: (v, T.BOOL)),
               TEXT.map(lambda v: (v, T.STRING))]
    # the writer takes an array's element type from its first item (ints: INT32)
    elements = st.one_of(_int_value(T.INT32), st.floats(width=32), st.booleans(), TEXT)
    arrays = st.lists(elements, min_size=1, max_size=6).filter(lambda xs: len({type(x) for x in xs}) == 1)
    return st.one_of(*scalars, arrays.map(lambda v: (v, T.ARRAY)))


@st.composite
def gguf_cases(draw):
    """(base, architecture or None, [mutation]); a mutation is ("set", key, (value, type)),
    ("drop", key), ("resize", array key, length) or ("entry", array key, index, value)."""
    arch = draw(st.none() | st.none() | st.none() | st.sampled_from(ARCHS))
    keys = st.one_of(st.sampled_from(ARCH_KEYS).map(lambda k: f"{{arch}}.{k}"), st.sampled_from(FILE_KEYS))
    mutation = st.one_of(
        st.tuples(st.just("set"), keys, _value()),
        st.tuples(st.just("drop"), keys),
        st.tuples(st.just("resize"), st.sampled_from(ARRAYS), st.sampled_from([1, 2, 10, 319, 321, 399, 401, 1000])),
        st.tuples(st.just("entry"), st.sampled_from(ARRAYS), st.integers(0, 399),
                  st.sampled_from(["", " ", "a", "a b", "a  b", " a", "<0x41>", "\u2581", "<unk>", 0, 3, 4, 7, -1, 1e9,
                                   -1e30, float("nan"), float("inf")])),
    )
    return draw(st.sampled_from(["bpe", "sp"])), arch, draw(st.lists(mutation, min_size=1, max_size=3))


def _rewrite(base, contents, case, out: Path) -> None:
    """``base`` with the case's changes, written by gguf_writer.rewrite_gguf."""
    _, arch, mutations = case
    fields, drop = {}, set()
    if arch is not None:  # relabelled, its llama.* keys renamed to the new architecture's
        fields["general.architecture"] = (arch, T.STRING)
        for key, (value, kind) in contents.items():
            if key.startswith("llama."):
                drop.add(key)
                fields[arch + key.removeprefix("llama")] = (value, kind)
    prefix = arch if arch is not None else "llama"
    for kind, key, *rest in mutations:
        key = key.format(arch=prefix)
        current = fields[key][0] if key in fields else contents.get(key, (None,))[0]
        if kind == "set":
            fields[key] = rest[0]
        elif kind == "drop":
            fields.pop(key, None)
            drop.add(key)
        elif isinstance(current, list) and current:
            value = list(current)
            if kind == "resize":
                value = (value * (rest[0] // len(value) + 1))[: rest[0]]
            else:
                index, item = rest
                value[index % len(value)] = item
                if len({type(v) for v in value}) > 1:  # an array holds one type: the new item's
                    value = [item] * len(value)
            fields[key] = (value, T.ARRAY)
    rewrite_gguf(base, out, fields=fields, drop=sorted(drop))


def test_gguf_metadata_never_crashes(gguf_bases, tmp_path, capsys):
    """Each case rewrites a valid GGUF's metadata, converts it and, when that succeeds,
    runs and describes the converted model."""

    @fuzz(60)
    @given(gguf_cases())
    def check(case):
        base, contents = gguf_bases[case[0]]
        path, out = tmp_path / "case.gguf", tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        _rewrite(base, contents, case, path)
        capsys.readouterr()  # the writer's own warnings (a key written twice)
        for argv in (["convert", str(path), str(out)], ["run", "I like", "-n", "2", "--model", str(out)],
                     ["info", "--model", str(out)]):
            with time_bound(30, (case, argv)):
                code = main(argv)
            assert_clean(code, capsys.readouterr().err, (case, argv))
            if code:
                break

    check()


# ---------------------------------------------------------------- chat templates

NUMBERS = st.sampled_from([0, 1, 10**3, 10**9])
EXPRESSIONS = st.one_of(
    st.sampled_from(["m['content']", "m.role | upper", "m.content | trim", "bos_token", "eos_token", "add_generation_prompt",
                     "messages[99]", "messages[0]['content']", "messages[-1].role", "foo.bar.baz", "x", "x / 0", "1 / 0",
                     "''.__class__", "''.__class__.__mro__", "messages.__len__()", "raise_exception('x')",
                     "raise_exception(m)", "messages | length", "messages | tojson", "messages | map(attribute='content') | join",
                     "loop.index", "loop.cycle('a', 'b')", "namespace(a=1).a", "range(3) | list", "messages | first",
                     "(messages | last).content", "'%s' % messages", "m", "messages + 1", "none.x", "true ~ false"]),
    NUMBERS.map(lambda n: f"'x' * {n}"),
    NUMBERS.map(lambda n: f"range({n}) | list | length"),
    NUMBERS.map(lambda n: f"'x' | center({n})"),
    NUMBERS.map(lambda n: f"{n} ** {n}"),
    NUMBERS.map(lambda n: f"messages[{n}]"),
    NUMBERS.map(lambda n: f"'%0*d' % ({n}, 1)"),
    NUMBERS.map(lambda n: f"'{{:>{n}}}'.format('x')"),
    NUMBERS.map(lambda n: f"'ab' | replace('a', 'x' * {n})"),
    NUMBERS.map(lambda n: f"'x' | indent({n})"),
)
CONDITIONS = st.sampled_from(["m.role == 'user'", "loop.first", "loop.last", "add_generation_prompt", "x", "not messages",
                              "messages", "foo.bar", "messages[0]['role'] == 'system'", "m.content is string", "1 / 0",
                              "x is defined", "messages | length > 1", "raise_exception('no')"])
LEAVES = st.one_of(
    st.sampled_from(["<|im_start|>", "<|im_end|>\n", "hi ", "\n", "{% break %}", "{% continue %}", "{% include 'x' %}",
                     "{% import 'x' as y %}", "{% extends 'x' %}", "{{ ", "{% ", "{% endfor %}", "{% endif %}", "}}",
                     "{# unclosed", "{% raw %}{{", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
                     "{% macro f(n) %}{{ f(n + 1) ~ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                     "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
                     "{% filter upper %}x{% endfilter %}", "{% call x() %}y{% endcall %}"]),
    EXPRESSIONS.map(lambda e: "{{ " + e + " }}"),
    EXPRESSIONS.map(lambda e: "{% set x = " + e + " %}"),
)


def _template(depth: int):
    """A template of nested Jinja constructs, at most ``depth`` deep."""
    if depth == 0:
        return LEAVES
    body = st.lists(_template(depth - 1), min_size=1, max_size=3).map("".join)
    return st.one_of(
        LEAVES,
        body.map(lambda b: "{% for m in messages %}" + b + "{% endfor %}"),
        st.tuples(NUMBERS, body).map(lambda t: f"{{% for i in range({t[0]}) %}}{t[1]}{{% endfor %}}"),
        st.tuples(CONDITIONS, body, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}{t[2]}{{% endif %}}"),
        st.tuples(EXPRESSIONS, body).map(lambda t: f"{{% set x = {t[0]} %}}{t[1]}"),
        body.map(lambda b: "{% set x %}" + b + "{% endset %}{{ x }}"),
        body.map(lambda b: "{% macro f(n) %}" + b + "{{ f(n) }}{% endmacro %}{{ f(1) }}"),
        body.map(lambda b: "{% for m in messages %}" + b),  # unclosed
        body.map(lambda b: "{% if x %}" + b),  # unclosed
    )


TEMPLATES = st.lists(_template(3), min_size=1, max_size=3).map("".join)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny ChatML GPT-2, built once; each case writes its own template into it."""
    from checkpoints import build_chat_model

    path = tmp_path_factory.mktemp("chatml")
    build_chat_model(path)
    return path


def test_chat_templates_never_crash(chat_model, tmp_path, capsys, monkeypatch):
    """Rendering stops on its own after 3 s (template_sandbox.SECONDS): a case given 15 s
    hangs. Its size bound (some 4,000 characters for this model) is checked before a value
    is built: a render whose Python objects took 256 MB at once built one first."""
    import json
    import tracemalloc

    from llmgen import template_sandbox

    # The bound itself is tested in test_chat_template_hardening; here it only has to end runaway cases.
    monkeypatch.setattr(template_sandbox, "SECONDS", 0.5)

    from llmgen import template_sandbox

    model = tmp_path / "model"
    shutil.copytree(chat_model, model)
    peaks, render = [], template_sandbox.render

    def traced(*args, **kwargs):
        tracemalloc.start()
        try:
            return render(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(template_sandbox, "render", traced)

    @fuzz(120)
    @given(TEMPLATES)
    def check(template):
        (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        peaks.clear()
        with time_bound(15, template):
            code = main(["run", "hi", "--chat", "-n", "2", "--model", str(model)])
        assert_clean(code, capsys.readouterr().err, template)
        assert max(peaks, default=0) < 2**28, (template, f"rendering took {max(peaks) >> 20} MB")

    check()
