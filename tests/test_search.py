"""Beam search against transformers; exact search against brute force; greedy <= beam <= exact."""

import itertools

import pytest
import torch

from checkpoints import build_six_word_model
from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.beam import BeamConfig, beam_search
from llmgen.sampling.constraints import banned_by_ngrams
from llmgen.decoding.exact import ExactConfig, exact_search
from llmgen.decoding.greedy_sample import generate
from llmgen.errors import UsageError


def hf_beam(ref, ids, width, alpha, n, eos, num_return=1, **kw):
    out = ref.generate(
        torch.tensor([ids]), num_beams=width, num_return_sequences=num_return, max_new_tokens=n,
        length_penalty=alpha, do_sample=False, output_scores=True, return_dict_in_generate=True,
        eos_token_id=list(eos), pad_token_id=eos[0], **kw,
    )
    scores = out.sequences_scores.tolist() if width > 1 else None
    return [s[len(ids):].tolist() for s in out.sequences], scores


def trim(seq, eos, n):
    """transformers pads finished sequences with EOS: cut after the first EOS."""
    for i, t in enumerate(seq[:n]):
        if t in eos:
            return seq[: i + 1]
    return seq[:n]


@pytest.mark.parametrize("width", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_matches_transformers(gpt2_dir, ckpt, width, alpha):
    ref = gpt2_dir[1]
    for prompt in ["I like", "The quick brown fox", "Water is"]:
        ids = ckpt.encode(prompt)
        # Declare a token the model often chooses as EOS, so hypotheses really finish early.
        eos = (generate(ckpt.model, ids, GenerationConfig(max_new_tokens=3, sampling=SamplingConfig(temperature=0)), ckpt.decode)[0].token_ids[1],)
        ours = beam_search(ckpt.model, ids, BeamConfig(width=width, max_new_tokens=10, length_penalty=alpha, num_return=width, eos_token_ids=eos))
        seqs, scores = hf_beam(ref, ids, width, alpha, 10, eos, num_return=width)
        for i, hyp in enumerate(ours.hypotheses):
            assert hyp.token_ids == trim(seqs[i], eos, 10), (prompt, i)
            if scores:
                assert hyp.score == pytest.approx(scores[i], abs=1e-4)


def test_beam_early_stopping_and_ngrams_match_transformers(gpt2_dir, ckpt):
    ref = gpt2_dir[1]
    ids = ckpt.encode("I like")
    eos = (generate(ckpt.model, ids, GenerationConfig(max_new_tokens=3, sampling=SamplingConfig(temperature=0)), ckpt.decode)[0].token_ids[2],)
    ours = beam_search(ckpt.model, ids, BeamConfig(width=3, max_new_tokens=12, early_stopping=True, no_repeat_ngram_size=2, eos_token_ids=eos))
    seqs, scores = hf_beam(ref, ids, 3, 1.0, 12, eos, early_stopping=True, no_repeat_ngram_size=2)
    assert ours.hypotheses[0].token_ids == trim(seqs[0], eos, 12)
    assert ours.hypotheses[0].score == pytest.approx(scores[0], abs=1e-4)


def test_width_1_is_greedy(ckpt):
    ids = ckpt.encode("The quick brown fox")
    greedy = generate(ckpt.model, ids, GenerationConfig(max_new_tokens=15, ignore_eos=True, sampling=SamplingConfig(temperature=0)), ckpt.decode)[0]
    beam = beam_search(ckpt.model, ids, BeamConfig(width=1, max_new_tokens=15))
    assert beam.hypotheses[0].token_ids == greedy.token_ids
    assert beam.hypotheses[0].logprob == pytest.approx(greedy.logprob, abs=1e-4)


def test_no_repeat_ngram_ban():
    assert banned_by_ngrams([1, 2, 3, 1, 2], 3) == {3}
    assert banned_by_ngrams([1, 2, 3], 2) == set()
    assert banned_by_ngrams([5, 5], 2) == {5}


def test_beam_flags_are_validated():
    with pytest.raises(UsageError):
        BeamConfig(width=0)
    with pytest.raises(UsageError):
        BeamConfig(width=2, num_return=3)


# ---------------------------------------------------------------- exact search


@pytest.fixture(scope="module")
def six_words(tmp_path_factory):
    path = tmp_path_factory.mktemp("six")
    build_six_word_model(path)
    return load_checkpoint(path, device="cpu")


def brute_force(model, prompt_ids, n, eos):
    """Score every sequence that ends at EOS or after n tokens; return the best."""
    vocab = model.cfg.vocab_size
    complete = []
    for length in range(1, n + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if any(t in eos for t in seq[:-1]):
                continue  # would have ended earlier
            if length < n and seq[-1] not in eos:
                continue  # not complete
            complete.append(list(seq))
    best, best_lp = None, float("-inf")
    with torch.no_grad():
        for i in range(0, len(complete), 512):
            chunk = complete[i : i + 512]
            for seq in chunk:
                ids = torch.tensor([prompt_ids + seq])
                logp = torch.log_softmax(model(ids)[0], -1)
                lp = sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(seq))
                if lp > best_lp:
                    best, best_lp = seq, lp
    return best, best_lp, len(complete)


@pytest.mark.parametrize("prompt,n", [("I like", 3), ("cold", 4), ("I", 4), ("water stop", 3)])
def test_exact_equals_brute_force_and_beats_beam_and_greedy(six_words, prompt, n):
    ids = six_words.encode(prompt)
    eos = six_words.eos_token_ids
    expected, expected_lp, _ = brute_force(six_words.model, ids, n, eos)
    result = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=n, eos_token_ids=eos))
    assert result.proven
    assert result.token_ids == expected
    assert result.logprob == pytest.approx(expected_lp, abs=1e-5)
    assert result.expanded < sum(7**k for k in range(n))  # fewer than the partial sequences brute force visits

    greedy = generate(six_words.model, ids, GenerationConfig(max_new_tokens=n, eos_token_ids=eos, sampling=SamplingConfig(temperature=0)), six_words.decode)[0]
    for width in (2, 3):
        beam = beam_search(six_words.model, ids, BeamConfig(width=width, max_new_tokens=n, length_penalty=0.0, eos_token_ids=eos))
        assert result.logprob >= beam.hypotheses[0].logprob - 1e-6 >= greedy.logprob - 2e-6


