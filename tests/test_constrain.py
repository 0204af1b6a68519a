"""Constrained generation (llguidance): outputs stay in their language under every
sampler setting, a constraint that allows everything changes nothing, exact search
under --choice is the best-scoring choice, beam and batch keep per-row matchers, and
bad constraints are one-line errors."""

import itertools
import json
import math
import re
import subprocess
import sys

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgen import orchestrate as orch
from llmgen.cli import main
from llmgen.decoding.beam import BeamConfig, beam_search
from llmgen.decoding.exact import ExactConfig, exact_search
from llmgen.decoding.greedy_sample import generate
from llmgen.scoring import score

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "likes": {"enum": ["tea", "coffee"]},
    },
    "required": ["name", "age", "likes"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{1,4}@[a-z]{2,3}\.(com|org)"
CHOICES = [" coffee", " tea", " cold water", " the sea"]

# Sampler settings drawn by the property tests: stages before and after the constraint.
SAMPLERS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    "top_k": st.sampled_from([None, 5, 40]),
    "top_p": st.sampled_from([None, 0.5, 0.9]),
    "min_p": st.sampled_from([None, 0.05]),
    "repetition_penalty": st.sampled_from([None, 1.3]),
})
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def constrained(ckpt, prompt: str, seed: int, samples: int = 1, **flags):
    gen = orch.generation(ckpt, {k: v for k, v in flags.items() if v is not None}, seed=seed, num_samples=samples)
    return generate(ckpt.model, ckpt.encode(prompt), gen, ckpt.decode)


@PROPERTY
@given(seed=st.integers(0, 2**31), flags=SAMPLERS)
def test_every_output_validates_against_its_schema(ckpt, seed, flags):
    for s in constrained(ckpt, "I like", seed, samples=3, json_schema=json.dumps(SCHEMA), max_new_tokens=60, **flags):
        assert s.finish_reason == "constraint", s.text
        jsonschema.validate(json.loads(s.text), SCHEMA)


@PROPERTY
@given(seed=st.integers(0, 2**31), flags=SAMPLERS)
def test_every_output_matches_its_regex(ckpt, seed, flags):
    for s in constrained(ckpt, "Write to", seed, samples=3, regex=REGEX, max_new_tokens=40, **flags):
        assert s.finish_reason == "constraint", s.text
        assert re.fullmatch(REGEX, s.text), s.text


@PROPERTY
@given(seed=st.integers(0, 2**31), flags=SAMPLERS)
def test_every_output_is_one_of_its_choices(ckpt, seed, flags):
    for s in constrained(ckpt, "I like", seed, samples=3, choice=tuple(CHOICES), max_new_tokens=10, **flags):
        assert s.finish_reason == "constraint"
        assert s.text in CHOICES
        assert s.token_ids == ckpt.encode(s.text)  # each choice as the tokenizer spells it


def test_any_json_object(ckpt):
    for s in constrained(ckpt, "I like", 3, samples=4, format="json", max_new_tokens=100, temperature=0.7):
        if s.finish_reason == "constraint":
            assert isinstance(json.loads(s.text), dict)
        else:  # a string that ran to the limit is still a prefix of an object
            assert s.finish_reason == "length" and s.text.startswith("{")


@pytest.fixture(scope="module")
def embedded():
    """The embedded model: trained, so it writes valid UTF-8 (a random one writes lone
    continuation bytes, which no constraint on text can allow)."""
    from llmgen.checkpoint import embedded_dir, load_checkpoint

    return load_checkpoint(embedded_dir(), device="cpu")


@pytest.mark.parametrize("flags", [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 20, "repetition_penalty": 1.2},
                                   {"temperature": 0.0}])
