"""Speculative decoding equals plain decoding: the same tokens when greedy, whatever drafts
them and wherever the text ends; the same distribution when sampling, tested against
the exact distribution of the first three tokens on the six-word model."""

from collections import Counter

import pytest
import torch
from checkpoints import build_gpt2, build_six_word_model

from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.drafts import Speculate, lookup
from llmgen.decoding.greedy_sample import generate
from llmgen.decoding.speculative import generate_speculative
from llmgen.sampling import build_sampler
from llmgen.sampling.terminal import speculative_rule

PROMPT = "I like cold coffee and I like"


@pytest.fixture(scope="module")
def other(other_dir):
    return load_checkpoint(other_dir, device="cpu")


@pytest.fixture(scope="module")
def six(six_dir):
    return load_checkpoint(six_dir, device="cpu")


@pytest.fixture(scope="module")
def six_draft(tmp_path_factory):
    """Another six-word model: its q differs from the model's p everywhere."""
    path = tmp_path_factory.mktemp("six-draft")
    build_six_word_model(path, seed=1, init_scale=0.5)
    return load_checkpoint(path, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny passes: one thread avoids waiting at barriers on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(n=30, **kw):
    return GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=0, **kw.pop("sampling", {})), **kw)


def plain_and_speculative(ckpt, gen, spec, prompt=PROMPT):
    ids = ckpt.encode(prompt)
    return generate(ckpt.model, ids, gen, ckpt.decode)[0], generate_speculative(ckpt.model, ids, gen, ckpt.decode, spec)[0]


def assert_same(plain, spec):
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
    assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert spec.entropies == pytest.approx(plain.entropies, abs=1e-4)


# ---------------------------------------------------------------- greedy: the same tokens


def test_greedy_with_itself_as_draft_keeps_every_draft(ckpt):
    plain, spec = plain_and_speculative(ckpt, greedy(30, ignore_eos=True), Speculate(4, ckpt.model))
    assert_same(plain, spec)
    s = spec.speculation
    assert s.method == "draft-model" and s.accepted == s.drafted > 0 and s.acceptance_rate == 1.0
    assert len(s.rounds) < 30 / 4  # every round yields its draft and a bonus
    assert all(r.token_id is not None and not r.resampled for r in s.rounds)


def test_greedy_with_a_wrong_draft_model_is_still_plain_greedy(ckpt, other):
    plain, spec = plain_and_speculative(ckpt, greedy(30, ignore_eos=True), Speculate(3, other.model))
    assert_same(plain, spec)
    s = spec.speculation
    assert s.acceptance_rate < 0.5 and any(r.resampled for r in s.rounds)
    for r in s.rounds:  # a rejected draft is replaced by the argmax, which p gives 1
        assert r.p[: r.accepted] == [1.0] * r.accepted
        if r.resampled:
            assert r.p[r.accepted] == 0.0 and r.token_p == 1.0


def test_greedy_with_prompt_lookup(ckpt):
    prompt = "I like cold coffee and I like hot tea. I like cold coffee and I like hot tea. I like"
    plain, spec = plain_and_speculative(ckpt, greedy(40, ignore_eos=True), Speculate(5, prompt_lookup=3), prompt)
    assert_same(plain, spec)
    s = spec.speculation
    assert s.method == "prompt-lookup" and s.accepted > 0
    assert all(q == 1.0 for r in s.rounds for q in r.q)  # a looked-up token is a point mass
    assert len(s.rounds) < len(spec.token_ids)


