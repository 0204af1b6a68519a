"""The chat formats of the families llmgen opens, rendered by ``--chat`` exactly as
transformers' ``apply_chat_template`` renders them (text and token ids), and generation
stopping at each family's end-of-turn token.

The templates are written here in each family's format (Gemma 3's turn markers with the
system prompt folded into the first user turn, Gemma 1/2's refusal of a system role,
Qwen3's thinking switch, Phi-3's role tags), so no model download is needed."""

import json

import pytest

from llmgen.cli import main

GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + (prefix if loop.first else '') }}{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
FAMILIES = {  # template, end-of-turn token, BOS token
    "gemma3": (GEMMA3, "<end_of_turn>", "<bos>"),
    "qwen3": (QWEN3, "<|im_end|>", None),
    "phi3": (PHI3, "<|end|>", None),
}
SPECIALS = ["<bos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from checkpoints import build_gpt2, train_tokenizer

    tok = train_tokenizer()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(["<think>", "</think>"])
    path = tmp_path_factory.mktemp("chat")
    build_gpt2(path, tokenizer=tok, vocab_size=tok.get_vocab_size())
    return path


def _use(path, template, bos):
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": bos, "eos_token": "<|endoftext|>"}))
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=bos, eos_token="<|endoftext|>")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_chat_prompt_is_what_transformers_renders(chat_dir, capsys, family, system):
    from llmgen.chat import render

    template, end, bos = FAMILIES[family]
    reference = _use(chat_dir, template, bos)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi there"}]
    expected = reference.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert render(chat_dir, "Hi there", system, context=128) == expected
    flags = ["--system", system] if system else []
    assert main(["run", "Hi there", "--model", str(chat_dir), "--chat", *flags, "--json", "-n", "2"]) == 0
    ids = reference.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert json.loads(capsys.readouterr().out)["prompt_token_ids"] == list(ids)


def test_qwen3_thinks_by_default_as_in_transformers(chat_dir):
    """transformers leaves ``enable_thinking`` undefined, so Qwen3 thinks; rendering it
    false would add an empty think block."""
    from llmgen.chat import render

    reference = _use(chat_dir, QWEN3, None)
    messages = [{"role": "user", "content": "Hi"}]
    default = reference.apply_chat_template(messages, chat_template=QWEN3, add_generation_prompt=True, tokenize=False)
    off = reference.apply_chat_template(messages, chat_template=QWEN3, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert render(chat_dir, "Hi", None, context=128) == default != off


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_stops_at_the_familys_end_of_turn(chat_dir, family):
    from llmgen import orchestrate
    from llmgen.checkpoint import load_checkpoint

    template, end, bos = FAMILIES[family]
    _use(chat_dir, template, bos)
    ckpt = load_checkpoint(chat_dir, device="cpu")
    assert ckpt.tokenizer.token_to_id(end) in orchestrate.stop_ids(ckpt, chat=True)
    assert ckpt.tokenizer.token_to_id(end) not in orchestrate.stop_ids(ckpt, chat=False)


def test_gemma2_refusing_a_system_prompt_is_a_one_line_error(chat_dir, capsys):
    _use(chat_dir, GEMMA2, "<bos>")
    assert main(["run", "Hi", "--model", str(chat_dir), "--chat", "--system", "Be brief."]) == 1
    err = capsys.readouterr().err
    assert "System role not supported" in err and err.count("\n") == 1
