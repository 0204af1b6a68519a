"""Chat templates that fail, loop or bloat, and tokenizer configs that are broken, at the
command line: each ends in one line on stderr naming the template's file, never a
traceback, an internal error or a hang. Also the template formats transformers accepts
besides one string (a list of named templates, chat_template.jinja and
additional_chat_templates/), picked by --chat-template on every command that takes --chat.

The tiny ChatML model is built once; each test copies it and writes its own templates."""

import io
import json
import shutil
import sys
import time

import pytest

from llmgen.cli import main

TOOLS = ("<|im_start|>system\nTools: none<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
         "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SECONDS_WITH_ROOM = 30  # the render stops at 3 s; loading the model and a loaded machine take the rest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from checkpoints import build_chat_model

    path = tmp_path_factory.mktemp("chatml")
    build_chat_model(path)
    return path


@pytest.fixture
def model(built, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(built, path)
    return path


def _template(model, template) -> None:
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


def _fails(capsys, argv, code: int = 1) -> str:
    """Runs llmgen; it must exit with ``code`` and one line on stderr, no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmgen: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


def _run(model, *flags) -> list[str]:
    return ["run", "Hi", "--model", str(model), "--chat", "-n", "2", *flags]


def _names(model, *names) -> None:
    """tokenizer_config.json with a list of named templates: ChatML as ``default``, and
    the others ChatML after a tools preamble."""
    from checkpoints import CHATML

    _template(model, [{"name": n, "template": CHATML if n == "default" else TOOLS} for n in names])


# ---------------------------------------------------------------- templates that fail


@pytest.mark.parametrize("template,expected", [
    ("{{ 1 / 0 }}", "division by zero (ZeroDivisionError)"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{{ messages.pop_all() }}", "has no attribute 'pop_all'"),
    ("{% macro again(n) %}{{ again(n + 1) }}{% endmacro %}{{ again(0) }}", "calls itself too deeply"),
    ("{% for m in messages %}\n{% if m.role == 'user' %}{{ raise_exception('Roles must\nalternate') }}{% endif %}{% endfor %}",
     "line 2: Roles must alternate"),
    ("{% for m in messages %}{{ m.content }", "syntax error"),
])
def test_a_template_that_fails_is_one_line_naming_it(model, capsys, template, expected):
    _template(model, template)
    err = _fails(capsys, _run(model))
    assert f"chat template in {model / 'tokenizer_config.json'}, line" in err and expected in err


@pytest.mark.parametrize("tag", ['{% include "other.jinja" %}', '{% extends "base.jinja" %}',
                                 '{% import "macros.jinja" as m %}', '{% from "macros.jinja" import turn %}'])
def test_a_template_cannot_load_another(model, capsys, tag):
    _template(model, "{{ bos_token }}\n" + tag)
    err = _fails(capsys, _run(model))
    assert "tokenizer_config.json, line 2" in err and "loads another template" in err


# ---------------------------------------------------------------- templates that would not end


@pytest.mark.parametrize("template,expected", [
    ("{% for i in range(4000) %}{% for j in range(4000) %}{% for k in range(4000) %}{% endfor %}{% endfor %}{% endfor %}",
     "still running after 0.5 s"),
    ("{% set big = range(4000) | list %}{% for i in big %}{% for j in big %}{% for k in big %}{% endfor %}{% endfor %}{% endfor %}",
     "still running after 0.5 s"),
    ("{% for i in range(10**9) %}{% endfor %}", "range() is given a number over"),
    ("{{ 'x' * 10**8 }}", "builds a value of over"),
    ("{% set s = 'x' * 10**8 %}", "builds a value of over"),
    ("{{ [messages] * 10**9 }}", "builds a value of over"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "builds a value of over"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "builds a value of over"),
    ("{% set s %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}", "builds a value of over"),
    ("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", "builds a value of over"),
    ("{{ 'x' | center(10**10) }}", "the filter center is given a number over"),
    ("{{ 'x'.ljust(10**10) }}", "ljust() is given a number over"),
    ("{{ 7 ** (10 ** 10) }}", "builds a number of over 4096 bits"),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "over 4096 bits"),
])
def test_a_runaway_template_is_stopped(model, capsys, monkeypatch, template, expected):
    from llmgen import template_sandbox

    monkeypatch.setattr(template_sandbox, "SECONDS", 0.5)  # the bound is 3 s; the suite need not wait for it
    _template(model, template)
    start = time.monotonic()
    err = _fails(capsys, _run(model))
    assert time.monotonic() - start < SECONDS_WITH_ROOM
    assert f"chat template in {model / 'tokenizer_config.json'}" in err and expected in err


@pytest.mark.parametrize("template,expected", [
    ("{{ '{:>1000000000}'.format('x') }}", "formats a field over"),
    ("{{ '{0:{1}}'.format('x', '1000000000') }}", "formats a field over"),  # the width from a nested field
    ("{{ '{w:>{n}}'.format_map({'w': 'x', 'n': '1000000000'}) }}", "formats a field over"),
    ("{{ '%1000000000s' % 'x' }}", "formats a field over"),
    ("{{ '%.1000000000f' % 1.5 }}", "formats a field over"),
    ("{{ '%0*d' % (10**9, 1) }}", "a '*' width in % is given a number over"),
    ("{{ '%1000000000s' | format('x') }}", "formats a field over"),
])
def test_a_format_width_is_refused_before_it_is_built(model, capsys, template, expected):
    """A field's width or precision sizes what formatting builds, and it is in the format
    text, not in a value the size bound looked at: each of these built a gigabyte string
    before it was refused (found by tests/test_fuzz_files.py). tracemalloc sees every
    string Python allocates."""
    import tracemalloc

    _template(model, template)
    tracemalloc.start()
    try:
        err = _fails(capsys, _run(model))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in err and peak < 2**26, (err, peak)


def test_formats_within_the_bound_render_as_python_formats_them(model, capsys):
    _template(model, "{{ '%5s|%-4d|%.2f|%%|%*d|' % ('a', 3, 1.5, 4, 2) }}{{ '{0:>6}|{1:.3f}|{0:{2}}|'.format('b', 2.5, '7') }}"
                     "{{ '{w:>{n}}|'.format_map({'w': 'c', 'n': 3}) }}{{ '%-3s|' | format('d') }}")
    assert main(_run(model, "--show-prompt", "-t", "0")) == 0
    assert "    a|3   |1.50|%|   2|     b|2.500|b      |  c|d  |" in capsys.readouterr().out


def test_the_size_bound_leaves_room_for_a_long_conversation(model, capsys):
    """The bound counts the messages' own text: a prompt far longer than the context at
    32 characters a token still renders, and --truncate left keeps its end."""
    from checkpoints import CHATML

    _template(model, CHATML)
    long = "I like hot tea. " * 2000  # 32,000 characters; the context is 128 tokens
    assert main(["run", long, "--model", str(model), "--chat", "-n", "2", "--truncate", "left", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["prompt_token_ids"]) < 128


# ---------------------------------------------------------------- tokenizer configs that are broken


@pytest.mark.parametrize("content,expected", [
    (b'{"chat_template": "{{ messages', "cannot read JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "cannot read JSON"),
    (b'["chat_template"]', "expected a JSON object"),
    (b'{"chat_template": 7}', "chat_template is a number"),
    (b'{"chat_template": {"default": "x"}}', "chat_template is an object"),
    (b'{"chat_template": [{"name": "default"}]}', "chat_template[0] is not"),
    (b'{"chat_template": ["{{ messages }}"]}', "chat_template[0] is not"),
])
def test_a_broken_tokenizer_config_is_one_line_naming_it(model, capsys, content, expected):
    (model / "tokenizer_config.json").write_bytes(content)
    err = _fails(capsys, _run(model))
    assert f"{model / 'tokenizer_config.json'}: " in err and expected in err


def test_a_chat_session_refuses_a_broken_tokenizer_config(model, capsys, monkeypatch):
    """Not a plain continuation session, as for a model without a template."""
    (model / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert "tokenizer_config.json: cannot read JSON" in _fails(capsys, ["chat", "--model", str(model), "-n", "2"])


# ---------------------------------------------------------------- named templates


def _transformers_ids(model, name: str | None) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(model))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=name, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _prompt_ids(model, capsys, *flags) -> list[int]:
    assert main(_run(model, "--json", *flags)) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])["prompt_token_ids"]


def test_a_list_of_named_templates_renders_like_transformers(model, capsys):
    _names(model, "default", "tool_use")
    default = _prompt_ids(model, capsys)
    tools = _prompt_ids(model, capsys, "--chat-template", "tool_use")
    assert default == _transformers_ids(model, None)
    assert tools == _transformers_ids(model, "tool_use") != default


def test_template_files_replace_the_configs_as_in_transformers(model, capsys):
    from checkpoints import CHATML

    _template(model, "{{ raise_exception('the config template is not used when files exist') }}")
    (model / "chat_template.jinja").write_text(CHATML)
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text(TOOLS)
    default = _prompt_ids(model, capsys)
    assert default == _transformers_ids(model, None)
    assert _prompt_ids(model, capsys, "--chat-template", "tool_use") == _transformers_ids(model, "tool_use") != default


@pytest.mark.parametrize("content,expected", [(b"{{ messages \xff }}", "not UTF-8 text"), (None, "cannot read the chat template")])
def test_an_unreadable_template_file_is_one_line_naming_it(model, capsys, content, expected):
    path = model / "chat_template.jinja"
    path.write_bytes(content) if content is not None else path.mkdir()
    err = _fails(capsys, _run(model))
    assert f"{path}: {expected}" in err


def test_a_failing_template_file_is_named_by_its_path(model, capsys):
    (model / "additional_chat_templates").mkdir()
    path = model / "additional_chat_templates" / "tool_use.jinja"
    path.write_text("{{ 1 / 0 }}")
    _template(model, "x")
    (model / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert f"chat template {path}, line 1: division by zero" in _fails(capsys, _run(model, "--chat-template", "tool_use"))


def test_without_a_default_the_names_are_listed(model, capsys):
    _names(model, "tool_use", "rag")
    err = _fails(capsys, _run(model), code=2)
    assert "rag, tool_use" in err and "none named default" in err and "--chat-template" in err


def test_chat_template_needs_chat(model, capsys):
    _names(model, "default", "tool_use")
    assert "--chat-template needs --chat" in _fails(capsys, ["run", "Hi", "--model", str(model), "--chat-template", "x"], code=2)


COMMANDS = {  # each command that takes --chat, as a user gives it a prompt
    "run": ["run", "Hi", "-n", "2", "--chat"],
    "beam": ["beam", "Hi", "-n", "2", "--chat"],
    "exact": ["exact", "Hi", "-n", "2", "--max-expansions", "20", "--chat"],
    "probs": ["probs", "Hi", "--chat"],
    "compare": ["compare", "Hi", "-n", "2", "--max-expansions", "20", "--chat"],
    "score": ["score", "a reply", "--chat", "--reply-to", "Hi"],
    "batch": ["batch", "PROMPTS", "-n", "2", "--chat"],
    "chat": ["chat", "-n", "2"],
}


def _argv(model, command: str, *flags) -> list[str]:
    argv = [str(model.parent / "prompts.txt") if a == "PROMPTS" else a for a in COMMANDS[command]]
    return [*argv, "--model", str(model), *flags]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_chat_command_takes_chat_template(model, capsys, monkeypatch, command):
    """An unknown name is a usage error listing the names; a known one is the template
    rendered (here one that refuses, so each command shows it used that one)."""
    _template(model, [{"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
                      {"name": "strict", "template": "{{ raise_exception('the strict template was used') }}"}])
    (model.parent / "prompts.txt").write_text("Hi\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    err = _fails(capsys, _argv(model, command, "--chat-template", "nope"), code=2)
    assert "--chat-template 'nope'" in err and "(it has default, strict)" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code = main(_argv(model, command, "--chat-template", "strict"))
    captured = capsys.readouterr()
    assert "the strict template was used" in captured.err + captured.out
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert code == (0 if command == "chat" else 1)  # a chat session goes on after a turn's error


# ---------------------------------------------------------------- --system


@pytest.mark.parametrize("command", ["run", "batch", "chat"])
def test_invalid_utf8_in_system_is_one_line(model, capsys, monkeypatch, command):
    from checkpoints import CHATML

    _template(model, CHATML)
    (model.parent / "prompts.txt").write_text("Hi\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    err = _fails(capsys, _argv(model, command, "--system", "Be brief \udcff"))  # invalid bytes in argv, as Python gets them
    assert "--system is not valid UTF-8 (byte 9)" in err
    assert ("--errors replace" in err) == (command == "run")  # only a command with --errors offers it


def test_invalid_utf8_in_system_is_replaced_with_errors_replace(model, capsys):
    from checkpoints import CHATML

    _template(model, CHATML)
    assert main(_run(model, "--system", "Be brief \udcff", "--errors", "replace", "--show-prompt", "-t", "0")) == 0
    assert "Be brief \ufffd" in capsys.readouterr().out


# ---------------------------------------------------------------- what transformers' templates use


def test_loop_controls_render_like_transformers(model, capsys):
    """transformers enables ``{% break %}`` and ``{% continue %}``; Mistral's and others'
    templates use them."""
    _template(model, "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                     "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    assert _prompt_ids(model, capsys) == _transformers_ids(model, None)
