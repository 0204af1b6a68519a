"""The chain as users meet it: its order, --samplers, what probs reports for every
stage, bad values at the command line and in batch records, seeds, and the draw."""

import json

import pytest
import torch

from llmgen.cli import main
from llmgen.config import STAGES, SamplingConfig
from llmgen.sampling import build_sampler


@pytest.fixture
def probs(capsys, six_dir):
    """``llmgen probs "I like" --json`` over the whole 7-token vocabulary."""

    def invoke(*flags):
        code = main(["probs", "I like", "--top", "7", "--json", "--seed", "0", "--model", six_dir, *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]

    return invoke


def test_default_chain_is_just_the_draw_and_the_documented_order():
    assert build_sampler(SamplingConfig(), [[1]], [0], 8).order == ["draw"]
    assert build_sampler(SamplingConfig(temperature=0), [[1]], [None], 8).order == ["greedy"]
    assert STAGES == ("penalties", "dry", "temperature", "top-n-sigma", "top-k", "top-p", "min-p", "xtc", "typical", "epsilon", "eta")
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.1, no_repeat_ngram_size=2)
    assert build_sampler(cfg, [[1]], [0], 8).order == ["no-repeat-ngram", "penalties", "temperature", "top-k", "top-p", "min-p", "typical", "draw"]


@pytest.mark.parametrize(
    "flags,stage,token",
    [
        (["--typical-p", "0.5"], "typical", "cold"),
        (["--epsilon-cutoff", "0.1"], "epsilon", "cold"),
        (["--eta-cutoff", "0.2"], "eta", "cold"),
        (["--top-n-sigma", "0.5"], "top-n-sigma", "cold"),
        (["--xtc-probability", "1", "--xtc-threshold", "0.1"], "xtc", "like"),
        (["--mirostat", "2", "--mirostat-tau", "1"], "mirostat", "cold"),
        (["--mirostat", "1", "--mirostat-tau", "0.5"], "mirostat", "cold"),
        (["--min-new-tokens", "3"], "min-new-tokens", "<end>"),
        (["--bad-words", "cold"], "bad-words", "cold"),
        (["--logit-bias", "water=-inf"], "logit-bias", "water"),
        (["--logit-bias", "5=-inf"], "logit-bias", "water"),
        (["--no-repeat-ngram-size", "1"], "no-repeat-ngram", "like"),
    ],
)
def test_probs_json_names_the_stage_that_removed_each_token(probs, flags, stage, token):
    (rec,) = probs(*flags)
    assert stage in rec["samplers"]
    by_token = {c["token"]: c for c in rec["candidates"]}
    assert by_token[token]["removed_by"] == stage and by_token[token]["final_prob"] == 0
    assert sum(c["final_prob"] for c in rec["candidates"]) == pytest.approx(1.0)
    assert all(c["final_prob"] == 0 for c in rec["candidates"] if c["removed_by"])


@pytest.mark.parametrize(
    "flags,stage",
    [(["--presence-penalty", "1"], "penalties"), (["--frequency-penalty", "1"], "penalties"),
     (["--dry-multiplier", "1", "--dry-allowed-length", "0"], "dry"), (["--logit-bias", "coffee=1.5"], "logit-bias")],
)
def test_probs_json_names_the_stages_that_moved_a_token(probs, flags, stage):
    (rec,) = probs(*flags)
    moved = [c for c in rec["candidates"] if stage in c["changed_by"]]
    assert moved and all(c["final_prob"] != pytest.approx(c["prob"]) for c in moved)


def test_dynatemp_and_the_order_are_reported(probs):
    (rec,) = probs("--dynatemp-range", "0.5", "-t", "0.8")
    assert rec["samplers"] == ["temperature", "draw"]
    assert [c["tempered_prob"] for c in rec["candidates"]] != [c["prob"] for c in rec["candidates"]]


def test_samplers_chooses_the_order(probs):
    (first,) = probs("--samplers", "top_p;temperature", "-p", "0.6", "-t", "3")
    (second,) = probs("--samplers", "temperature,top-p", "-p", "0.6", "-t", "3")
    assert first["samplers"] == ["top-p", "temperature", "draw"]
    assert second["samplers"] == ["temperature", "top-p", "draw"]
    # top-p on the model's own distribution keeps fewer tokens than after flattening by T=3
    kept = [sum(c["final_prob"] > 0 for c in r["candidates"]) for r in (first, second)]
    assert kept[0] < kept[1]
    (only,) = probs("--samplers", "top-k", "-k", "2", "-t", "0.5")  # a stage not listed does not run
    assert only["samplers"] == ["top-k", "draw"]