def test_a_constraint_that_allows_everything_changes_nothing(embedded, flags):
    prompt = embedded.encode("The sea")
    for seed in range(4):
        plain = generate(embedded.model, prompt, orch.generation(embedded, {**flags, "max_new_tokens": 20}, seed=seed),
                         embedded.decode)[0]
        gen = orch.generation(embedded, {**flags, "max_new_tokens": 20, "regex": r"(.|\n)*"}, seed=seed)
        free = generate(embedded.model, prompt, gen, embedded.decode)[0]
        assert free.token_ids == plain.token_ids
        assert free.logprobs == plain.logprobs
        # what it removes is the tokens no UTF-8 text can start with here (lone continuation bytes)
        assert max(free.constraint_record()["constraint_mass"]["removed"]) < 1e-4
        assert free.finish_reason == ("constraint" if plain.finish_reason == "eos" else plain.finish_reason)


def test_constrained_draws_follow_the_renormalised_distribution(ckpt):
    """One-token choices: each is drawn with its model probability over theirs together."""
    words = [" coffee", " sea", " the", " and"]
    ids = [ckpt.encode(w) for w in words]
    assert all(len(i) == 1 for i in ids)
    prompt = ckpt.encode("I like")
    samples = constrained(ckpt, "I like", 11, samples=2000, choice=tuple(words), max_new_tokens=1)
    with torch.no_grad():
        p = torch.softmax(ckpt.model(torch.tensor([prompt]))[0, -1].float(), -1)[[i[0] for i in ids]].double()
    expected = p / p.sum() * len(samples)
    counts = [sum(s.text == w for s in samples) for w in words]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected.tolist()))
    assert chi2 < 16.3, (counts, expected)  # chi-square, 3 degrees of freedom, p = 0.001
    assert samples[0].constraint_record()["constraint_mass"]["removed"] == [pytest.approx(1 - float(p.sum()), abs=1e-5)]


def test_constraint_mass_is_what_the_mask_removed(ckpt):
    """Step 1 of a choice allows exactly the choices' first tokens; step 2 their second."""
    s = constrained(ckpt, "I like", 0, choice=(" cold water", " the sea"), temperature=0.0, max_new_tokens=10)[0]
    prompt = ckpt.encode("I like")
    firsts = {ckpt.encode(c)[0] for c in (" cold water", " the sea")}
    with torch.no_grad():
        p = torch.softmax(ckpt.model(torch.tensor([prompt]))[0, -1].float(), -1)
    record = s.constraint_record()["constraint_mass"]
    assert record["removed"][0] == pytest.approx(1 - float(p[list(firsts)].sum()), abs=1e-5)
    assert record["logprob_lost"] == pytest.approx(sum(math.log(1 - r) for r in record["removed"]), abs=1e-4)
    assert len(record["removed"]) == len(s.token_ids) and s.text in (" cold water", " the sea")


@pytest.mark.parametrize("prompt", ["I like", "The sea", "Water is"])
def test_exact_under_choice_is_the_best_scored_choice(ckpt, prompt):
    ids = ckpt.encode(prompt)
    grammar = orch.constraint(ckpt, {"choice": tuple(CHOICES)})
    result = exact_search(ckpt.model, ids, ExactConfig(max_new_tokens=8, eos_token_ids=ckpt.eos_token_ids, grammar=grammar))
    scored = {c: sum(score(ckpt.model, ckpt.encode(c), None, context=ids).logprobs) for c in CHOICES}
    best = max(scored, key=scored.get)
    assert result.proven and result.finish_reason == "constraint"
    assert ckpt.decode(result.token_ids) == best
    assert result.logprob == pytest.approx(scored[best], abs=1e-4)


