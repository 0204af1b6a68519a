"""The samplers with llama.cpp's semantics (src/llama-sampler.cpp), checked on small
examples worked by hand from its formulas; the random ones statistically."""

import math

import pytest
import torch

from llmgen.config import SamplingConfig
from llmgen.sampling import build_sampler
from llmgen.sampling.dry import DRY, breakers_from, z_function
from llmgen.sampling.penalties import Penalties
from llmgen.sampling.stage import Rows
from llmgen.sampling.temperature import Temperature
from llmgen.sampling.terminal import Mirostat
from llmgen.sampling.truncation import XTC, TopNSigma

NEG_INF = float("-inf")


def rows(*histories, seeds=None):
    return Rows([list(h) for h in histories], seeds or [0] * len(histories), "cpu")


def probs_after(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits, -1)[0].tolist()


# ---------------------------------------------------------------- penalties


def test_repetition_frequency_presence_penalties():
    logits = torch.tensor([[3.0, 1.0, -1.0, 0.0, 2.0]])
    stage = Penalties(rows([0, 2, 2, 3]), 5, repetition=1.5, frequency=0.5, presence=0.25)
    # id0: 3/1.5 - (0.5*1 + 0.25); id2: -1*1.5 - (0.5*2 + 0.25); id3: 0*1.5 - 0.75
    assert stage.apply(logits).tolist() == [[1.25, 1.0, -2.75, -0.75, 2.0]]


def test_penalties_from_llamacpp_test_vectors():
    logits = torch.full((1, 5), math.log(0.2))
    assert probs_after(Penalties(rows([0]), 5, repetition=50).apply(logits)) == pytest.approx([0, 0.25, 0.25, 0.25, 0.25], abs=1e-6)
    assert probs_after(Penalties(rows([0, 1, 2, 0, 0]), 5, repetition=50).apply(logits)) == pytest.approx([0, 0, 0, 0.5, 0.5], abs=1e-6)
    out = Penalties(rows([0, 1, 2, 0, 0]), 5, repetition=1, frequency=5, presence=5).apply(logits)
    assert out[0].tolist() == pytest.approx([-21.609438, -11.609438, -11.609438, -1.609438, -1.609438], abs=1e-5)


def test_repeat_last_n_is_a_sliding_window():
    r = rows([5, 5])
    stage = Penalties(r, 10, repetition=1.0, frequency=1.0, last_n=3)
    for token in (7, 9):  # the window is the last 3 of [5, 5, 7, 9] -> [5, 7, 9]
        r.append([token])
        stage.accept([token])
    assert stage.counts[0, [5, 7, 9]].tolist() == [1, 1, 1] and stage.counts.sum() == 3
    assert Penalties(rows([5, 5]), 10, repetition=2.0, last_n=0).counts.sum() == 0  # 0: penalties off


# ---------------------------------------------------------------- DRY


def dry(history, multiplier=1.0, base=1.1, allowed=2, last_n=-1, breakers=None):
    return DRY(rows(history), multiplier, base, allowed, last_n, breakers or {}).penalties(list(history))


def test_z_function():
    assert z_function([1, 0, 2, 1, 0]) == [5, 0, 0, 2, 0]
    assert z_function([7, 7, 7]) == [3, 2, 1]


def test_dry_penalises_the_token_that_would_continue_a_repeat():
    # [0,1,2,0,1]: the end "0 1" repeats the start, which was followed by 2: 1 * 1.1^(2-2)
    assert dry([0, 1, 2, 0, 1]) == {2: 1.0}
    logits = torch.full((1, 4), math.log(0.25))
    stage = DRY(rows([0, 1, 2, 0, 1]), 1.0, 1.1, 2, 5, {})
    assert probs_after(stage.apply(logits)) == pytest.approx([0.296923, 0.296923, 0.109232, 0.296923], abs=1e-6)
    stage = DRY(rows([0, 1, 2, 0, 1]), 2.0, 1.1, 2, 5, {})
    logits = torch.full((1, 5), math.log(0.2))
    assert probs_after(stage.apply(logits)) == pytest.approx([0.241818, 0.241818, 0.032727, 0.241818, 0.241818], abs=1e-6)


