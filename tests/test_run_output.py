"""What `run` writes for scripts and pipes: streaming into a pipe, JSON events, sample
separators, reproducible records, timings, finish reasons, the shown prompt."""

import json
import subprocess
import sys

from llmgen.cli import main


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_text_streams_into_a_pipe_as_it_is_generated():
    """The first words reach the reader while the rest is still being generated."""
    proc = subprocess.Popen([sys.executable, "-m", "llmgen", "run", "I like", "-n", "3000", "--ignore-eos", "--seed", "1",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.read1(64)
    still_running = proc.poll() is None
    proc.kill()
    proc.wait()
    assert first and still_running


def test_json_stream_gives_one_event_per_token_then_the_record(capsys):
    assert main(["run", "I like", "-n", "6", "--seed", "3", "--json", "--stream", "--ignore-eos"]) == 0
    lines = _json_lines(capsys.readouterr().out)
    events, records = lines[:-1], lines[-1:]
    assert [e["event"] for e in events] == ["token"] * 6
    record = records[0]
    assert [e["token_id"] for e in events] == record["token_ids"]
    assert "".join(e["text"] for e in events) == record["text"]
    assert [e["logprob"] for e in events] == record["logprobs"]


def test_records_carry_what_reproduces_them(capsys, monkeypatch):
    monkeypatch.delenv("LLMGEN_MODEL", raising=False)
    assert main(["run", "I like", "-n", "5", "--seed", "9", "--top-k", "40", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["model"] == "embedded"
    assert first["settings"] == {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.95, "top_k": 40}  # model defaults + flag
    replay = ["run", first["prompt"], "--model", first["model"], "--seed", str(first["seed"]), "--json"]
    for key, value in first["settings"].items():
        replay += [f"--{key.replace('_', '-')}", str(value)]
    assert main(replay) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]


def test_timings_are_reported_separately(capsys):
    assert main(["run", "I like", "-n", "4", "--ignore-eos", "--json", "-t", "0"]) == 0
    t = json.loads(capsys.readouterr().out)["timings"]
    assert t["prompt_tokens"] == 2 and t["generated_tokens"] == 4
    assert 0 < t["first_token_seconds"] and 0 < t["prompt_seconds"] <= t["first_token_seconds"]
    assert t["tokens_per_second"] > 0 and t["prompt_tokens_per_second"] > 0


def test_finish_reason_tells_the_length_limit_from_the_context(capsys):
    assert main(["run", "I like", "-n", "3", "--ignore-eos", "--json", "-t", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    # the embedded model's context is 256: a 250-token prompt leaves 6
    long_prompt = " ".join(["coffee"] * 250)
    assert main(["run", long_prompt, "-n", "50", "--ignore-eos", "--json", "-t", "0"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["finish_reason"] == "context" and len(rec["prompt_token_ids"]) + len(rec["token_ids"]) == 256


def test_samples_are_separated(capsys):
    assert main(["run", "I like", "-n", "4", "--seed", "1", "--num-samples", "3", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.count("---\n") == 2
    assert main(["run", "I like", "-n", "4", "--seed", "1", "--num-samples", "3", "--ignore-eos", "--separator", "\\0"]) == 0
    parts = capsys.readouterr().out.split("\0")
    assert len(parts) == 3 and parts[0] + "---\n" == out.split("---\n")[0] + "---\n"


def test_show_probs_and_show_tree_reach_json(capsys):
    assert main(["run", "I like", "-n", "3", "--seed", "1", "--num-samples", "2", "--json", "--show-probs", "--show-tree",
                 "--ignore-eos"]) == 0
    lines = _json_lines(capsys.readouterr().out)
    records, tree = lines[:2], lines[2]
    for r in records:
        assert [s["token_id"] for s in r["steps"]] == r["token_ids"] and len(r["steps"][0]["alternatives"]) == 6
    assert tree["event"] == "tree" and tree["tree"]["count"] == 2
    assert sum(c["count"] for c in tree["tree"]["children"]) == 2


def test_show_prompt_and_echo_with_chat(tmp_path, capsys):
    from checkpoints import build_gpt2, train_tokenizer

    tok = train_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    build_gpt2(tmp_path, tokenizer=tok, vocab_size=tok.get_vocab_size())
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    common = ["run", "Hi there", "--model", str(tmp_path), "--chat", "-n", "3", "-t", "0"]
    assert main(common + ["--show-prompt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert main(common + ["--echo"]) == 0
    assert capsys.readouterr().out.startswith("Hi there\n")


def test_the_summary_of_several_samples_covers_them_all():
    from llmgen.decoding.trace import Sample, Timings
    from llmgen.render import run_summary

    samples = [Sample(token_ids=[1, 2], finish_reason="length", seed=7), Sample(token_ids=[3], finish_reason="eos", seed=8),
               Sample(token_ids=[4, 5], finish_reason="length", seed=9)]
    line = run_summary(samples, Timings(2, 0.01, 0.02, 5, 0.1)).plain
    assert "3 samples" in line and "5 tokens" in line and "length ×2" in line and "eos ×1" in line and "seeds 7–9" in line
    assert "first token 0.02 s" in line and "40.0 tok/s" in line


def test_a_chat_reply_runs_to_its_end_of_turn_by_default(tmp_path, capsys):
    """Not 50 tokens: the room left in the context, unless a flag (or generation_config) says otherwise."""
    from checkpoints import build_gpt2, train_tokenizer
    from llmgen.checkpoint import load_checkpoint

    tok = train_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    build_gpt2(tmp_path, tokenizer=tok, vocab_size=tok.get_vocab_size())
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    context = load_checkpoint(tmp_path, device="cpu").model.cfg.context_length
    assert main(["run", "Hi", "--model", str(tmp_path), "--chat", "--json", "--seed", "1"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["settings"]["max_new_tokens"] == context
    assert rec["finish_reason"] == "eos" or len(rec["prompt_token_ids"]) + len(rec["token_ids"]) == context
    assert main(["run", "Hi", "--model", str(tmp_path), "--chat", "--json", "-n", "3", "--ignore-eos"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert main(["run", "Hi", "--model", str(tmp_path), "--json", "--seed", "1"]) == 0  # not a chat: llmgen's 50
    assert json.loads(capsys.readouterr().out)["settings"]["max_new_tokens"] == 50
