"""train under kills, damaged saves, full disks, divergence and sizes that cannot fit.

Every failure is one line and an exit code; every resumed run ends in the very bytes of
the uninterrupted one. Runs go through the CLI, with the tiny preset shrunk to 30 steps
and a save every 10 so a test can stop between saves.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import replace

import pytest
from safetensors.torch import load_file, save_file
from test_train import grammar_text, one_thread  # noqa: F401  (one_thread: an autouse fixture)

from llmgen import train as training
from llmgen.cli import main
from llmgen.train import PRESETS, STATE_DIR

CFG = replace(PRESETS["tiny"], vocab_size=400, steps=30, eval_every=10, save_every=10, warmup=5)
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "grammar.txt"
    path.write_text(grammar_text(1200, 0))
    return path


def argv(corpus, out, *extra) -> list[str]:
    return ["train", str(corpus), "--output", str(out), "--preset", "tiny", *extra]


def shrink_preset(mp: pytest.MonkeyPatch) -> None:
    mp.setitem(PRESETS, "tiny", CFG)


@pytest.fixture(autouse=True)
def small_tiny_preset(monkeypatch):
    shrink_preset(monkeypatch)


def interrupt_at(mp: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C just before step ``step + 1`` starts."""
    original = training.Trainer._train_step

    def train_step(self, lr):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self, lr)

    mp.setattr(training.Trainer, "_train_step", train_step)


def model_bytes(out) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in MODEL_FILES}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The files of an uninterrupted run, byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "model"
    with pytest.MonkeyPatch.context() as mp:
        shrink_preset(mp)
        assert main(argv(corpus, out)) == 0
    return model_bytes(out)


