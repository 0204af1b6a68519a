"""Each piece of the sampler chain, exactly; then the draw, statistically."""

import math

import pytest
import torch

from llmgen.config import SamplingConfig
from llmgen.errors import UsageError
from llmgen.sampling import build_sampler
from llmgen.sampling.penalties import Penalties
from llmgen.sampling.stage import Rows
from llmgen.sampling.temperature import Temperature
from llmgen.sampling.truncation import MinP, TopK, TopP

INF = float("inf")


def top_k_filter(logits, k):
    return TopK(k).apply(logits) if k > 0 else logits


def top_p_filter(logits, p):
    return TopP(p).apply(logits)


def min_p_filter(logits, min_p):
    return MinP(min_p).apply(logits) if min_p > 0 else logits


def sampling_distribution(logits, cfg, prompts=None):
    return build_sampler(cfg, prompts or [[]] * logits.shape[0], [0] * logits.shape[0], logits.shape[-1]).distribution(logits)


def choose_next(logits, cfg, gens):
    """One draw per row with the given generators (the Draw stage's own, replaced)."""
    s = build_sampler(cfg, [[]] * logits.shape[0], [None if cfg.greedy else 0] * logits.shape[0], logits.shape[-1])
    if gens is not None:
        s.terminal.generators = gens
    return s.choose(logits)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def random_logits(seed: int, batch: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_keeps_exactly_k():
    logits = random_logits(0)
    for k in (1, 2, 7, 49):
        out = top_k_filter(logits, k)
        assert (torch.isfinite(out).sum(-1) == k).all()
        for row, out_row in zip(logits, out):
            assert set(torch.nonzero(torch.isfinite(out_row)).flatten().tolist()) == set(row.topk(k).indices.tolist())
        assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # survivors untouched
    assert torch.equal(top_k_filter(logits, 50), logits)


def test_top_k_breaks_ties_by_token_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 1)) == {1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.4)) == {1}  # 0.4 alone reaches 0.4
    assert kept(top_p_filter(logits, 0.41)) == {1, 2}
    assert kept(top_p_filter(logits, 0.7)) == {1, 2}
    assert kept(top_p_filter(logits, 0.71)) == {1, 2, 3}
    assert kept(top_p_filter(logits, 0.01)) == {1}  # the top token always survives
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3, 4}


def test_top_p_is_minimal_by_brute_force():
    logits = random_logits(1, batch=1, vocab=12)
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True).tolist()
    for p in (0.1, 0.3, 0.5, 0.77, 0.9, 0.99):
        n = next(n for n in range(1, 13) if probs[order[:n]].sum() >= p)
        assert kept(top_p_filter(logits, p)) == set(order[:n])


def test_min_p_keeps_tokens_above_fraction_of_max():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.1, 0.025]])
    assert kept(min_p_filter(probs.log(), 0.5)) == {0, 1}
    assert kept(min_p_filter(probs.log(), 0.1)) == {0, 1, 2, 3}
    assert kept(min_p_filter(probs.log(), 1.0)) == {0}


def test_temperature_divides_logits():
    logits = random_logits(2)
    assert torch.equal(Temperature(0.5).apply(logits), logits / 0.5)
    with pytest.raises(ValueError):
        Temperature(0)


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    stage = Penalties(Rows([[0, 1]], [None], "cpu"), 4, repetition=2.0)
    assert torch.equal(stage.apply(logits), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_chain_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([[3, 7, 7, 11]] * 4)
    for seed, (t, k, p, m, r) in enumerate([(0.7, 10, 0.9, 0.0, 1.3), (1.5, 0, 0.5, 0.05, 1.0), (1.0, 5, 1.0, 0.2, 0.8)]):
        logits = random_logits(seed)
        chain = build_sampler(SamplingConfig(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r), ids.tolist(), [0] * 4, 50)
        ours = chain.process(logits)
        theirs = RepetitionPenaltyLogitsProcessor(r)(ids, logits.clone())
        theirs = TemperatureLogitsWarper(t)(ids, theirs)
        if k:
            theirs = TopKLogitsWarper(k)(ids, theirs)
        if p < 1:
            theirs = TopPLogitsWarper(p)(ids, theirs)
        if m:
            theirs = MinPLogitsWarper(m)(ids, theirs)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_top_k_1_is_greedy():
    logits = random_logits(3)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    drawn = choose_next(logits, SamplingConfig(temperature=1.3, top_k=1), gens)
    assert torch.equal(drawn, logits.argmax(-1))
    assert torch.equal(choose_next(logits, SamplingConfig(temperature=0), None), logits.argmax(-1))


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(observed) - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # P(chi2_dof >= stat)


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.6, top_k=6),
        SamplingConfig(temperature=1.4, top_p=0.8),
        SamplingConfig(temperature=1.0, min_p=0.1),
    ],
)
def test_draws_follow_the_filtered_distribution(cfg):
    """Thousands of seeded draws; a chi-square test at the 0.1% level, and no draw outside the kept set."""
    logits = random_logits(4, batch=1, vocab=16) / 2
    target = sampling_distribution(logits, cfg)[0]
    gen = torch.Generator().manual_seed(1234)
    n = 20000
    draws = torch.cat([choose_next(logits, cfg, [gen]) for _ in range(n)])
    counts = torch.bincount(draws, minlength=16).double()
    support = target > 0
    assert counts[~support].sum() == 0
    p_value = chi_square_p_value(counts[support], target[support].double() * n)
    assert p_value > 1e-3, p_value


def test_chi_square_detects_the_wrong_distribution():
    """The statistical test has teeth: draws from the unfiltered distribution fail it."""
    logits = random_logits(4, batch=1, vocab=16) / 2
    target = sampling_distribution(logits, SamplingConfig(temperature=0.6))[0]
    gen = torch.Generator().manual_seed(1234)
    draws = torch.cat([choose_next(logits, SamplingConfig(temperature=1.0), [gen]) for _ in range(20000)])
    counts = torch.bincount(draws, minlength=16).double()
    assert chi_square_p_value(counts, target.double() * 20000) < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.01}, {"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0}],
)
def test_out_of_range_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingConfig(**kwargs)


def test_greedy_distribution_is_one_hot():
    logits = random_logits(5)
    dist = sampling_distribution(logits, SamplingConfig(temperature=0))
    assert torch.equal(dist.argmax(-1), logits.argmax(-1))
    assert math.isclose(float(dist.sum()), 4.0)


def test_top_k_equals_the_first_k_of_a_stable_sort():
    """Top-k avoids sorting the vocabulary; it must keep exactly what a stable sort keeps,
    ties at the k-th logit by lowest id, also with many ties and -inf already present."""
    gen = torch.Generator().manual_seed(9)
    for trial in range(40):
        logits = torch.randn(3, 700, generator=gen) * 2
        if trial % 2:
            logits = torch.round(logits * 2) / 2
        if trial % 5 == 0:
            logits[:, ::3] = -INF
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        for k in (1, 3, 40, 300):
            expected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order[:, :k], True)
            assert torch.equal(torch.isfinite(top_k_filter(logits, k)), expected & torch.isfinite(logits))