def test_exact_under_a_regex_is_the_best_of_every_spelling(ckpt):
    """Brute force: every sequence of tokens that spells two digits, scored; exact finds the best."""
    ids = ckpt.encode("Numbers like")
    digits = [t for t in range(ckpt.model.cfg.vocab_size) if re.fullmatch(r"[0-9]{1,2}", ckpt.decode([t]))]
    spellings = [[t] for t in digits if len(ckpt.decode([t])) == 2]
    spellings += [[a, b] for a, b in itertools.product(digits, digits) if len(ckpt.decode([a, b])) == 2]
    best = max(spellings, key=lambda s: sum(score(ckpt.model, s, None, context=ids).logprobs))
    grammar = orch.constraint(ckpt, {"regex": "[0-9]{2}"})
    result = exact_search(ckpt.model, ids, ExactConfig(max_new_tokens=4, eos_token_ids=ckpt.eos_token_ids, grammar=grammar))
    assert result.proven and result.token_ids == best
    assert result.logprob == pytest.approx(sum(score(ckpt.model, best, None, context=ids).logprobs), abs=1e-4)


def test_beam_hypotheses_stay_in_the_language(ckpt):
    grammar = orch.constraint(ckpt, {"regex": REGEX})
    cfg = BeamConfig(width=4, max_new_tokens=20, num_return=4, eos_token_ids=ckpt.eos_token_ids, grammar=grammar)
    result = beam_search(ckpt.model, ckpt.encode("Write to"), cfg)
    assert len(result.hypotheses) == 4
    for h in result.hypotheses:
        assert h.finish_reason == "constraint" and re.fullmatch(REGEX, ckpt.decode(h.token_ids))
    exact = exact_search(ckpt.model, ckpt.encode("Write to"),
                         ExactConfig(max_new_tokens=20, eos_token_ids=ckpt.eos_token_ids, grammar=grammar, max_expansions=400))
    assert exact.logprob >= max(h.logprob for h in result.hypotheses) - 1e-4 or not exact.proven


def test_batch_with_per_record_schemas(tmp_path, gpt2_dir, ckpt):
    """Each record's output validates against its own schema; batched equals one at a time."""
    schemas = [SCHEMA, {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"],
                        "additionalProperties": False},
               {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}]
    recs = [{"prompt": p, "json_schema": schemas[i % 3], "seed": i} for i, p in enumerate(["I like", "The sea", "Water", "She sells",
                                                                                          "Numbers", "I"])]
    recs.append({"prompt": "Write to", "regex": REGEX, "seed": 9})
    recs.append({"prompt": "I like", "choice": CHOICES, "temperature": 0})
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    outputs = {}
    for size in ("8", "1"):
        out = tmp_path / f"out{size}.jsonl"
        assert main(["batch", str(inp), "-o", str(out), "--model", str(gpt2_dir[0]), "-n", "60", "-b", size, "-t", "0.9"]) == 0
        outputs[size] = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, rec in enumerate(recs):
        got, alone = outputs["8"][i], outputs["1"][i]
        assert got["token_ids"] == alone["token_ids"] and got["finish_reason"] == "constraint"
        assert got["constraint_mass"]["removed"] == pytest.approx(alone["constraint_mass"]["removed"], abs=1e-4)
        if "json_schema" in rec:
            jsonschema.validate(json.loads(got["text"]), rec["json_schema"])
            assert json.loads(got["settings"]["json_schema"]) == rec["json_schema"]
        elif "regex" in rec:
            assert re.fullmatch(REGEX, got["text"])
        else:
            assert got["text"] in CHOICES


def test_run_json_record_and_replay(capsys, gpt2_dir):
    argv = ["run", "I like", "--model", str(gpt2_dir[0]), "--json-schema", json.dumps(SCHEMA), "-n", "60", "--seed", "4", "--json"]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(rec["text"]), SCHEMA)
    assert rec["finish_reason"] == "constraint"
    assert len(rec["constraint_mass"]["removed"]) == len(rec["token_ids"])
    assert rec["constraint_mass"]["logprob_lost"] <= 0
    replay = ["run", "I like", "--model", str(gpt2_dir[0]), "--seed", "4", "--json", "-n", "60", "--json-schema", rec["settings"]["json_schema"]]
    assert main(replay) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == rec["token_ids"]