def test_greedy_with_history_stages_keeps_the_draft_chain_in_step(ckpt):
    """Penalties, n-gram bans and min-new-tokens change with every accepted token: the
    model's chain and, restored after each draft, the drafter's must both follow the
    accepted text, so drafting with the model itself still keeps every token."""
    settings = {"repetition_penalty": 1.8, "presence_penalty": 0.5, "no_repeat_ngram_size": 2, "min_new_tokens": 20}
    gen = greedy(30, eos_token_ids=(ckpt.eos_token_ids or (0,)), sampling=settings)
    plain, spec = plain_and_speculative(ckpt, gen, Speculate(4, ckpt.model))
    assert_same(plain, spec)
    assert spec.speculation.acceptance_rate == 1.0
    _, looked_up = plain_and_speculative(ckpt, gen, Speculate(4, prompt_lookup=2))
    assert_same(plain, looked_up)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_length_limit_ends_the_text_where_plain_ends_it(ckpt, k):
    for n in (1, 2, 5, 9):
        plain, spec = plain_and_speculative(ckpt, greedy(n, ignore_eos=True), Speculate(k, ckpt.model))
        assert_same(plain, spec)
        assert len(spec.token_ids) == n and spec.finish_reason == "length"


def test_eos_inside_an_accepted_draft_ends_the_text_there(ckpt):
    """Declare the 6th greedy token EOS: with the model drafting for itself it lies inside
    a fully accepted draft, and nothing drafted after it may appear."""
    reference = generate(ckpt.model, ckpt.encode(PROMPT), greedy(30, ignore_eos=True), ckpt.decode)[0]
    eos = reference.token_ids[5]
    plain, spec = plain_and_speculative(ckpt, greedy(30, eos_token_ids=(eos,)), Speculate(4, ckpt.model))
    assert_same(plain, spec)
    assert spec.finish_reason == "eos" and spec.token_ids[-1] == eos and eos not in spec.token_ids[:-1]
    last = spec.speculation.rounds[-1]
    assert last.token_id is None and last.accepted < len(last.draft)  # ended among the drafted tokens


def test_a_stop_string_inside_a_draft_ends_the_text_there(ckpt):
    reference = generate(ckpt.model, ckpt.encode(PROMPT), greedy(30, ignore_eos=True), ckpt.decode)[0]
    stop = reference.text[len(ckpt.decode(reference.token_ids[:6])) :][:3]
    assert stop.strip()
    plain, spec = plain_and_speculative(ckpt, greedy(30, ignore_eos=True, stop=(stop,)), Speculate(5, ckpt.model))
    assert_same(plain, spec)
    assert spec.finish_reason == "stop" and stop not in spec.text


def test_a_draft_model_with_a_shorter_context_stops_drafting_where_it_ends(ckpt, tmp_path, tokenizer):
    build_gpt2(tmp_path, tokenizer=tokenizer, seed=2, n_layer=1, n_positions=16)
    short = load_checkpoint(tmp_path, device="cpu")
    plain, spec = plain_and_speculative(ckpt, greedy(30, ignore_eos=True), Speculate(4, short.model))
    assert_same(plain, spec)
    length = len(ckpt.encode(PROMPT))
    drafted_from = [length + sum(r.accepted + 1 for r in spec.speculation.rounds[:i]) for i in range(len(spec.speculation.rounds))]
    assert all(not r.draft for at, r in zip(drafted_from, spec.speculation.rounds) if at > 16)


def test_streamed_pieces_and_alternatives_are_plain_decodings(ckpt):
    ids, gen = ckpt.encode(PROMPT), greedy(20, ignore_eos=True)
    pieces = []
    spec = generate_speculative(ckpt.model, ids, gen, ckpt.decode, Speculate(3, prompt_lookup=2),
                                on_token=lambda r, t, lp, h, d: pieces.append(d), trace_top=3)[0]
    plain = generate(ckpt.model, ids, gen, ckpt.decode, trace_top=3)[0]
    assert "".join(pieces) == spec.text == plain.text
    for a, b in zip(spec.steps, plain.steps):
        assert [c.token_id for c in a.alternatives] == [c.token_id for c in b.alternatives]


# ---------------------------------------------------------------- the drafters and the chain


def test_lookup_proposes_what_followed_the_most_recent_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 3, 2) == [8, 5]  # the latest "1 2 3" wins
    assert lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 3, 9) == [8, 5, 1, 2, 3]  # up to the end
    assert lookup([7, 5, 6, 4, 2, 5, 6], 3, 2) == [4, 2]  # "2 5 6" never occurred; "5 6" did
    assert lookup([7, 6, 4, 2, 5, 6], 3, 2) == [4, 2]  # down to one token
    assert lookup([1, 2, 3], 3, 4) == [] and lookup([4], 2, 3) == [] and lookup([1, 2, 1], 2, 0) == []


