"""The samplers with transformers' semantics, checked against its logits processors on
the same logits: the same tokens survive and the survivors' logits agree."""

import pytest
import torch
from transformers.generation import logits_process as hf

from llmgen.config import SamplingConfig
from llmgen.sampling import TokenRules, build_sampler

VOCAB = 50


def random_logits(seed: int, rows: int = 4, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def ours(cfg: SamplingConfig, logits: torch.Tensor, history=None, prompt_lengths=None, eos=(), tokens=None) -> torch.Tensor:
    """The chain's processed logits (before the terminal stage) for rows with this history."""
    history = history if history is not None else [[]] * logits.shape[0]
    prompts = [h[: n] for h, n in zip(history, prompt_lengths)] if prompt_lengths else history
    chain = build_sampler(cfg, prompts, [0] * len(prompts), logits.shape[-1], "cpu", eos, tokens)
    if prompt_lengths:
        for step in range(len(history[0]) - prompt_lengths[0]):  # every row has generated as many
            chain.accept([h[n + step] for h, n in zip(history, prompt_lengths)])
    return chain.process(logits)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-6)


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p(mass):
    for seed in range(5):
        logits = random_logits(seed)
        assert_same(ours(SamplingConfig(typical_p=mass), logits), hf.TypicalLogitsWarper(mass)(None, logits.clone()))


def test_typical_p_keeps_ties_at_the_cutoff_as_transformers():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    kept = ours(SamplingConfig(typical_p=0.3), probs.log())
    assert_same(kept, hf.TypicalLogitsWarper(0.3)(None, probs.log()))
    assert torch.isfinite(kept[0, 1:]).all()  # all three tied tokens survive


@pytest.mark.parametrize("epsilon", [3e-4, 0.01, 0.05, 0.3])
def test_epsilon_cutoff(epsilon):
    for seed in range(5):
        logits = random_logits(seed)
        assert_same(ours(SamplingConfig(epsilon_cutoff=epsilon), logits), hf.EpsilonLogitsWarper(epsilon)(None, logits.clone()))


@pytest.mark.parametrize("eta", [3e-4, 0.01, 0.1, 0.5])
def test_eta_cutoff(eta):
    for seed in range(5):
        logits = random_logits(seed)
        assert_same(ours(SamplingConfig(eta_cutoff=eta), logits), hf.EtaLogitsWarper(eta)(None, logits.clone()))


def test_warpers_chain_in_transformers_order():
    """temperature -> top-k -> top-p -> min-p -> typical -> epsilon -> eta, as transformers builds them."""
    logits = random_logits(7)
    cfg = SamplingConfig(temperature=0.7, top_k=30, top_p=0.97, min_p=0.01, typical_p=0.95, epsilon_cutoff=1e-3, eta_cutoff=1e-3)
    theirs = logits.clone()
    for warper in (hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(30), hf.TopPLogitsWarper(0.97), hf.MinPLogitsWarper(0.01),
                   hf.TypicalLogitsWarper(0.95), hf.EpsilonLogitsWarper(1e-3), hf.EtaLogitsWarper(1e-3)):
        theirs = warper(None, theirs)
    assert_same(ours(cfg, logits), theirs)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size(n):
    gen = torch.Generator().manual_seed(n)
    history = torch.randint(0, 3, (4, 20), generator=gen)  # a small alphabet, so n-grams repeat
    logits = random_logits(n, vocab=8)
    expected = hf.NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    assert_same(ours(SamplingConfig(no_repeat_ngram_size=n), logits, history.tolist(), [5] * 4), expected)
    assert (~torch.isfinite(expected)).any()  # the case bans something


def test_min_new_tokens():
    logits = random_logits(3, rows=2, vocab=10)
    eos = (0, 7)
    for generated in range(4):
        history = [[1, 2, 3] + [4] * generated, [5, 6, 7, 8] + [4] * generated]
        for row, prompt in enumerate((3, 4)):
            expected = hf.MinNewTokensLengthLogitsProcessor(prompt, 2, list(eos))(torch.tensor([history[row]]), logits[row : row + 1].clone())
            got = ours(SamplingConfig(min_new_tokens=2), logits, history, [3, 4], eos)[row : row + 1]
            assert_same(got, expected)


def test_bad_words():
    history = [[1, 2, 3, 4], [9, 9, 1, 2], [3, 5, 8, 1]]
    sequences = ((4,), (1, 2, 6), (8, 1, 7), (0,))  # (0,) is EOS alone: ignored, as transformers does
    logits = random_logits(4, rows=3, vocab=10)
    expected = hf.NoBadWordsLogitsProcessor([list(s) for s in sequences], eos_token_id=0)(torch.tensor(history), logits.clone())
    got = ours(SamplingConfig(), logits, history, eos=(0,), tokens=TokenRules(bad_words=sequences))
    assert_same(got, expected)
    assert not torch.isfinite(got[0, 4]) and not torch.isfinite(got[2, 7]) and torch.isfinite(got[:, 0]).all()


def test_logit_bias():
    logits = random_logits(5, rows=2, vocab=10)
    biases = {3: 2.5, 5: -1.0, 8: float("-inf")}
    expected = hf.SequenceBiasLogitsProcessor({(t,): b for t, b in biases.items()})(torch.tensor([[1], [2]]), logits.clone())
    assert_same(ours(SamplingConfig(), logits, tokens=TokenRules(logit_bias=biases)), expected)


def test_processors_apply_under_greedy_too():
    """Bans change what the model prefers, so greedy decoding honours them (warpers it skips)."""
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    chain = build_sampler(SamplingConfig(temperature=0, typical_p=0.1), [[]], [None], 4, tokens=TokenRules(logit_bias={0: float("-inf")}))
    assert chain.order == ["logit-bias", "greedy"]
    assert chain.choose(logits).tolist() == [1]
