"""score on texts of any length (sliding windows), against another model (KL), and under
a sampler ("could this sampler have written this text?"), each checked against an
independent computation with transformers."""

import json

import numpy as np
import pytest
import torch

from checkpoints import CORPUS, build_gpt2, train_tokenizer
from llmgen.checkpoint import load_checkpoint
from llmgen.cli import main

CONTEXT = 32
LONG = " ".join(CORPUS[:5])  # ~150 tokens: several windows of 32


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer):
    """A GPT-2 with a 32-token context; returns (directory, transformers model, our checkpoint)."""
    path = tmp_path_factory.mktemp("ctx32")
    ref = build_gpt2(path, n_positions=CONTEXT, tokenizer=tokenizer)
    return path, ref, load_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def other(tmp_path_factory, tokenizer):
    """Another GPT-2 with the same tokenizer and nearby weights (their top tokens agree at some positions, not all)."""
    path = tmp_path_factory.mktemp("ctx32b")
    ref = build_gpt2(path, n_positions=CONTEXT, tokenizer=tokenizer, init_scale=0.25)  # the same draws, scaled
    return path, ref, load_checkpoint(path, device="cpu")


def hf_recipe(model, ids: list[int], context: int, stride: int):
    """Hugging Face's "perplexity of fixed-length models", as its documentation writes it,
    keeping each scored token's logprob as well as the summed loss."""
    seq = torch.tensor([ids])
    n = seq.shape[1]
    nll_sum, n_scored, prev_end, logprobs, windows = 0.0, 0, 0, [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=target_ids)
        labels = target_ids[0, 1:]
        lp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
        logprobs += lp[labels != -100].tolist()
        valid = int((labels != -100).sum())
        nll_sum += float(out.loss) * valid
        n_scored += valid
        windows += 1
        prev_end = end
        if end == n:
            break
    return logprobs, float(np.exp(nll_sum / n_scored)), windows