@pytest.mark.parametrize("constraint", [["--regex", REGEX], ["--json-schema", json.dumps(SCHEMA)], ["--choice", " the sea"]])
def test_speculative_decoding_under_a_constraint(capsys, gpt2_dir, other_dir, constraint):
    """Greedy: the same tokens with a draft model or prompt lookup as without (the
    drafter's chain is constrained too, and rolls its matcher back after each draft);
    sampling: every output still in the language."""
    base = ["run", "Write to", "--model", str(gpt2_dir[0]), *constraint, "-n", "60", "--json"]
    assert main([*base, "-t", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    for draft in (["--draft-model", str(other_dir)], ["--prompt-lookup", "2"], ["--draft-model", str(gpt2_dir[0])]):
        assert main([*base, "-t", "0", *draft]) == 0
        fast = json.loads(capsys.readouterr().out)
        assert fast["token_ids"] == plain["token_ids"] and fast["finish_reason"] == plain["finish_reason"] == "constraint"
        assert fast["constraint_mass"]["removed"] == pytest.approx(plain["constraint_mass"]["removed"], abs=1e-4)
    for seed in range(4):
        assert main([*base, "--seed", str(seed), "--draft-model", str(other_dir), "--draft-tokens", "3"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["finish_reason"] == "constraint" and len(rec["constraint_mass"]["removed"]) == len(rec["token_ids"])
        if "--regex" in constraint:
            assert re.fullmatch(REGEX, rec["text"])
        elif "--json-schema" in constraint:
            jsonschema.validate(json.loads(rec["text"]), SCHEMA)
        else:
            assert rec["text"] == " the sea"


def test_schema_from_a_file_and_a_grammar_file(capsys, gpt2_dir, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "g.lark").write_text('start: "I like" DRINK\nDRINK: " tea" | " coffee"\n')
    assert main(["run", "x", "--model", str(gpt2_dir[0]), "--json-schema", str(tmp_path / "s.json"), "-n", "60", "--json"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), SCHEMA)
    assert main(["exact", "x", "--model", str(gpt2_dir[0]), "--grammar", str(tmp_path / "g.lark"), "-n", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("I like tea", "I like coffee")


@pytest.mark.parametrize("flags, message", [
    (["--regex", "[a-"], "--regex is invalid: invalid regex"),
    (["--json-schema", '{"type": "objectx"}'], "--json-schema is invalid"),
    (["--json-schema", "{oops"], "--json-schema is not JSON"),
    (["--json-schema", "/no/such/schema.json"], "--json-schema must be a readable file or JSON text"),
    (["--format", "yaml"], "--format must be json"),
    (["--regex", "a", "--choice", "b"], "cannot be combined with --regex"),
])
def test_bad_constraints_are_one_line_usage_errors(capsys, gpt2_dir, flags, message):
    assert main(["run", "x", "--model", str(gpt2_dir[0]), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_grammar_file(capsys, gpt2_dir, tmp_path):
    (tmp_path / "g.lark").write_text("start: nothing_defined\n")
    assert main(["beam", "x", "--model", str(gpt2_dir[0]), "--grammar", str(tmp_path / "g.lark")]) == 2
    err = capsys.readouterr().err
    assert "--grammar is invalid: unknown name" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--regex", "[0-9]+"], "--regex cannot be satisfied with this model's vocabulary"),
    (["--choice", "like tea"], "--choice 'like tea' cannot be written with this model's vocabulary"),
])
def test_a_constraint_the_vocabulary_cannot_satisfy_fails_before_generating(capsys, six_dir, flags, message):
    assert main(["run", "I", "--model", six_dir, *flags]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_missing_extra_names_the_install_command(gpt2_dir):
    code = ("import sys; sys.modules['llguidance'] = None\n"
            "from llmgen.cli import main\n"
            f"sys.exit(main(['run', 'x', '--model', {str(gpt2_dir[0])!r}, '--regex', 'a+']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'llmgen: error: constrained generation needs llguidance: in llmgen\'s source tree, ' \
                                  'pip install -c constraints.txt -e ".[constrain]"'


def test_a_scored_text_outside_the_language_is_removed_once(capsys, gpt2_dir):
    assert main(["score", " hello there", "--model", str(gpt2_dir[0]), "--regex", "[0-9]+", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["removed_by"][0] == "constraint" and "constraint" not in rec["removed_by"][1:]
    assert main(["score", "12", "--model", str(gpt2_dir[0]), "--regex", "[0-9]+", "--json", "-t", "0"]) == 0
    assert "constraint" not in json.loads(capsys.readouterr().out)["removed_by"]


def test_probs_shows_what_the_constraint_removed(capsys, gpt2_dir):
    assert main(["probs", "I like", "--model", str(gpt2_dir[0]), "--choice", " tea", "--choice", " coffee", "-t", "0", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    removed = sum(c["prob"] for c in rec["candidates"] if c["removed_by"] == "constraint")
    assert rec["samplers"][0] == "constraint"
    assert rec["constraint_mass"]["removed"][0] >= removed - 1e-6
    assert main(["probs", "I like", "--model", str(gpt2_dir[0]), "--choice", " tea", "--choice", " coffee", "-t", "0"]) == 0
    assert "removed by constraint:" in " ".join(capsys.readouterr().out.split())  # the caption wraps


def test_compare_shows_both_sides(capsys, gpt2_dir):
    assert main(["compare", "I like", "--model", str(gpt2_dir[0]), "--choice", " tea", "--choice", " coffee", "-n", "4",
                 "--seed", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [r["strategy"] for r in rows]
    assert names[:3] == ["greedy", "beam (width 4)", "exact"]
    assert names[3:6] == ["greedy + choice", "beam (width 4) + choice", "exact + choice"]
    for r in rows[3:]:
        assert r["text"] in (" tea", " coffee") and "constraint_mass" in r
    assert rows[5]["logprob"] >= max(rows[3]["logprob"], rows[4]["logprob"]) - 1e-6


def test_the_stage_rolls_back_and_follows_beam_reorders(ckpt):
    """save/restore (speculative drafts) and keep with a row twice (beam search)."""
    from llmgen.sampling.grammar import Constrain
    from llmgen.sampling.stage import Rows

    grammar = orch.constraint(ckpt, {"regex": "[0-9]{3}"})
    stage = Constrain(Rows([[1], [1]], [None, None], "cpu"), grammar)
    one, two = ckpt.encode("1")[0], ckpt.encode("2")[0]
    logits = torch.zeros(2, ckpt.model.cfg.vocab_size)
    start = torch.isfinite(stage.apply(logits))
    assert not start[:, ckpt.eos_token_ids[0]].any()  # EOS only where the text is complete
    saved = stage.save()
    stage.accept([one, two])
    stage.accept([one, two])
    stage.restore(saved)
    assert torch.equal(torch.isfinite(stage.apply(logits)), start)
    stage.accept([one, two])
    stage.keep([1, 1])  # both rows now follow row 1, each with its own matcher
    stage.accept([one, two])
    stage.accept([two, one])
    assert stage.complete(0) and stage.complete(1)
    allowed = torch.isfinite(stage.apply(logits))
    assert allowed.sum(-1).tolist() == [1, 1] and allowed[:, ckpt.eos_token_ids[0]].all()  # only EOS after "122", "221"


def test_chat_replies_are_constrained(tmp_path_factory):
    from checkpoints import build_chat_model

    path = tmp_path_factory.mktemp("chatml")
    build_chat_model(path)
    proc = subprocess.run([sys.executable, "-m", "llmgen", "chat", "--model", str(path), "--choice", "yes", "--choice", "no",
                           "-t", "0.9", "--seed", "3"], input="Is the sea wet?\nAnd cold?\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) == 2 and set(replies) <= {"yes", "no"}, proc.stdout
