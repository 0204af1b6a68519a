"""Every view at 50, 80 and 120 columns: no line longer than the terminal, and no token
or number cut (each appears whole somewhere in the output)."""

import math
import re

import pytest
from rich.console import Console

from llmgen import render

WIDTHS = [50, 80, 120]


def _draw(renderable, width: int) -> str:
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    console.print(renderable, soft_wrap=False, crop=False)  # an overwide view fails below, not hidden by cropping
    return console.export_text()


def _fits(text: str, width: int) -> None:
    for line in text.splitlines():
        assert len(line) <= width, (width, line)
    assert "…" not in re.sub(r"… \d+ more", "", text)  # Rich's mark of a cell it cut (not the tree's own count)


@pytest.fixture(scope="module")
def embedded():
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    return load_checkpoint(default_model_dir(None), device="cpu")


@pytest.mark.parametrize("token_width", [0, 15])  # 15: as wide as probs makes it for " gentleman ◀"
@pytest.mark.parametrize("width", WIDTHS)
def test_probs_table(embedded, width, token_width):
    from llmgen.config import SamplingConfig
    from llmgen.decoding.probs import follow

    ids = embedded.encode("I like")
    dist = follow(embedded.model, ids, SamplingConfig(temperature=0.7, top_k=5, top_p=0.95), 1, 3, (0,), None)[0]
    text = _draw(render.distribution_table(dist, embedded.token_text, 10, "after \"I like\"", width, token_width,
                                                "top_p=0.95 (generation_config) · seed 3"), width)
    _fits(text, width)
    top = sorted(range(len(dist.raw)), key=lambda i: -dist.raw[i])[:10]
    for t in top:
        assert render.token_label(embedded.token_text(t)) in text
        assert render.prob_text(dist.raw[t]) in text
        if "p@T" in text or "after T" in text:  # the narrowest layout drops it: the final column still counts it
            assert render.prob_text(dist.tempered[t]) in text
    assert width < 60 or "p@T" in text or "after T" in text
    assert "top-k" in text and "stages" in text and "(generation_config) · seed 3" in " ".join(text.split())


def test_the_drawn_token_is_shown_even_outside_top(embedded):
    from llmgen.config import SamplingConfig
    from llmgen.decoding.probs import follow

    ids = embedded.encode("I like")
    for seed in range(40):  # a seed whose draw is not the most probable token
        dist = follow(embedded.model, ids, SamplingConfig(temperature=1.5), 1, seed, (0,), None)[0]
        ranked = sorted(range(len(dist.raw)), key=lambda i: -dist.raw[i])
        if ranked.index(dist.chosen) >= 3:
            break
    text = _draw(render.distribution_table(dist, embedded.token_text, 3, "t", 120), 120)
    assert render.token_label(embedded.token_text(dist.chosen)) + " ◀" in text
    assert f"{ranked.index(dist.chosen) + 1} " in text


def test_small_probabilities_never_read_as_zero():
    assert render.prob_text(0.00003) == "3.0e-05" and render.prob_text(0.5) == "0.5000" and render.prob_text(0) == "0"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["beam", "exact"])
def test_search_trees(embedded, width, kind):
    from llmgen.decoding.beam import BeamConfig, beam_search
    from llmgen.decoding.exact import ExactConfig, exact_search

    ids = embedded.encode("I like")
    if kind == "beam":
        result = beam_search(embedded.model, ids, BeamConfig(width=2, max_new_tokens=4, length_penalty=1.0, eos_token_ids=(0,)))
    else:
        result = exact_search(embedded.model, ids, ExactConfig(max_new_tokens=3, max_expansions=200, eos_token_ids=(0,)), embedded.decode)
    text = _draw(render.search_tree(result.tree, embedded.token_text, "I like", kind, 3, bound_all=kind == "exact"), width)
    _fits(text, width)
    legend = _draw(render.tree_legend(kind), width)
    _fits(legend, width)
    assert "★" in legend and "✗" in legend
    flat = " ".join(text.split())
    for node in result.tree.nodes[1:]:
        if node.id in set(result.tree.best_path):
            assert render.token_label(embedded.token_text(node.token_id)) in text
            assert f"Σ={node.cumulative:.3f}" in flat and f"p={math.exp(node.logprob):.3f}" in flat