@pytest.mark.parametrize("stride", [None, 5, CONTEXT - 1])
@pytest.mark.parametrize("per_pass", [None, 1, 3])
def test_sliding_windows_equal_the_hf_recipe(small, stride, per_pass):
    from llmgen.scoring import score

    _, ref, ckpt = small
    ids = ckpt.encode(LONG)
    assert len(ids) > 4 * CONTEXT
    ours = score(ckpt.model, ids, ckpt.bos_token_id, stride=stride, per_pass=per_pass)
    expected, ppl, windows = hf_recipe(ref, [ckpt.bos_token_id] + ids, CONTEXT, stride or CONTEXT // 2)
    assert len(ours.logprobs) == len(ids) == len(expected)  # every token scored exactly once
    assert ours.logprobs == pytest.approx(expected, abs=1e-4)
    assert ours.perplexity == pytest.approx(ppl, rel=1e-4)
    assert ours.windows == windows and ours.stride == (stride or CONTEXT // 2)


def test_a_text_that_fits_is_one_window(small):
    from llmgen.scoring import score

    _, ref, ckpt = small
    ids = ckpt.encode("I like cold coffee")
    ours = score(ckpt.model, ids, ckpt.bos_token_id)
    expected, _, windows = hf_recipe(ref, [ckpt.bos_token_id] + ids, CONTEXT, CONTEXT // 2)
    assert ours.windows == windows == 1 and ours.stride is None
    assert ours.logprobs == pytest.approx(expected, abs=1e-4)


def test_every_token_keeps_context_after_the_first_window():
    """After the first window, each token is scored with at least C - S tokens before it."""
    from llmgen.scoring import plan_windows

    for n, c, s in [(200, 32, 16), (200, 32, 5), (77, 32, 31), (33, 32, 16), (32, 32, 16)]:
        windows = plan_windows(n, c, s, 1)
        scored = [p for w in windows for p in range(w.first, w.end)]
        assert scored == list(range(1, n))
        for w in windows[1:]:
            assert w.first - w.begin >= c - s and w.end - w.begin <= c


def test_stride_out_of_range_is_a_usage_error(small, capsys):
    path = str(small[0])
    for stride in ("0", str(CONTEXT)):
        assert main(["score", LONG, "--model", path, "--stride", stride]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--stride" in err


def test_cli_json_reads_a_file_and_reports_windows(small, tmp_path, capsys):
    from llmgen.scoring import score

    path, _, ckpt = small
    book = tmp_path / "book.txt"
    book.write_text(LONG + "\n")
    for flag in ("--file", "-f", "--prompt-file"):
        assert main(["score", flag, str(book), "--model", str(path), "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        ids = ckpt.encode(LONG)
        expected = score(ckpt.model, ids, ckpt.bos_token_id)
        assert rec["token_ids"] == ids and rec["n_tokens"] == len(ids)
        assert rec["windows"] == expected.windows > 1 and rec["stride"] == CONTEXT // 2
        assert rec["logprobs"] == pytest.approx(expected.logprobs, abs=1e-6)
        assert rec["perplexity"] == pytest.approx(expected.perplexity)


def test_file_dash_is_stdin(small, monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"I like cold coffee\n")))
    assert main(["score", "--file", "-", "--model", str(small[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "I like cold coffee"


def test_long_text_table_is_a_summary(small, capsys):
    """A text past a thousand tokens is summarised in the plain view; its tokens are in --json."""
    assert main(["score", " ".join(CORPUS * 2), "--model", str(small[0])]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "windows" in out and "--json" in out and out.count("\n") < 30


# ---------------------------------------------------------------- KL between two models


def hf_divergence(model, reference, ids: list[int], context: int, stride: int):
    """KL(P_ref || P_model) and top-1 agreement at every scored position of the HF recipe's windows."""
    kl, same, n, prev_end = [], [], len(ids), 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
            logq = torch.log_softmax(reference(window).logits[0].double(), -1)
        rows = slice(max(prev_end, begin + 1) - begin - 1, end - begin - 1)
        kl += (logq[rows].exp() * (logq[rows] - logp[rows])).sum(-1).tolist()
        same += (logp[rows].argmax(-1) == logq[rows].argmax(-1)).tolist()
        prev_end = end
        if end == n:
            break
    return np.array(kl), float(np.mean(same))


def test_kl_and_same_top_equal_transformers(small, other, capsys):
    from llmgen.scoring import divergence

    _, ref_model, ckpt = small
    _, ref_reference, reference = other
    ids = ckpt.encode(LONG)
    ours = divergence(ckpt.model, reference.model, ids, ckpt.bos_token_id)
    kl, same = hf_divergence(ref_model, ref_reference, [ckpt.bos_token_id] + ids, CONTEXT, CONTEXT // 2)
    assert ours.kl == pytest.approx(kl.tolist(), abs=1e-4)
    assert ours.kl_mean == pytest.approx(kl.mean(), abs=1e-5)
    assert ours.kl_max == pytest.approx(kl.max(), abs=1e-4)
    assert ours.kl_p99 == pytest.approx(np.percentile(kl, 99), abs=1e-4)
    assert ours.same_top == pytest.approx(same) and 0 < same < 1

    assert main(["score", LONG, "--model", str(small[0]), "--kl-reference", str(other[0]), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kl_mean"] == pytest.approx(kl.mean(), abs=1e-5)
    assert rec["kl_p99"] == pytest.approx(np.percentile(kl, 99), abs=1e-4)
    assert rec["kl_max"] == pytest.approx(kl.max(), abs=1e-4)
    assert rec["same_top"] == pytest.approx(same)
    expected, ppl, _ = hf_recipe(ref_model, [ckpt.bos_token_id] + ids, CONTEXT, CONTEXT // 2)
    _, ref_ppl, _ = hf_recipe(ref_reference, [ckpt.bos_token_id] + ids, CONTEXT, CONTEXT // 2)
    assert rec["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert rec["reference_perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    assert rec["windows"] > 1 and rec["n_tokens"] == len(ids)


def test_a_model_against_itself_has_no_divergence(small, capsys):
    assert main(["score", LONG, "--model", str(small[0]), "--kl-reference", str(small[0]), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kl_max"] == pytest.approx(0, abs=1e-6) and rec["same_top"] == 1.0
    assert rec["perplexity"] == pytest.approx(rec["reference_perplexity"])


def test_kl_table(small, other, capsys):
    assert main(["score", LONG, "--model", str(small[0]), "--kl-reference", str(other[0])]) == 0
    out = capsys.readouterr().out
    assert "KL" in out and "same top" in out and "perplexity" in out


def test_kl_refuses_another_tokenizer(small, tmp_path, capsys):
    path = tmp_path / "othertok"
    build_gpt2(path, n_positions=CONTEXT, tokenizer=train_tokenizer(300))
    capsys.readouterr()  # transformers' own progress lines while writing it
    assert main(["score", LONG, "--model", str(small[0]), "--kl-reference", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err


def test_kl_takes_no_sampling_flags(small, capsys):
    assert main(["score", LONG, "--model", str(small[0]), "--kl-reference", str(small[0]), "-k", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- could this sampler have written it?

SETTINGS = [
    {"temperature": 0.9, "top_k": 12, "top_p": 0.9, "repetition_penalty": 1.3, "xtc_probability": 0.5, "xtc_threshold": 0.05},
    {"temperature": 1.2, "min_p": 0.05, "typical_p": 0.95, "dry_multiplier": 0.8, "no_repeat_ngram_size": 3, "frequency_penalty": 0.5},
    {"mirostat": 2, "mirostat_tau": 3.0},
    {"temperature": 0.7, "top_n_sigma": 1.5, "epsilon_cutoff": 0.01, "presence_penalty": 0.4},
]


def generate_from_bos(ckpt, settings: dict, seed: int, n: int = 60):
    from llmgen import orchestrate as orch
    from llmgen.decoding.greedy_sample import generate

    gen = orch.generation(ckpt, {**settings, "max_new_tokens": n}, seed=seed, ignore_eos=True)
    return gen, generate(ckpt.model, [ckpt.bos_token_id], gen, ckpt.decode)[0].token_ids


@pytest.mark.parametrize("settings", SETTINGS, ids=["k-p-penalty-xtc", "minp-typical-dry-ngram", "mirostat", "sigma-eps"])
def test_a_sampled_text_is_possible_under_its_sampler(gpt2_dir, settings):
    from llmgen.sampler_score import sampler_score

    ckpt = load_checkpoint(gpt2_dir[0], device="cpu")
    for seed in (1, 2, 3):
        gen, ids = generate_from_bos(ckpt, settings, seed)
        judged = sampler_score(ckpt.model, ids, ckpt.bos_token_id, gen.sampling, gen.seed, gen.stop_token_ids, gen.tokens)
        assert all(p > 0 for p in judged.probs), (seed, judged.removed_by)
        assert judged.impossible == 0 and judged.logprob > -float("inf")
        assert judged.removed_by == [None] * len(ids)


def test_top_k_1_removes_the_first_token_greedy_would_not_choose(gpt2_dir):
    from llmgen import orchestrate as orch
    from llmgen.sampler_score import sampler_score

    path, ref = gpt2_dir
    ckpt = load_checkpoint(path, device="cpu")
    _, ids = generate_from_bos(ckpt, {"temperature": 1.0}, seed=5)
    with torch.no_grad():
        argmax = ref(torch.tensor([[ckpt.bos_token_id] + ids])).logits[0, :-1].argmax(-1).tolist()
    first = next(i for i, (a, t) in enumerate(zip(argmax, ids)) if a != t)
    gen = orch.generation(ckpt, {"top_k": 1})
    judged = sampler_score(ckpt.model, ids, ckpt.bos_token_id, gen.sampling, gen.seed)
    assert judged.probs[:first] == [1.0] * first and judged.removed_by[:first] == [None] * first
    assert judged.probs[first] == 0 and judged.removed_by[first] == "top-k"
    assert judged.impossible == sum(a != t for a, t in zip(argmax, ids)) and judged.logprob == -float("inf")
    greedy = sampler_score(ckpt.model, ids, ckpt.bos_token_id, orch.generation(ckpt, {"temperature": 0}).sampling, None)
    assert greedy.removed_by[first] == "greedy"


def test_sampler_flags_on_the_cli(gpt2_dir, capsys):
    path, ref = gpt2_dir
    text = "I like cold coffee and she sells tea"
    assert main(["score", text, "--model", str(path), "-k", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    ckpt = load_checkpoint(path, device="cpu")
    with torch.no_grad():
        argmax = ref(torch.tensor([[ckpt.bos_token_id] + rec["token_ids"]])).logits[0, :-1].argmax(-1).tolist()
    greedy = [a == t for a, t in zip(argmax, rec["token_ids"])]
    assert rec["sampler_probs"] == [1.0 if g else 0.0 for g in greedy]
    assert rec["removed_by"] == [None if g else "top-k" for g in greedy]
    assert rec["impossible"] == greedy.count(False) > 0 and rec["sampler_logprob"] is None
    assert rec["samplers"] == ["top-k", "greedy"] and rec["settings"]["top_k"] == 1
    assert len(rec["logprobs"]) == len(rec["token_ids"])  # the model's own, as without flags

    assert main(["score", text, "--model", str(path), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "top-k" in out and "impossible" in out


def test_plain_score_has_no_sampler_fields(gpt2_dir, capsys):
    assert main(["score", "I like", "--model", str(gpt2_dir[0]), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert "sampler_probs" not in rec and "seed" not in rec