def test_dry_uses_the_longest_repeat_and_grows_exponentially():
    # [5,6,7,5,6,7,5,6]: "5 6" was followed by 7 twice; the longest match is 5 tokens -> 0.8 * 1.75^3
    assert dry([5, 6, 7, 5, 6, 7, 5, 6], multiplier=0.8, base=1.75) == {7: pytest.approx(4.2875)}
    assert dry([0, 1, 2, 7, 0, 1, 2, 7, 0, 1], base=2.0) == {2: 16.0}


def test_dry_short_repeats_and_windows():
    assert dry([0, 1, 2, 3, 4, 0, 1], allowed=4) == {}
    assert dry([0, 1], last_n=4) == {}
    assert dry([0, 1, 2, 0, 1], last_n=2) == {}  # the window sees only [0, 1]


def test_dry_sequence_breakers():
    single = {3: [()], 7: [()]}
    assert dry([0, 1, 3, 4, 0, 1], breakers={3: [()]}) == {}  # the follower, 3, is itself a breaker
    assert dry([0, 1, 2, 7, 0, 1, 2, 7, 0, 1], base=2.0, breakers=single) == {2: 1.0}  # repeats stop at the last 7
    assert dry([0, 1, 2, 3, 7, 0, 1, 2, 3], base=2.0, breakers=single) == {}
    # A two-token breaker (6, 7): its head can be penalised; the repeat stops after it.
    assert dry([0, 1, 2, 3, 6, 7, 0, 1, 2, 3], base=2.0, breakers={6: [(7,)]}) == {6: 4.0}


def test_dry_breakers_from_a_vocabulary():
    texts = ["a", "b:", "\n\n", "x", "*", "::", "c\\"]
    encode = {"b": [1]}.get
    out = breakers_from(texts, ("\n", ":", "*"), lambda s: encode(s, [99]))
    assert out == {1: [()], 2: [()], 4: [()], 5: [()]}
    # A multi-character breaker: a token ending with its start is a head, the rest its tail.
    out = breakers_from(["ab", "xa", "zz", "b"], ("ab",), lambda s: {"b": [3]}[s])
    assert out == {0: [()], 1: [(3,)]}


# ---------------------------------------------------------------- XTC


def xtc(threshold, probability=1.0, seeds=(0,)):
    return XTC(Rows([[]] * len(seeds), list(seeds), "cpu"), probability, threshold)


@pytest.mark.parametrize("threshold,kept", [(0.09, [3]), (0.15, [2, 3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])])
def test_xtc_removes_all_top_choices_but_the_least_probable(threshold, kept):
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = xtc(threshold).apply(logits)
    assert torch.nonzero(torch.isfinite(out[0])).flatten().tolist() == kept


def test_xtc_ties_keep_the_last_in_id_order():
    """Equal probabilities rank by id (lower first), so of tied top choices the highest id survives."""
    out = xtc(0.2).apply(torch.tensor([[0.3, 0.3, 0.3, 0.1]]).log())
    assert torch.nonzero(torch.isfinite(out[0])).flatten().tolist() == [2, 3]


def test_xtc_fires_with_its_probability():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 400).log()
    stage = xtc(0.15, probability=0.3, seeds=range(400))
    fired = (~torch.isfinite(stage.apply(logits))).any(-1).float().mean().item()
    assert abs(fired - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400)  # four standard errors
    assert (~torch.isfinite(xtc(0.15, probability=0.0).apply(logits[:1]))).sum() == 0


# ---------------------------------------------------------------- top-n-sigma


def test_top_n_sigma():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    assert probs_after(TopNSigma(1.0).apply(logits)) == pytest.approx([0, 0, 0.428571, 0.571429], abs=1e-6)
    assert torch.equal(TopNSigma(3.0).apply(logits), logits)
    out = TopNSigma(1.0).apply(torch.tensor([[2.0, 1.0, 0.0, -1.0, NEG_INF]]))  # stats over the 4 finite logits
    assert out.tolist() == [[2.0, 1.0, NEG_INF, NEG_INF, NEG_INF]]
    assert TopNSigma(1.0).apply(torch.tensor([[3.0, 2.5, 0.0, -2.0]])).tolist() == [[3.0, 2.5, NEG_INF, NEG_INF]]