@pytest.mark.parametrize("budget", [2000, 3])  # 3: some ranks are not proven
@pytest.mark.parametrize("width", WIDTHS)
def test_exact_top_table(embedded, width, budget):
    from llmgen.decoding.exact import ExactConfig, exact_search

    ids = embedded.encode("I like")
    result = exact_search(embedded.model, ids, ExactConfig(max_new_tokens=3, max_expansions=budget, eos_token_ids=(0,), top=5),
                          embedded.decode)
    texts = [embedded.decode(h.token_ids) for h in result.hypotheses]
    text = _draw(render.exact_table(result, texts, "I like", width), width)
    _fits(text, width)
    flat = " ".join(text.split())
    for h, t in zip(result.hypotheses, texts):
        assert render.token_label(t) in text and f"{h.logprob:.4f}" in text and render.prob_text(math.exp(h.logprob)) in text
    assert "mass covered" in flat and render.prob_text(result.mass) in text
    assert ("no" in text.split()) == (budget == 3)
    summary = _draw(render.exact_summary(result, budget, 5), width)
    _fits(summary, width)
    assert ("each proven in its rank" in " ".join(summary.split())) == (budget == 2000)


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_notes_where_beam_lost_the_optimum(width):
    rows = [{"strategy": "beam (width 4)", "token_ids": [1, 2, 3], "logprob": -12.181, "text": " a man in the world.",
             "note": "lost the optimum at step 3 (-6.829 logprob)"},
            {"strategy": "exact", "token_ids": [4, 0], "logprob": -5.352, "text": " it.\"", "note": "optimal, 33 expansions"}]
    text = _draw(render.compare_table(rows, width), width)
    _fits(text, width)
    flat = " ".join(text.replace("│", " ").split())
    # narrower, the note wraps within its cell (and at 50 joins the strategy's), beside the continuation
    assert all(word in flat.split() for word in "lost the optimum at step 3 (-6.829 logprob)".split())
    assert width < 120 or "lost the optimum at step 3 (-6.829 logprob)" in flat


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_score_and_info(embedded, width):
    from llmgen.checkpoint import describe

    rows = [{"strategy": "greedy", "token_ids": [1, 2], "logprob": -8.902, "text": " a little girl,"},
            {"strategy": "sample (T=1, p=0.95)", "token_ids": [3], "logprob": -16.111, "text": " a silly old gentleman",
             "note": "seed 0"}]
    text = _draw(render.compare_table(rows, width), width)
    _fits(text, width)
    assert "-8.902" in text and "-16.111" in text
    ids = embedded.encode("The cold coffee")
    tokens = [embedded.token_text(t) for t in ids]
    text = _draw(render.score_table(tokens, ids, [None, -2.5, -0.00001], 3.2), width)
    _fits(text, width)
    for t in tokens:
        assert render.token_label(t) in text
    assert "-1.0e-05" in text and "-0.0000" not in text and "\n│ 1 │" in text  # rows from 1, as everywhere
    text = _draw(render.info_table(describe(embedded)), width)
    _fits(text, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_step_table(embedded, width):
    from llmgen.config import GenerationConfig, SamplingConfig
    from llmgen.decoding.greedy_sample import generate

    gen = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=0), ignore_eos=True)
    sample = generate(embedded.model, embedded.encode("I like"), gen, embedded.decode, trace_top=6)[0]
    text = _draw(render.step_table(sample, embedded.token_text, width), width)
    _fits(text, width)
    for step in sample.steps:
        assert render.token_label(embedded.token_text(step.token_id)) in text
        assert render.token_label(embedded.token_text(step.alternatives[1].token_id)) in text


@pytest.mark.parametrize("width", WIDTHS)
def test_step_table_with_long_tokens_drops_columns_not_characters(width):
    from llmgen.decoding.trace import Candidate, Sample, Step

    words = [" capital", " capitals", " Capital", " cap", " national", "<|im_end|>", " Florence"]
    steps = [Step(i, math.log(0.9), tuple(Candidate(j, math.log(0.01 * (j + 1))) for j in range(7))) for i in range(7)]
    text = _draw(render.step_table(Sample(token_ids=list(range(7)), steps=steps), lambda t: words[t], width), width)
    _fits(text, width)
    assert all(render.token_label(w) in text for w in words)


def test_a_long_prompt_is_shown_by_its_end():
    """A 5 MB prompt (with --truncate left) was drawn whole above its tree."""
    long = "word " * 100_000 + "the end"
    assert render.prompt_label(long) == "…" + render.token_label(long[-60:])
    assert render.prompt_label("I like") == render.token_label("I like")


@pytest.mark.parametrize("width", WIDTHS)
def test_lens_table(embedded, width):
    from llmgen.lens import logit_lens

    ids = embedded.encode("The capital of France is")
    lens = logit_lens(embedded.model, ids, top=5)
    text = _draw(render.lens_table(lens, embedded.token_text, [embedded.token_text(t) for t in ids], width), width)
    _fits(text, width)
    for row in lens.rows:
        assert render.token_label(embedded.token_text(row.top[0].token_id)) in text
        assert f"{row.entropy:.2f}" in text