def test_exact_reports_unproven_past_its_budget(six_words):
    ids = six_words.encode("I like")
    result = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=8, eos_token_ids=(), max_expansions=3))
    assert result.expanded == 3 and not result.proven
    assert len(result.token_ids) == 8  # still a complete sequence: the best found


def test_greedy_is_not_the_most_probable_sequence(six_words):
    """The textbook point, on this model: greedy < beam(2) < exact for "I like", 3 tokens."""
    ids = six_words.encode("I like")
    eos = six_words.eos_token_ids
    greedy = generate(six_words.model, ids, GenerationConfig(max_new_tokens=3, eos_token_ids=eos, sampling=SamplingConfig(temperature=0)), six_words.decode)[0]
    beam = beam_search(six_words.model, ids, BeamConfig(width=2, max_new_tokens=3, length_penalty=0.0, eos_token_ids=eos)).hypotheses[0]
    best = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=3, eos_token_ids=eos))
    assert greedy.logprob < beam.logprob - 0.1 and beam.logprob < best.logprob - 0.05
    assert six_words.decode(greedy.token_ids) != six_words.decode(best.token_ids)


def test_exact_finds_an_eos_ending(six_words):
    result = exact_search(six_words.model, six_words.encode("cold"), ExactConfig(max_new_tokens=4, eos_token_ids=(0,)))
    assert result.finish_reason == "eos" and result.token_ids[-1] == 0 and result.proven
