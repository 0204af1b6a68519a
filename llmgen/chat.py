"""Chat prompts: a model's own chat template (Jinja2), found and rendered the way transformers does.

transformers looks for templates in two places, and so does llmgen. First the files
newer versions write beside the model: ``chat_template.jinja`` (the template named
``default``) and ``additional_chat_templates/NAME.jinja``. Failing those,
``chat_template`` in ``tokenizer_config.json``, where older versions and
``llmgen convert`` put it: one template, or a list of named ones
(``[{"name": "default", "template": ...}, {"name": "tool_use", ...}]``).
``--chat-template NAME`` picks a named template; without it, ``default``.

Rendering (``template_sandbox``, bounded in time and size) passes the conversation with
``add_generation_prompt``, so the model sees exactly the text it was trained to answer.
Jinja2 is an optional extra, imported only for ``--chat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmgen.errors import LlmgenError, ModelError, UsageError

CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# More characters a token than any tokenizer averages: a rendered prompt longer than
# this many per context position cannot be meant for the model.
CHARS_PER_TOKEN = 32

# End-of-turn markers of common templates: generation stops at any that the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class ChatTemplate:
    """One of a model's chat templates: its text, how an error names it (the file, and
    the template's name where the file holds several), and the special tokens it may print."""

    source: str
    origin: str
    special: dict[str, str]

    def render(self, messages: list[dict], context: int) -> str:
        """The conversation in this template, with the prompt for the assistant's next reply.

        The render may build at most ``CHARS_PER_TOKEN`` characters per position of the
        model's ``context``, plus the messages' and the template's own text twice over: a
        long conversation is not the template's fault (``--truncate left`` keeps its end),
        and a template may repeat a message (a system prompt folded into each turn)."""
        from llmgen import template_sandbox

        text = sum(len(m["content"]) for m in messages) + len(self.source)
        variables = {"messages": messages, "add_generation_prompt": True, **self.special}
        try:
            return template_sandbox.render(self.source, variables, CHARS_PER_TOKEN * context + 2 * text)
        except template_sandbox.RenderError as e:
            where = f"{self.origin}, line {e.line}" if e.line else self.origin
            raise LlmgenError(f"{where}: {e.message}") from None


def render(model_dir: Path, prompt: str, system: str | None, *, context: int, name: str | None = None) -> str:
    """One user turn (after an optional system message), ready for the reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return load(model_dir, name).render(messages, context)


def load(model_dir: Path, name: str | None = None) -> ChatTemplate:
    """The template ``name`` (default: ``default``) of the model in ``model_dir``."""
    _require_jinja()
    found = templates(model_dir)
    if not found:
        raise LlmgenError(f"{model_dir} has no chat template (chat_template in {CONFIG}, or {TEMPLATE_FILE}): "
                          "--chat needs one")
    names = ", ".join(sorted(found))
    if name is None and "default" not in found:
        raise UsageError(f"{model_dir} has chat templates {names} and none named default: choose one with --chat-template NAME")
    if name is not None and name not in found:
        raise UsageError(f"--chat-template {name!r}: {model_dir} has no chat template of that name (it has {names})")
    return found["default" if name is None else name]


def has_template(model_dir: Path) -> bool:
    return bool(templates(model_dir))


def templates(model_dir: Path) -> dict[str, ChatTemplate]:
    """Every chat template of the model by name; none, an empty dict. Template files,
    where there are any, replace tokenizer_config.json's, as in transformers. A file
    that cannot be read or a ``chat_template`` of the wrong shape is a ``ModelError``."""
    config = _tokenizer_config(model_dir)
    special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
    sources = _template_files(model_dir) or _config_templates(model_dir / CONFIG, config.get("chat_template"))
    return {name: ChatTemplate(source, origin, special) for name, (source, origin) in sources.items()}


def _require_jinja() -> None:
    try:
        import jinja2.sandbox  # noqa: F401  (template_sandbox is built on it)
    except ImportError:
        raise LlmgenError("--chat needs Jinja2: pip install 'jinja2>=3' (or, in llmgen's source tree, pip install '.[chat]')") from None


def _tokenizer_config(model_dir: Path) -> dict:
    from llmgen.checkpoint import read_json

    path = model_dir / CONFIG
    return read_json(path) if path.exists() else {}


def _template_files(model_dir: Path) -> dict[str, tuple[str, str]]:
    """``chat_template.jinja`` (named default) and ``additional_chat_templates/NAME.jinja``."""
    paths = {"default": model_dir / TEMPLATE_FILE} if (model_dir / TEMPLATE_FILE).exists() else {}
    extra = model_dir / TEMPLATE_DIR
    if extra.is_dir():
        paths.update({path.name.removesuffix(".jinja"): path for path in sorted(extra.glob("*.jinja"))})
    return {name: (_read_template(path), f"chat template {path}") for name, path in paths.items()}


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the chat template ({e.strerror or e})") from None


def _config_templates(path: Path, value) -> dict[str, tuple[str, str]]:
    """``chat_template`` of tokenizer_config.json: one template (named default), or a
    list of ``{"name", "template"}`` objects."""
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        return {"default": (value, f"chat template in {path}")}
    if not isinstance(value, list):
        raise ModelError(f"{path}: chat_template is {_json_kind(value)}; expected a string, or a list of "
                         '{"name": ..., "template": ...} objects')
    found = {}
    for i, entry in enumerate(value):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)):
            raise ModelError(f'{path}: chat_template[{i}] is not a {{"name": ..., "template": ...}} object of two strings')
        found[entry["name"]] = (entry["template"], f"chat template {entry['name']!r} in {path}")
    return found


def _json_kind(value) -> str:
    kinds = {bool: "true or false", int: "a number", float: "a number", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _token_text(token) -> str:
    """A special token's text as tokenizer_config.json gives it: a string, or an object with its content."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    ids = (tokenizer.token_to_id(t) for t in END_OF_TURN)
    return tuple(i for i in ids if i is not None)