@pytest.mark.parametrize(
    "flags,flag",
    [
        (["--typical-p", "0"], "--typical-p"),
        (["--xtc-threshold", "2"], "--xtc-threshold"),
        (["--samplers", "top-k,nonsense"], "--samplers"),
        (["--samplers", "top-k,top_k"], "--samplers"),
        (["--mirostat", "3"], "--mirostat"),
        (["--logit-bias", "x=1"], "--logit-bias"),
        (["--logit-bias", "coffee"], "--logit-bias"),
        (["--logit-bias", "99=1"], "--logit-bias"),
        (["--epsilon-cutoff", "1"], "--epsilon-cutoff"),
        (["--dry-base", "0.5"], "--dry-base"),
        (["--repeat-last-n", "-2"], "--repeat-last-n"),
        (["--presence-penalty", "101"], "--presence-penalty"),
        (["--repetition-penalty", "1e-45"], "--repetition-penalty"),
        (["-t", "1e-40"], "--temperature"),
        (["--logit-bias", "1=1e308"], "--logit-bias"),
        (["--mirostat-tau", "0"], "--mirostat-tau"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(capsys, six_dir, flags, flag):
    for command in ("run", "probs"):
        code = main([command, "I like", "--model", six_dir, *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"llmgen: error: {flag} "), err


@pytest.mark.parametrize(
    "field,value,says",
    [("typical_p", 0, "typical_p must be in (0, 1]"), ("xtc_threshold", 2, "xtc_threshold must be in [0, 0.5]"),
     ("samplers", "top-k,nonsense", "samplers has an unknown sampler 'nonsense'"), ("mirostat", 3, "mirostat must be 0, 1 or 2"),
     ("logit_bias", {"x": 1}, "logit_bias needs TOKEN to be one token"), ("bad_words", "cold", "bad_words must be a list"),
     ("top_k", 1.5, "top_k must be a number (integer)")],
)
def test_bad_values_in_a_batch_record_name_its_line(tmp_path, capsys, six_dir, field, value, says):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "I like"}\n' + json.dumps({"prompt": "I", field: value}) + "\n")
    code = main(["batch", str(inp), "--model", six_dir, "-n", "2"])
    err = capsys.readouterr().err
    assert code == 1 and f"in.jsonl:2: {says}" in err and err.count("\n") == 1, err


def test_batch_records_carry_new_sampler_fields(tmp_path, capsys, six_dir):
    inp = tmp_path / "in.jsonl"
    records = [
        {"prompt": "I like", "seed": 3, "typical_p": 0.5, "min_new_tokens": 4, "ignore": None},
        {"prompt": "I like", "seed": 3, "logit_bias": {"coffee": "-inf"}, "bad_words": ["cold"], "samplers": "top-k,temperature"},
        {"prompt": "I like", "seed": 3, "logit_bias": ["coffee=-inf"], "xtc_probability": 1, "xtc_threshold": 0.05},
    ]
    inp.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "ignore"}) for r in records) + "\n")
    assert main(["batch", str(inp), "--model", six_dir, "-n", "6", "--ignore-eos"]) == 0
    out = {r["index"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(out) == [0, 1, 2] and all(len(r["token_ids"]) == 6 for r in out.values())
    for rec in (out[1], out[2]):
        assert 4 not in rec["token_ids"]  # coffee is banned
    assert 3 not in out[1]["token_ids"]  # so is cold


def test_min_new_tokens_holds_back_eos(capsys, six_dir):
    def lengths(*flags):
        assert main(["run", "I like", "--model", six_dir, "-n", "5", "--seed", "1", "--num-samples", "40", "--json", *flags]) == 0
        return [len(json.loads(line)["token_ids"]) for line in capsys.readouterr().out.splitlines()]

    assert min(lengths()) < 4  # without it, some samples end early
    assert min(lengths("--min-new-tokens", "4")) >= 4


def test_a_rows_draws_depend_only_on_its_seed_with_random_stages():
    """XTC draws too: its generator is the row's, so a row gives the same tokens alone or in a batch."""
    cfg = SamplingConfig(xtc_probability=0.5, xtc_threshold=0.05, temperature=1.3)
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    together = build_sampler(cfg, [[1]] * 4, [10, 11, 12, 13], 12)
    alone = [build_sampler(cfg, [[1]], [seed], 12) for seed in (10, 11, 12, 13)]
    for _ in range(5):
        batch = together.choose(logits)
        single = [s.choose(logits[i : i + 1]).item() for i, s in enumerate(alone)]
        assert batch.tolist() == single
        together.accept(batch)
        for s, tok in zip(alone, single):
            s.accept([tok])


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(observed) - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(typical_p=0.8, eta_cutoff=0.01), SamplingConfig(top_n_sigma=1.5, dynatemp_range=0.6, temperature=0.9),
     SamplingConfig(epsilon_cutoff=0.02, repetition_penalty=1.3, presence_penalty=0.5)],
)
def test_draws_follow_the_chains_distribution(cfg):
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    n = 20000
    chain = build_sampler(cfg, [[2, 3]] * n, list(range(n)), 16)
    target = chain.distribution(logits)[0].double()
    counts = torch.bincount(chain.choose(logits.repeat(n, 1)), minlength=16).double()
    support = target > 0
    assert counts[~support].sum() == 0 and support.sum() >= 2
    assert chi_square_p_value(counts[support], target[support] * n) > 1e-3


def test_banning_every_token_is_an_error_not_a_crash(capsys, six_dir):
    bans = [f"--logit-bias={i}=-inf" for i in range(7)]
    code = main(["run", "I like", "--model", six_dir, "-n", "2", *bans])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "every token is banned" in err, err
