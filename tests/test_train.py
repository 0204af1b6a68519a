"""Training: the loss falls, checkpoints load, resume lands on the same step, and -100 masking."""

import json
import random
from dataclasses import replace

import pytest
import torch

from llmgen.checkpoint import load_checkpoint
from llmgen.cli import main
from llmgen.train import (
    IGNORE_INDEX,
    PRESETS,
    finetune,
    lm_loss,
    mask_prompt,
    pair_batch,
    pretrain,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float sums depend on how many threads split them: a run resumed on two threads
    after starting on one differs by 1e-3 in loss. Commands choose their threads by the
    machine's load (llmgen/threads.py), so every run here, in process or through the CLI,
    is held to one."""
    saved = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMGEN_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(saved)


def grammar_text(n: int, seed: int) -> str:
    """Sentences from a small grammar: learnable structure, not memorisable text."""
    rng = random.Random(seed)
    adjectives = ["cold", "hot", "little", "old", "green", "quiet", "happy", "dark"]
    nouns = ["coffee", "water", "dog", "garden", "house", "river", "tulip", "fox"]
    verbs = ["likes", "sees", "finds", "keeps", "wants", "watches"]
    sentences = [
        f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)}."
        for _ in range(n)
    ]
    return "\n\n".join(" ".join(sentences[i : i + 3]) for i in range(0, n, 3))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "grammar.txt"
    path.write_text(grammar_text(3000, 0))
    return path


CFG = replace(PRESETS["tiny"], vocab_size=400, steps=120, eval_every=40, save_every=40, warmup=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("trained")
    return pretrain([corpus], out, CFG, CPU)


def test_training_lowers_held_out_loss(trained):
    assert trained.steps == CFG.steps
    assert trained.final_eval_loss < trained.initial_eval_loss - 2.0, trained.record
    record = json.loads((trained.out_dir / "training.json").read_text())
    assert record["final_eval_loss"] == pytest.approx(trained.final_eval_loss)
    assert len(next(iter(record["data"].values()))) == 64  # sha256 of the training file


def test_trained_checkpoint_runs_and_scores(trained, capsys):
    model = str(trained.out_dir)
    assert main(["run", "The cold", "--model", model, "-n", "12", "--seed", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["token_ids"] and rec["finish_reason"] in ("eos", "length")
    assert main(["score", "The cold coffee likes the old dog.", "--model", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] < 30


def test_resume_after_interruption_reaches_the_same_step_and_weights(tmp_path, corpus, trained):
    out = tmp_path / "run"
    partial = pretrain([corpus], out, CFG, CPU, stop_after=50)  # killed after step 50; last save at 40
    assert partial.steps == 50 and not (out / "model.safetensors").exists()
    resumed = pretrain([corpus], out, CFG, CPU, resume=True)
    assert resumed.steps == CFG.steps
    assert resumed.final_eval_loss == pytest.approx(trained.final_eval_loss, abs=1e-4)
    a = load_checkpoint(out, device="cpu", trainable=True).model.state_dict()
    b = load_checkpoint(trained.out_dir, device="cpu", trainable=True).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_cli_refuses_to_overwrite_a_run_without_resume(tmp_path, corpus, capsys):
    pretrain([corpus], tmp_path / "run", CFG, CPU, stop_after=20)  # unfinished: its state waits for --resume
    code = main(["train", str(corpus), "--output", str(tmp_path / "run"), "--preset", "tiny", "--steps", "5"])
    assert code == 1 and "--resume" in capsys.readouterr().err


def test_a_finished_run_keeps_no_state_and_is_not_resumed(trained, corpus, capsys):
    """The model directory holds the model, not the optimizer; --resume says there is
    nothing to do instead of reprinting the run as if it had trained."""
    from llmgen.train import STATE_DIR

    assert not (trained.out_dir / STATE_DIR).exists()
    before = (trained.out_dir / "model.safetensors").stat().st_mtime_ns
    argv = ["train", str(corpus), "--output", str(trained.out_dir), "--preset", "tiny"]
    assert main(argv + ["--resume"]) == 0
    assert "already trained" in capsys.readouterr().err
    assert main(argv) == 1 and "finished model" in capsys.readouterr().err
    assert (trained.out_dir / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("width", [50, 80, 120])
def test_training_progress_keeps_the_step_and_the_times_at_any_width(width):
    from rich.console import Console

    from llmgen.render import TrainingProgress

    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    bar = TrainingProgress(1000, console)
    bar.progress.update(bar.task, completed=120, loss="3.456", eval="3.789", rate="12,345")
    console.print(bar.progress.make_tasks_table(bar.progress.tasks))
    line = console.export_text().rstrip("\n")
    assert "120/1000" in line and "0:00:00" in line and "loss 3.456" in line and "ETA" in line
    assert len(line) <= width and "…" not in line


def test_cli_train_flags_are_validated(corpus, tmp_path, capsys):
    assert main(["train", str(corpus), "--output", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert main(["train", str(corpus), "--output", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert main(["train", "--output", str(tmp_path / "x"), "--init", str(tmp_path)]) == 2


# ---------------------------------------------------------------- fine-tuning and -100 masking


def test_pair_batch_masks_prompt_and_padding():
    examples = [([5, 6, 7, 8, 9], 2), ([5, 6, 7], 1)]  # (ids, completion start)
    inputs, mask, labels = pair_batch(examples, pad_id=0)
    assert inputs.tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # targets are ids[1:]; prompt ids (positions < start) and padding are ignored
    assert labels.tolist() == [[IGNORE_INDEX, 7, 8, 9], [6, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_loss_ignores_prompt_targets_and_counts_completion_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.randint(0, 11, (2, 6))
    start = torch.tensor([3, 4])  # completion tokens begin at positions 3 and 4
    base = lm_loss(logits, mask_prompt(targets, start))

    changed_prompt = targets.clone()
    changed_prompt[0, :2] = (changed_prompt[0, :2] + 1) % 11  # targets of prompt positions
    changed_prompt[1, :3] = (changed_prompt[1, :3] + 5) % 11
    assert torch.equal(lm_loss(logits, mask_prompt(changed_prompt, start)), base)

    changed_completion = targets.clone()
    changed_completion[0, 4] = (changed_completion[0, 4] + 1) % 11
    assert not torch.equal(lm_loss(logits, mask_prompt(changed_completion, start)), base)


def test_padding_does_not_change_the_model_loss(trained):
    """Right padding with the attention mask: a padded row scores exactly like the row alone."""
    model = load_checkpoint(trained.out_dir, device="cpu").model
    short, long = ([3, 4, 5, 6], 1), ([3, 4, 5, 6, 7, 8, 9], 2)
    inputs, mask, labels = pair_batch([short, long], pad_id=0)
    alone_in, alone_mask, alone_labels = pair_batch([short], pad_id=0)
    with torch.no_grad():
        batched = model(inputs, attention_mask=mask)[0, :3]
        alone = model(alone_in, attention_mask=alone_mask)[0]
    assert torch.allclose(batched, alone, atol=1e-5)
    assert labels[0, 3:].eq(IGNORE_INDEX).all()


def test_finetune_raises_completion_logprob(trained, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q: what does the fox want?\nA:", "completion": " the green river."}] * 8
    rows += [{"prompt": "Q: what does the dog see?\nA:", "completion": " the dark house."}] * 8
    pairs.write_text("\n".join(json.dumps(r) for r in rows))

    def completion_logprob(model_dir):
        ckpt = load_checkpoint(model_dir, device="cpu")
        p = ckpt.encode("Q: what does the fox want?\nA:")
        c = ckpt.encode(" the green river.")
        with torch.no_grad():
            logp = torch.log_softmax(ckpt.model(torch.tensor([p + c]))[0], -1)
        return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))

    cfg = replace(CFG, steps=30, batch_size=8, lr=3e-3, eval_every=10, save_every=10, warmup=3)
    result = finetune(trained.out_dir, pairs, tmp_path / "ft", cfg, CPU)
    assert result.steps == 30 and result.final_eval_loss < result.initial_eval_loss
    assert completion_logprob(tmp_path / "ft") > completion_logprob(trained.out_dir) + 5


def test_malformed_pairs_name_the_line(trained, tmp_path, capsys):
    pairs = tmp_path / "bad.jsonl"
    pairs.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    code = main(["train", "--init", str(trained.out_dir), "--pairs", str(pairs), "--output", str(tmp_path / "o")])
    assert code == 1 and "bad.jsonl:2" in capsys.readouterr().err