def test_save_and_restore_take_a_draft_back():
    cfg = SamplingConfig(repetition_penalty=1.3, frequency_penalty=0.2, repeat_last_n=3, mirostat=2)
    sampler = build_sampler(cfg, [[1, 2, 1]], [0], 8)
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    sampler.accept([sampler.choose(logits)])
    counts, mu, history = sampler.stages[0].counts.clone(), list(sampler.terminal.mu), list(sampler.rows.history[0])
    saved = sampler.save()
    for _ in range(4):
        token, _q = sampler.propose(logits)
        sampler.accept(token)
    assert sampler.terminal.mu != mu and len(sampler.rows.history[0]) == len(history) + 4
    sampler.restore(saved)
    assert torch.equal(sampler.stages[0].counts, counts) and sampler.terminal.mu == mu and sampler.rows.history[0] == history


def test_propose_returns_the_distribution_it_drew_from():
    cfg = SamplingConfig(temperature=0.7, top_k=3)
    a, b = build_sampler(cfg, [[1]], [5], 8), build_sampler(cfg, [[1]], [5], 8)
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    token, q = a.propose(logits)
    assert torch.equal(token, b.choose(logits)) and torch.allclose(q, b.distribution(logits))
    assert int((q > 0).sum()) == 3


@pytest.mark.parametrize("point_mass", [False, True])
def test_the_acceptance_rule_draws_from_p_whatever_q_is(point_mass):
    """10,000 uses of the rule on fixed p and q: the tokens follow p (chi-square), and
    the draft is kept as often as sum min(p, q), the rule's exact acceptance rate."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]) if point_mass else torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])
    draws, kept, n = Counter(), 0, 10_000
    for _ in range(n):
        x = 3 if point_mass else int(torch.multinomial(q[0], 1, generator=g))
        (token,), (ok,) = speculative_rule(p, [x], q, [g])
        draws[(int(token),)] += 1
        kept += ok
    assert chi_square_p(draws, {(t,): float(v) for t, v in enumerate(p[0]) if v > 0}, n) > 1e-3
    rate = float(torch.minimum(p, q).sum())
    assert abs(kept / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5


# ---------------------------------------------------------------- sampling: the same distribution


@torch.inference_mode()
def exact_joint(ckpt, prompt: list[int], cfg: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """The probability plain decoding gives every n-token continuation: the chain walked
    along each prefix, hearing each token as plain decoding's would (mirostat's mu moves)."""

    def next_distribution(prefix: list[int]) -> torch.Tensor:
        sampler = build_sampler(cfg, [prompt], [0], ckpt.model.cfg.vocab_size)
        logits = ckpt.model(torch.tensor([prompt + prefix]))[0, len(prompt) - 1 :].float()
        for j, token in enumerate(prefix):
            sampler.judge(logits[j : j + 1], [token])
            sampler.accept([token])
        return sampler.distribution(logits[len(prefix) :])[0]

    frontier = {(): 1.0}
    for _ in range(n):
        grown = {}
        for prefix, mass in frontier.items():
            p = next_distribution(list(prefix))
            for t in torch.nonzero(p).flatten().tolist():
                grown[prefix + (t,)] = mass * float(p[t])
        frontier = grown
    return frontier


def chi_square_p(counts: Counter, expected: dict, n: int) -> float:
    """Pearson's goodness-of-fit p-value. Outcomes expected fewer than 5 times are pooled,
    and a pool still under 5 joins the least expected kept outcome."""
    assert set(counts) <= set(expected), "an outcome plain decoding cannot produce"
    big = sorted((k for k, p in expected.items() if p * n >= 5), key=lambda k: -expected[k])
    observed = [counts.get(k, 0) for k in big]
    wanted = [expected[k] * n for k in big]
    rest_observed, rest_wanted = n - sum(observed), n - sum(wanted)
    if rest_wanted >= 5:
        observed.append(rest_observed)
        wanted.append(rest_wanted)
    else:
        observed[-1] += rest_observed
        wanted[-1] += rest_wanted
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    dof = torch.tensor((len(wanted) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


SAMPLED = {
    "draft model": (SamplingConfig(), "draft", "I like"),
    "draft model, stages with history": (SamplingConfig(temperature=0.7, top_k=4, repetition_penalty=1.5), "draft", "I like"),
    "draft model, mirostat": (SamplingConfig(mirostat=2, mirostat_tau=2.0), "draft", "I like"),
    "prompt lookup": (SamplingConfig(temperature=1.3), "lookup", "I like coffee I like coffee stop I like"),
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampling_has_plain_samplings_distribution(name, six, six_draft):
    """2,000 seeded runs of three tokens (K = 2: the first round judges two drafts and
    draws a bonus) against the exact joint distribution of those tokens; the same test
    must tell that distribution from another one (the draft's, or a hotter one), so it
    can fail."""
    cfg, how, prompt = SAMPLED[name]
    ids, n = six.encode(prompt), 2_000
    spec = Speculate(2, six_draft.model) if how == "draft" else Speculate(2, prompt_lookup=2)
    gen = GenerationConfig(max_new_tokens=3, num_samples=n, ignore_eos=True, seed=0, sampling=cfg)
    samples = generate_speculative(six.model, ids, gen, six.decode, spec)
    counts = Counter(tuple(s.token_ids) for s in samples)
    assert chi_square_p(counts, exact_joint(six, ids, cfg, 3), n) > 1e-3
    assert 0.05 < sum(s.speculation.accepted for s in samples) / sum(s.speculation.drafted for s in samples) < 0.95
    wrong = exact_joint(six_draft, ids, cfg, 3) if how == "draft" else exact_joint(six, ids, SamplingConfig(temperature=2.0), 3)
    assert chi_square_p(Counter({k: v for k, v in counts.items() if k in wrong}), wrong, n) < 1e-6


def test_a_seed_repeats_and_sample_i_is_seed_plus_i(six, six_draft):
    ids, spec = six.encode("I like"), Speculate(3, six_draft.model)
    gen = GenerationConfig(max_new_tokens=8, num_samples=3, ignore_eos=True, seed=11)
    three = generate_speculative(six.model, ids, gen, six.decode, spec)
    again = generate_speculative(six.model, ids, gen, six.decode, spec)
    alone = generate_speculative(six.model, ids, GenerationConfig(max_new_tokens=8, ignore_eos=True, seed=13), six.decode, spec)[0]
    assert [s.token_ids for s in three] == [s.token_ids for s in again]
    assert alone.token_ids == three[2].token_ids and [s.seed for s in three] == [11, 12, 13]


# ---------------------------------------------------------------- the view


@pytest.mark.parametrize("width", [50, 80, 120])
def test_the_rounds_view_fits_every_width(ckpt, other, width):
    from test_render_widths import _draw, _fits

    from llmgen import render
    from llmgen.render_speculation import speculation_table

    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True, seed=3, sampling=SamplingConfig(temperature=1.5))
    sample = generate_speculative(ckpt.model, ckpt.encode(PROMPT), gen, ckpt.decode, Speculate(3, other.model))[0]
    text = _draw(speculation_table(sample.speculation, ckpt.token_text, len(sample.token_ids), width), width)
    _fits(text, width)
    for r in sample.speculation.rounds:
        for token, q in zip(r.draft, r.q):
            assert render.token_label(ckpt.token_text(token)) in text and render.prob_text(q) in text
        assert all(render.prob_text(p) in text for p in r.p)
    flat = " ".join(text.split())
    assert "tokens per pass" in flat
    assert any(r.resampled for r in sample.speculation.rounds) and "✗ rejected" in flat and "↺ resampled" in flat  # words or legend
