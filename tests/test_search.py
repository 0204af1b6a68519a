"""Beam search against transformers; exact search against brute force; greedy <= beam <= exact."""

import itertools
import math

import pytest
import torch

from checkpoints import WORDS, build_six_word_model
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


def complete_sequences(model, prompt_ids, n, eos):
    """Every sequence that ends at EOS or after n tokens, scored one full forward pass per
    length, most probable first: [(logprob, tokens)]."""
    vocab = model.cfg.vocab_size
    scored = []
    with torch.no_grad():
        for length in range(1, n + 1):
            seqs = [list(seq) for seq in itertools.product(range(vocab), repeat=length)
                    if not any(t in eos for t in seq[:-1])  # would have ended earlier
                    and (length == n or seq[-1] in eos)]  # complete
            if not seqs:
                continue
            ids = torch.tensor([prompt_ids + seq for seq in seqs])
            logp = torch.log_softmax(model(ids).float(), -1)[:, len(prompt_ids) - 1 : -1]  # (B, length, V)
            lps = logp.gather(-1, ids[:, len(prompt_ids) :, None])[..., 0].sum(-1).tolist()
            scored += zip(lps, seqs)
    return sorted(scored, key=lambda x: -x[0])


def brute_force(model, prompt_ids, n, eos):
    """The most probable complete sequence, its logprob, and how many there are."""
    scored = complete_sequences(model, prompt_ids, n, eos)
    return scored[0][1], scored[0][0], len(scored)


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


# ---------------------------------------------------------------- exact --top K


@pytest.mark.parametrize("prompt,n,k,eos", [
    ("I like", 3, 5, (0,)), ("cold", 4, 12, (0,)), ("I", 4, 2, (0,)), ("water stop", 3, 30, (0,)),
    ("I", 2, 50, (0,)),  # 43 complete sequences: all of them, covering all the probability
    ("like", 3, 400, ()),  # no EOS: all 343 of length 3
])
def test_exact_top_k_equals_brute_force(six_words, prompt, n, k, eos):
    ids = six_words.encode(prompt)
    expected = complete_sequences(six_words.model, ids, n, eos)[:k]
    result = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=n, eos_token_ids=eos, top=k))
    assert [h.token_ids for h in result.hypotheses] == [seq for _, seq in expected]
    for h, (lp, _) in zip(result.hypotheses, expected):
        assert h.logprob == pytest.approx(lp, abs=1e-5) and h.proven
        assert h.finish_reason == ("eos" if h.token_ids[-1] in eos else "length")
    assert result.mass == pytest.approx(sum(math.exp(lp) for lp, _ in expected), abs=1e-5)
    if k > len(expected):
        assert result.mass == pytest.approx(1.0, abs=1e-5)
    finished = [node for node in result.tree.nodes if node.status == "finished"]
    assert len(finished) == len(expected)  # each of the K ends at a node of the tree
    assert result.tree.nodes[result.tree.best_path[-1]].status == "finished"


def test_exact_top_1_is_exact(six_words):
    ids = six_words.encode("I like")
    one = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=3, eos_token_ids=(0,)))
    top = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=3, eos_token_ids=(0,), top=4))
    assert len(one.hypotheses) == 1 and top.hypotheses[0].token_ids == one.token_ids
    assert top.expanded >= one.expanded  # proving three more ranks takes at least as much search


@pytest.mark.parametrize("budget", [1, 2, 4, 8])
def test_exact_top_k_past_its_budget_says_which_are_proven(six_words, budget):
    """Proven ranks come first, and each proven one is brute force's; the rest are the best found."""
    ids = six_words.encode("cold")
    expected = complete_sequences(six_words.model, ids, 4, (0,))
    result = exact_search(six_words.model, ids, ExactConfig(max_new_tokens=4, eos_token_ids=(0,), top=6, max_expansions=budget))
    proven = [h.proven for h in result.hypotheses]
    assert proven == sorted(proven, reverse=True) and result.expanded <= budget
    for h, (lp, seq) in zip(result.hypotheses, expected):
        if h.proven:
            assert h.token_ids == seq and h.logprob == pytest.approx(lp, abs=1e-5)
    logprobs = [h.logprob for h in result.hypotheses]
    assert logprobs == sorted(logprobs, reverse=True) and len(result.hypotheses) == 6
    if budget == 1:
        assert not all(proven)


def test_exact_top_is_validated():
    for k in (0, 1001):
        with pytest.raises(UsageError, match="--top"):
            ExactConfig(top=k)