@pytest.fixture(scope="module")
def stopped_at_25(corpus, tmp_path_factory):
    """A run interrupted at step 25: whole saves at steps 10 and 20."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as mp:
        shrink_preset(mp)
        interrupt_at(mp, 25)
        assert main(argv(corpus, out)) == 130
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == ["step-00000010", "step-00000020"]
    return out


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def one_line(err: str) -> str:
    """The one line a failure wrote, besides the progress lines of the steps before it."""
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if not re.match(r"step \d+/\d+  loss ", line)]
    assert len(lines) == 1 and err.endswith("\n"), err
    return lines[0]


def clean(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err and "warning" not in err, err
    return err


# ---------------------------------------------------------------- kills


def tree_digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"dir")
    return h.hexdigest()


class KillPoints:
    """While armed, a copy of the output directory before and after every filesystem
    call that changes it or makes it durable: what a kill -9 at that instant leaves on
    disk (a kill keeps what was written; only a power cut loses the unsynced)."""

    CALLS = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"),
             (os, "chmod"), (shutil, "rmtree")]

    def __init__(self, run, into) -> None:
        self.run, self.into, self.armed = run, into, False
        self.copies, self.seen, self.calls = [], set(), 0

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for module, name in self.CALLS:
            mp.setattr(module, name, self._wrap(getattr(module, name)))

    def arm_during(self, mp: pytest.MonkeyPatch, method: str, when=lambda trainer: True) -> None:
        original = getattr(training.Trainer, method)

        def armed(trainer, *args, **kwargs):
            self.armed = when(trainer)
            try:
                return original(trainer, *args, **kwargs)
            finally:
                self.armed = False

        mp.setattr(training.Trainer, method, armed)

    def _wrap(self, fn):
        def call(*args, **kwargs):
            self._copy()
            result = fn(*args, **kwargs)
            self._copy()
            return result

        return call

    def _copy(self) -> None:
        if not self.armed:
            return
        self.armed, self.calls = False, self.calls + 1
        try:
            digest = tree_digest(self.run)
            if digest not in self.seen:
                self.seen.add(digest)
                self.copies.append(shutil.copytree(self.run, self.into / f"kill-{len(self.copies):03d}", symlinks=True))
        finally:
            self.armed = True


def test_a_kill_at_any_instant_of_a_save_or_of_the_final_write_resumes_to_the_same_bytes(corpus, reference, tmp_path, capsys):
    """The old layout replaced the weights, then wrote state.json: a kill between the two
    resumed the new weights at the old step, with exit 0 and weights 0.188 off."""
    run = tmp_path / "run"
    kills = KillPoints(run, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        kills.install(mp)
        kills.arm_during(mp, "save_state", when=lambda trainer: trainer.step == 30)  # the last save: it prunes step 10's
        kills.arm_during(mp, "finish")
        assert main(argv(corpus, run)) == 0
    assert model_bytes(run) == reference
    assert kills.calls > 30 and len(kills.copies) > 15, (kills.calls, len(kills.copies))
    capsys.readouterr()
    for killed in kills.copies:
        assert main(argv(corpus, killed, "--resume")) == 0, killed
        clean(capsys.readouterr().err)
        assert model_bytes(killed) == reference, killed
        assert sorted(p.name for p in killed.iterdir()) == sorted([*MODEL_FILES, "training.json"]), killed


def test_ctrl_c_in_the_middle_of_a_save_resumes_to_the_same_bytes(corpus, reference, tmp_path, monkeypatch, capsys):
    """Interrupted as the new save directory is renamed into place (its cleanup runs)."""
    original, out = os.replace, tmp_path / "run"

    def replace_(src, dst, **kwargs):
        if str(dst).endswith("step-00000020"):
            raise KeyboardInterrupt
        return original(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace_)
    assert main(argv(corpus, out)) == 130
    assert one_line(capsys.readouterr().err) == "llmgen: interrupted"
    monkeypatch.setattr(os, "replace", original)
    assert main(argv(corpus, out, "--resume")) == 0
    clean(capsys.readouterr().err)
    assert model_bytes(out) == reference


def test_ctrl_c_before_the_model_is_written_keeps_the_last_two_saves_and_resumes(corpus, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def finish(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(training.Trainer, "finish", finish)
        assert main(argv(corpus, out)) == 130
    assert one_line(capsys.readouterr().err) == "llmgen: interrupted"
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == ["step-00000020", "step-00000030"]
    assert main(argv(corpus, out, "--resume")) == 0
    clean(capsys.readouterr().err)
    assert model_bytes(out) == reference


# ---------------------------------------------------------------- damaged saves


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x20]) + data[middle + 1 :])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["cut", "flip", "delete"])
@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "tokenizer.json"])
def test_a_damaged_save_is_named_and_the_one_before_it_resumes_to_the_same_bytes(
        stopped_at_25, reference, tmp_path, corpus, capsys, name, how):
    run = copy_of(stopped_at_25, tmp_path)
    damaged = run / STATE_DIR / "step-00000020" / name
    damage(damaged, how)
    assert main(argv(corpus, run, "--resume")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "at step 10" in warnings[0], err
    assert model_bytes(run) == reference


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "tokenizer.json"])
def test_the_only_save_damaged_is_one_line_naming_the_file(corpus, tmp_path, monkeypatch, capsys, name):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 15)
    assert main(argv(corpus, run)) == 130
    damage(run / STATE_DIR / "step-00000010" / name, "cut")
    capsys.readouterr()
    assert main(argv(corpus, run, "--resume")) == 1
    err = one_line(capsys.readouterr().err)
    assert f"step-00000010/{name} is damaged" in err and "no earlier save" in err, err


def test_resuming_with_another_model_shape_names_the_flag(stopped_at_25, tmp_path, corpus, capsys):
    run = copy_of(stopped_at_25, tmp_path)
    assert main(argv(corpus, run, "--resume", "--dim", "32")) == 1
    err = one_line(capsys.readouterr().err)
    assert "another shape" in err and "--dim 64 (now 32)" in err, err


def test_a_damaged_training_record_is_one_line(reference, tmp_path, corpus, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "training.json").write_text('{"kind": "pretr')
    assert main(argv(corpus, run, "--resume")) == 1
    assert "training.json is damaged" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------- full disks


def full_disk_for(monkeypatch, name: str, inside) -> None:
    """fsync fails with ENOSPC for files called ``name`` (or temporary names made from it)
    directly in ``inside`` (anywhere, if None), as it does when the disk fills while the
    data waits in the page cache."""
    original = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if name in os.path.basename(path) and (inside is None or os.path.dirname(path) == os.path.realpath(inside)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name,named", [
    ("model.safetensors", "model.safetensors"), ("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
    ("training.json", "training.json"), ("state.safetensors", f"{STATE_DIR}/step-00000010"),
])
def test_a_full_disk_is_one_line_and_resume_finishes_the_same_bytes(corpus, reference, tmp_path, monkeypatch, capsys, name, named):
    """The model's files, the record that marks it finished, and a save of the state."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        full_disk_for(mp, name, inside=None if name.startswith("state") else run)
        assert main(argv(corpus, run)) == 1
    err = one_line(capsys.readouterr().err)
    assert err == f"llmgen: error: no space left on the device writing {run}/{named}", err
    assert main(argv(corpus, run, "--resume")) == 0  # space freed
    assert model_bytes(run) == reference