def test_top_n_sigma_does_not_depend_on_temperature():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    for t in (0.3, 1.7):
        assert torch.equal(torch.isfinite(TopNSigma(1.2).apply(logits / t)), torch.isfinite(TopNSigma(1.2).apply(logits)))


# ---------------------------------------------------------------- dynamic temperature


@pytest.mark.parametrize(
    "temp,spread,exponent,expected",
    [
        (1.0, 0.5, 1.0, [0.429529, 0.259109, 0.178530, 0.132833]),
        (1.0, 0.5, 2.0, [0.446493, 0.257493, 0.171631, 0.124383]),
        (0.8, 1.0, 1.0, [0.405629, 0.260737, 0.188260, 0.145375]),
        (0.5, 0.5, 1.0, [0.537569, 0.242642, 0.135011, 0.084778]),
    ],
)
def test_dynatemp(temp, spread, exponent, expected):
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    assert probs_after(Temperature(temp, spread, exponent).apply(logits)) == pytest.approx(expected, abs=2e-6)


def test_dynatemp_counts_only_tokens_in_play():
    """After truncation the maximum entropy is ln(tokens left), as when llama.cpp compacts."""
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0, 0.0]]).log()
    assert probs_after(Temperature(1.0, 0.5).apply(logits))[:4] == pytest.approx([0.429529, 0.259109, 0.178530, 0.132833], abs=2e-6)


# ---------------------------------------------------------------- mirostat


def test_mirostat_2_truncates_by_mu_and_updates_it():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    stage = Mirostat(rows([]), 2, tau=1.5, eta=0.1, vocab_size=4)  # mu = 3: drops 0.1 (3.32 bits)
    dist = stage.distribution(logits)[0].tolist()
    assert dist == pytest.approx([0.555556, 0.277778, 0.166667, 0.0], abs=1e-6)
    token = stage.choose(logits).item()
    assert stage.mu[0] == pytest.approx(3 - 0.1 * (-math.log2(dist[token]) - 1.5))
    assert math.isclose(Mirostat(rows([]), 2, 1.5, 0.1, 4).mu[0], 3.0)


@pytest.mark.parametrize("tau,expected", [(1.5, [0.8, 0.2, 0, 0]), (2.0, [0.702439, 0.175610, 0.078049, 0.043902])])
def test_mirostat_1_estimates_zipf_and_keeps_top_k(tau, expected):
    """p ∝ 1/i² over 10 tokens: ŝ = 2 exactly, so k = sqrt(2^mu / 0.9): 2.98 for mu 3, 4.22 for mu 4."""
    zipf = torch.tensor([1 / i**2 for i in range(1, 11)])
    stage = Mirostat(rows([]), 1, tau=tau, eta=0.1, vocab_size=10)
    assert stage.distribution((zipf / zipf.sum()).log()[None])[0].tolist()[:4] == pytest.approx(expected, abs=1e-6)


def test_mirostat_draws_follow_its_distribution():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log().repeat(3000, 1)
    stage = Mirostat(Rows([[]] * 3000, list(range(3000)), "cpu"), 2, tau=1.5, eta=0.1, vocab_size=4)
    counts = torch.bincount(stage.choose(logits), minlength=4).float() / 3000
    assert counts[3] == 0 and counts[:3].tolist() == pytest.approx([0.555556, 0.277778, 0.166667], abs=0.03)


def test_mirostat_replaces_truncation_but_keeps_penalties_and_temperature():
    cfg = SamplingConfig(mirostat=2, top_k=5, top_p=0.5, temperature=0.7, repetition_penalty=1.2)
    assert build_sampler(cfg, [[1]], [0], 8).order == ["penalties", "temperature", "mirostat"]