# ---------------------------------------------------------------- compare: where beam lost the optimum


def beam_survivors(model, prompt_ids, width, n, eos):
    """The prefixes in the beam after each step, with no beam.py: every continuation of the
    running beams ranked by log-probability (length penalty 0); of the best 2K, those that
    end and rank in the top K finish, the best K that do not end run on."""
    beams, survivors = [([], 0.0)], []
    with torch.no_grad():
        for step in range(1, n + 1):
            candidates = []
            for seq, total in beams:
                logp = torch.log_softmax(model(torch.tensor([prompt_ids + seq]))[0, -1].float(), -1)
                candidates += [(seq + [t], total + logp[t].item()) for t in range(model.cfg.vocab_size)]
            ranked = sorted(candidates, key=lambda c: -c[1])[: max(2, 1 + len(eos)) * width]
            ends = [step == n or seq[-1] in eos for seq, _ in ranked]
            finished = [c for rank, (c, end) in enumerate(zip(ranked, ends)) if end and rank < width]
            beams = [c for c, end in zip(ranked, ends) if not end][:width]
            survivors.append({tuple(seq) for seq, _ in finished + beams})
    return survivors


def beam_answer(model, ids, width, n, eos):
    return beam_search(model, ids, BeamConfig(width=width, max_new_tokens=n, length_penalty=0.0, eos_token_ids=eos)).hypotheses[0]


@pytest.mark.parametrize("width", [1, 2])
def test_compare_marks_where_beam_lost_the_optimum(six_words, width):
    """Over one- and two-word prompts, find by brute force one where beam misses the
    optimum and one where it finds it; compare's beam row must say which, and where."""
    from llmgen import orchestrate as orch

    n, eos = 3, six_words.eos_token_ids
    missed = found = None
    for words in itertools.chain(itertools.product(WORDS[1:], repeat=1), itertools.product(WORDS[1:], repeat=2)):
        ids = six_words.encode(" ".join(words))
        best, best_lp, _ = brute_force(six_words.model, ids, n, eos)
        beam = beam_answer(six_words.model, ids, width, n, eos)
        if beam.token_ids != best and missed is None:
            missed = (ids, best, best_lp, beam.logprob)
        if beam.token_ids == best and found is None:
            found = ids
        if missed and found:
            break
    assert missed and found

    ids, best, best_lp, beam_lp = missed
    row = orch.compare(six_words, ids, {"max_new_tokens": n}, 0, width, 2000)[1]
    survivors = beam_survivors(six_words.model, ids, width, n, eos)
    step = next(t for t in range(1, len(best) + 1) if tuple(best[:t]) not in survivors[t - 1])
    assert row["lost_optimum_at_step"] == step and row["optimum_proven"] is True
    assert row["gap"] == pytest.approx(beam_lp - best_lp, abs=1e-5) and row["gap"] < 0
    assert row["note"] == f"lost the optimum at step {step} ({row['gap']:.3f} logprob)"

    row = orch.compare(six_words, found, {"max_new_tokens": n}, 0, width, 2000)[1]
    assert row["lost_optimum_at_step"] is None and row["gap"] == 0.0 and row["note"] == "found the optimum"


def test_compare_against_an_unproven_exact_says_best_found(six_words):
    from llmgen import orchestrate as orch

    ids = six_words.encode("I like")
    rows = orch.compare(six_words, ids, {"max_new_tokens": 6}, 0, 2, 1)
    beam, exact = rows[1], rows[2]
    assert exact["note"] == "not proven within 1 expansions" and beam["optimum_proven"] is False
    assert beam["gap"] == pytest.approx(beam["logprob"] - exact["logprob"])
    assert "exact's best found" in beam["note"] and "the optimum" not in beam["note"]


def test_dropped_at_follows_the_survivors():
    from llmgen.decoding.trace import SearchTree

    tree = SearchTree()
    root = tree.add(None, None, 0.0, 0.0, 0, "root")
    a = tree.add(root.id, 1, -0.1, -0.1, 1, "kept")
    tree.add(root.id, 2, -0.5, -0.5, 1, "pruned")
    tree.add(a.id, 3, -0.2, -0.3, 2, "finished")
    assert tree.dropped_at([1, 3]) is None
    assert tree.dropped_at([2, 3]) == 1  # considered and pruned
    assert tree.dropped_at([1, 4]) == 2  # never considered
