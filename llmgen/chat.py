"""Chat prompts: a model's own chat template (Jinja2, rendered the way transformers does).

The template comes from ``tokenizer_config.json`` (``chat_template``), where a Hugging
Face checkpoint or ``llmgen convert`` puts it. Rendering uses Jinja2's immutable
sandbox with ``add_generation_prompt``, so the model sees exactly the text it was
trained to answer. Jinja2 is an optional extra, imported only for ``--chat``.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmgen.errors import LlmgenError

# End-of-turn markers of common templates: generation stops at any that the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


def template_of(model_dir: Path) -> tuple[str, dict]:
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise LlmgenError(f"{model_dir} has no chat template (chat_template in tokenizer_config.json): --chat needs one")
    return template, config


def render(model_dir: Path, prompt: str, system: str | None) -> str:
    """One user turn (after an optional system message), ready for the reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render_messages(model_dir, messages)


def has_template(model_dir: Path) -> bool:
    try:
        template_of(model_dir)
    except LlmgenError:
        return False
    return True


def render_messages(model_dir: Path, messages: list[dict]) -> str:
    """A conversation in the model's template, with the prompt for the assistant's next reply."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LlmgenError("--chat needs Jinja2: pip install 'jinja2>=3' (or, in llmgen's source tree, pip install '.[chat]')") from None
    template, config = template_of(model_dir)

    def raise_exception(message):
        raise LlmgenError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise LlmgenError(f"chat template could not be rendered ({e})") from None


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    ids = (tokenizer.token_to_id(t) for t in END_OF_TURN)
    return tuple(i for i in ids if i is not None)
