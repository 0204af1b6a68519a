"""Completions and the man page are generated from the CLI and must not go stale."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_files_are_fresh():
    proc = subprocess.run([sys.executable, "scripts/gen_shell_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_command_and_option_is_covered():
    import typer.main

    from llmgen.cli import app

    bash = (ROOT / "completions/llmgen.bash").read_text()
    zsh = (ROOT / "completions/_llmgen").read_text()
    fish = (ROOT / "completions/llmgen.fish").read_text()
    man = (ROOT / "man/llmgen.1").read_text()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert f"llmgen {name}" in man and f"'{name}:" in zsh and f"-a {name} " in fish and name in bash
        for p in cmd.params:
            if p.param_type_name == "option":
                for opt in p.opts + p.secondary_opts:
                    assert opt in bash and opt in zsh, (name, opt)
                    assert opt.replace("-", "\\-") in man, (name, opt)
                assert f"-l {p.opts[0][2:]}" in fish or any(f"-l {o[2:]} " in fish for o in p.opts if o.startswith("--"))


def test_bash_completes_commands_options_and_values():
    script = (
        f"source {ROOT}/completions/llmgen.bash; "
        "COMP_WORDS=(llmgen be); COMP_CWORD=1; _llmgen; echo \"${COMPREPLY[*]}\"; "
        "COMP_WORDS=(llmgen beam --wi); COMP_CWORD=2; _llmgen; echo \"${COMPREPLY[*]}\"; "
        "COMP_WORDS=(llmgen run --dtype b); COMP_CWORD=3; _llmgen; echo \"${COMPREPLY[*]}\""
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.splitlines()
    assert out == ["beam", "--width", "bfloat16"]


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_page_renders():
    proc = subprocess.run(["man", "-l", str(ROOT / "man/llmgen.1")], capture_output=True, text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "EXIT STATUS" in proc.stdout and "llmgen beam" in proc.stdout


@pytest.mark.parametrize("shell,flag", [("zsh", "-n"), ("fish", "-n")])
def test_other_shells_parse_their_completions(shell, flag):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    path = ROOT / "completions" / ("_llmgen" if shell == "zsh" else "llmgen.fish")
    assert subprocess.run([shell, flag, str(path)]).returncode == 0