def test_an_output_path_through_a_file_is_one_line(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(argv(corpus, tmp_path / "file" / "out")) == 1
    err = one_line(capsys.readouterr().err)
    assert err == f"llmgen: error: cannot write {tmp_path}/file/out/{STATE_DIR}: a part of the path is a file, not a directory", err


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "1e38", "2", "0"])
def test_lr_must_be_finite_and_at_most_1(corpus, tmp_path, capsys, value):
    """1e38 is finite as a double, but AdamW's step overflows float32 with it (an internal
    error); 2 to 1e37 only wrote NaN weights with exit 0."""
    assert main(argv(corpus, tmp_path / "out", "--lr", value)) == 2
    assert "--lr" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_loss_that_becomes_nan_stops_naming_the_step_and_saves_nothing(reference, tmp_path, corpus, capsys):
    """Fine-tuning a model one of whose weights is infinite: the first loss is NaN."""
    broken = tmp_path / "broken"
    with pytest.MonkeyPatch.context() as mp:
        shrink_preset(mp)
        assert main(argv(corpus, broken)) == 0
    weights = load_file(str(broken / "model.safetensors"))
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "The cold", "completion": " dog sees the fox."}) for _ in range(8)))
    out = tmp_path / "ft"
    capsys.readouterr()
    assert main(["train", "--init", str(broken), "--pairs", str(pairs), "--output", str(out), "--steps", "5"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "diverged at step 1 of 5: the loss is nan" in err, err
    assert not (out / "model.safetensors").exists()
    assert not list((out / STATE_DIR).iterdir())


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("flags,named", [
    (["--vocab-size", "1000000000"], "--vocab-size"),  # the tokenizers library aborted the process (exit 134)
    (["--vocab-size", "257"], "--vocab-size"),
    (["--heads", "0"], "--heads"),  # was a ZeroDivisionError
    (["--heads", "-4"], "--heads"),
    (["--dim", "64", "--heads", "3"], "--heads 3"),
    (["--layers", "0"], "--layers"),
    (["--steps", "2000000000"], "--steps"),
    (["--seed", str(2**63)], "--seed"),
    (["--layers", "100000", "--dim", "4096"], "GiB"),
    (["--dim", "10000000"], "GiB"),
    (["--batch-size", "1000000000"], "GiB"),
    (["--context", "100000000"], "GiB"),
])
def test_sizes_that_cannot_work_are_refused_before_any_work(corpus, tmp_path, capsys, flags, named):
    assert main(argv(corpus, tmp_path / "out", *flags)) == 2
    err = one_line(capsys.readouterr().err)
    assert named in err, err
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_names_every_size_flag(corpus, tmp_path, capsys):
    assert main(argv(corpus, tmp_path / "out", "--layers", "100000", "--dim", "4096")) == 2
    err = one_line(capsys.readouterr().err)
    for flag in ("--layers 100000", "--dim 4096", "--vocab-size 400", "--batch-size 16", "--context 64"):
        assert flag in err, err


def test_the_largest_vocabulary_trains(corpus, tmp_path, capsys):
    """1,000,000 is the bound: the tokenizer reserves about 70 MB for it up front (and
    stops at what the text holds); 10**9 asked for 70 GB and aborted the process."""
    out = tmp_path / "out"
    assert main(argv(corpus, out, "--vocab-size", "1000000", "--steps", "1", "--batch-size", "1", "--context", "8")) == 0
    assert "error" not in capsys.readouterr().err and (out / "model.safetensors").is_file()


def test_the_estimate_is_a_lower_bound_of_the_parameters():
    from llmgen.models.gpt2 import GPT2, GPT2Config

    cfg = replace(CFG, n_layer=3, n_embd=48, n_head=4)
    model = GPT2(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=48, n_layer=3, n_head=4))
    assert training.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert training.memory_needed(cfg) > 16 * training.parameter_count(cfg)
