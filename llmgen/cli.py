"""The ``llmgen`` command line: parse, validate, call the engine, render. No math here.

torch and the engine are imported inside the commands, so ``--help`` and usage errors
answer without paying for ``import torch``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import sys
import traceback
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmgen import __version__, config
from llmgen.errors import LlmgenError, OutputClosed, UsageError

app = typer.Typer(
    name="llmgen",
    help="Generate text with decoder-only language models, and see how it was chosen.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    int8 = "int8"
    int4 = "int4"


class StoreDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Truncate(str, Enum):
    none = "none"
    left = "left"


class Errors(str, Enum):
    strict = "strict"
    replace = "replace"


class ColorBy(str, Enum):
    prob = "prob"
    entropy = "entropy"


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"


def _device(value: str) -> str:
    """auto, cpu, cuda or cuda:N, checked while parsing (whether CUDA exists is checked on load)."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory (Hugging Face layout) or pulled model name. Default: $LLMGEN_MODEL, else the embedded model."),
]
DeviceOpt = Annotated[str, typer.Option(callback=_device, help="auto, cpu, cuda or cuda:N. auto picks CUDA when available.")]
DtypeOpt = Annotated[Dtype, typer.Option(help="auto: float32 on CPU, bfloat16 on CUDA. int8: weights quantized at load to 8 bits, one scale per row, and multiplied as integers (CPU only; a quarter of the bytes to stream per token, so faster decode; logits close to, not equal to, float32's). int4: llama.cpp's Q4_0 (4 bits, one scale per 32 weights), an eighth of the bytes, less exact. A model converted with --keep-quant loads as stored.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON records instead of text.")]
LogprobsOpt = Annotated[int, typer.Option("--logprobs", metavar="N", help="Each record's top_logprobs: the N most probable tokens at every step, under the model's unmodified distribution (as OpenAI and vLLM name it).")]
PromptLogprobsOpt = Annotated[bool, typer.Option("--prompt-logprobs", help="Each record's prompt_logprobs: every prompt token's logprob given those before it (the first is null).")]
ColorByOpt = Annotated[Optional[ColorBy], typer.Option("--color-by", show_default=False, help="On a terminal, colour each token by its probability or by the entropy of the distribution it came from; the legend goes to stderr.")]
PromptArg = Annotated[Optional[str], typer.Argument(
    help="Text to continue; '-' or a pipe reads stdin (piped text and PROMPT together are joined).", show_default=False)]
PromptFileOpt = Annotated[Optional[str], typer.Option("--prompt-file", "-f", metavar="PATH", help="Read the prompt from this file.", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed; sample i uses seed + i. Default: random, and reported.")]
EchoOpt = Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")]
ShowTreeOpt = Annotated[bool, typer.Option("--show-tree", help="Draw the search tree.")]
TruncateOpt = Annotated[Truncate, typer.Option("--truncate", help="A prompt too long for the context: 'none' is an error, 'left' keeps its last tokens that fit.")]
ErrorsOpt = Annotated[Errors, typer.Option("--errors", help="Invalid UTF-8 in PROMPT, --system or on stdin: 'strict' is an error, 'replace' substitutes U+FFFD.")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template; stop at its end-of-turn token.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System message for --chat.")]
ChatTemplateOpt = Annotated[Optional[str], typer.Option(
    "--chat-template", metavar="NAME", show_default=False,
    help="Which of the model's chat templates to use, by name (a model may have several, e.g. tool_use). Default: the one named default.")]
TreeTopOpt = Annotated[int, typer.Option("--tree-top", help="Pruned candidates drawn per node in the tree.")]
TreeDepthOpt = Annotated[int, typer.Option("--tree-depth", min=1, help="Steps drawn in full in the tree; below them only the answer's path.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this string appears (repeatable); it is cut from the text.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, show_default=False,
    help="CPU threads. Default: $LLMGEN_THREADS, else the cores no other process is using right now.")]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-sequence token.")]
DraftModelOpt = Annotated[Optional[str], typer.Option(
    "--draft-model", metavar="MODEL", show_default=False,
    help="Speculative decoding: this smaller model (same vocabulary) drafts tokens and the model checks them all in one pass. "
         "The output is the model's own: the same tokens when greedy, the same distribution when sampling.")]
DraftTokensOpt = Annotated[Optional[int], typer.Option(
    "--draft-tokens", metavar="K", min=1, show_default=False,
    help="Speculative decoding: the most tokens drafted per round (one pass of the model). Default: 5.")]
PromptLookupOpt = Annotated[Optional[int], typer.Option(
    "--prompt-lookup", metavar="N", min=1, show_default=False,
    help="Speculative decoding without a second model: draft the tokens that followed the last earlier occurrence "
         "of the text's last N tokens (then N-1, ... 1), in the prompt or the output. Fast on text that repeats itself.")]
ShowSpeculationOpt = Annotated[bool, typer.Option(
    "--show-speculation", help="After generating, show each speculative round: the drafted tokens, the model's p and the draft's q, which were kept, and what replaced a rejected one.")]

SAMPLING_NOTE = ("Each sampling setting comes from its flag, else the model's generation_config.json, "
                 "else the default shown (`llmgen info` lists the model's).")


def _setting_option(setting: config.Setting):
    """The Typer option for one setting of ``config.SETTINGS``: its flag is the field's name."""
    names = [config.flag_name(setting.name)] + ([setting.short] if setting.short else [])
    kind = list[setting.kind] if setting.many else setting.kind
    default = "" if setting.many or setting.default is None else f" Default: {setting.default:g}."
    return Annotated[Optional[kind], typer.Option(*names, help=setting.help + default, show_default=False)]


def with_settings(*names: str):
    """Give a command one option per named setting, declared once in ``config.SETTINGS``.

    The command receives them together as ``settings``: a dict with None for each flag
    not given. They are range-checked here, before any model loads."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "settings"]
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_setting_option(config.BY_NAME[name]))
            for name in names
        ]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            settings = {name: config.normalise(name, kwargs.pop(name)) for name in names}
            config.check_given(settings)
            return command(*args, settings=settings, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)
        sampling = any(name not in config.CONSTRAINT_KINDS for name in names)
        wrapper.__doc__ = inspect.cleandoc(command.__doc__ or "") + ("\n\n" + SAMPLING_NOTE if sampling else "")
        return wrapper

    return decorate


SAMPLING = tuple(s.name for s in config.SETTINGS if s.name != "max_new_tokens")


def _version(value: bool) -> None:
    if value:
        print(f"llmgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    global _debug
    _debug = debug or _debug


def _write_json(record: dict) -> None:
    try:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def _record(prompt, prompt_ids, text, token_ids, logprobs, finish_reason, seed, **extra) -> dict:
    """The JSON record fields every command shares."""
    return {
        "prompt": prompt,
        "prompt_token_ids": prompt_ids,
        "text": text,
        "token_ids": token_ids,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "seed": seed,
        **extra,
    }


@app.command()
@with_settings("max_new_tokens", *SAMPLING)
def run(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    seed: SeedOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Independent continuations to generate.")] = 1,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    echo: EchoOpt = False,
    show_probs: Annotated[bool, typer.Option("--show-probs", help="After generating, show each step's token probability, the entropy it was chosen from, and the best alternatives.")] = False,
    logprobs: LogprobsOpt = 0,
    prompt_logprobs: PromptLogprobsOpt = False,
    color_by: ColorByOpt = None,
    show_tree: Annotated[bool, typer.Option("--show-tree", help="With --num-samples: merge the samples into one prefix tree with counts.")] = False,
    show_prompt: Annotated[bool, typer.Option("--show-prompt", help="Print the exact prompt the model was given (chat template and special tokens included) before the continuation.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="With --json: one JSON event per token as it is chosen, then the records.")] = False,
    separator: Annotated[Optional[str], typer.Option("--separator", help="Written between samples in plain output (backslash escapes read). Default: a line '---'.", show_default=False)] = None,
    draft_model: DraftModelOpt = None,
    draft_tokens: DraftTokensOpt = None,
    prompt_lookup: PromptLookupOpt = None,
    show_speculation: ShowSpeculationOpt = False,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """Continue PROMPT. Sampling settings default to the model's generation_config.json.

    Prints only the continuation, streamed token by token (into a pipe too); --json prints one record per sample.
    """
    from llmgen import orchestrate as orch

    config.GenerationConfig(num_samples=num_samples, stop=tuple(stop or ()), seed=seed)  # checked before loading
    _check_logprobs(logprobs, prompt_logprobs, as_json, "run")
    orch.check_speculation(draft_model, prompt_lookup, draft_tokens, show_speculation)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)

    from llmgen import render
    from llmgen.decoding.greedy_sample import generate
    from llmgen.decoding.speculative import generate_speculative
    from llmgen.decoding.trace import Timings, prefix_tree

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    spec = orch.speculation(ckpt, draft_model, prompt_lookup, draft_tokens, dtype.value)
    gen = orch.generation(ckpt, settings, seed=seed, num_samples=num_samples, stop=tuple(stop or ()), ignore_eos=ignore_eos, chat=chat)
    ids = orch.prompt_ids(ckpt, text, truncate.value, gen.max_new_tokens, chat, system, chat_template)

    out = render.stdout_console()
    shown = _shown_prompt(ckpt, text, ids, echo, show_prompt, chat)
    streaming = not as_json and num_samples == 1 and not show_tree
    on_token = _run_stream(ckpt, out, shown, color_by) if streaming else (_json_events(ckpt) if as_json and stream else None)
    timings = Timings()
    show_probs = show_probs or (logprobs > 0 and not as_json)  # on a terminal, --logprobs N is the step table
    trace_top = max(logprobs, 6 if show_probs else 0)
    decoder = generate if spec is None else functools.partial(generate_speculative, spec=spec)
    samples = decoder(ckpt.model, ids, gen, ckpt.decode, on_token=on_token, trace_top=trace_top, timings=timings)

    if as_json:
        extra = {"model": orch.model_label(model), "settings": config.effective(gen), "timings": timings.record()}
        if prompt_logprobs:
            extra["prompt_logprobs"] = orch.prompt_logprobs(ckpt, ids)
        drafts = {"draft_model": draft_model} if draft_model else {"prompt_lookup": prompt_lookup}
        _run_records(ckpt, text, ids, samples, extra, show_probs, show_tree, logprobs, drafts)
        return
    if streaming:
        on_token.end()
    elif show_tree:
        out.print(render.samples_tree(prefix_tree(samples), ckpt.decode, text), soft_wrap=False)
    else:
        _print_samples(out, samples, shown, _separator(separator))
    _run_tables(ckpt, out, samples, timings, show_probs, show_speculation)


def _run_stream(ckpt, out, shown: str, color_by):
    """Plain output as it is generated: the shown prompt, then each piece of text as a
    token makes it safe (coloured under --color-by, its key on stderr)."""
    from llmgen import render

    stream = render.TextStream(out, color_by.value if color_by else None)
    stream.prompt(shown)
    if color_by and render.is_terminal():
        render.stderr_console().print(render.color_legend(color_by.value))
    return stream


def _run_tables(ckpt, out, samples, timings, show_probs: bool, show_speculation: bool = False) -> None:
    """After the text: the step tables (--show-probs), the speculative rounds
    (--show-speculation), and the summary on a terminal."""
    from llmgen import render, render_speculation

    if show_probs:
        for s in samples:
            out.print(render.step_table(s, ckpt.token_text, out.width), soft_wrap=False)
    if show_speculation:
        for s in samples:
            out.print(render_speculation.speculation_table(s.speculation, ckpt.token_text, len(s.token_ids), out.width), soft_wrap=False)
    if render.is_terminal(sys.stderr):
        render.stderr_console().print(render.run_summary(samples, timings))
        if samples[0].speculation is not None:
            render.stderr_console().print(render_speculation.speculation_summary(samples))


def _check_logprobs(n: int, prompt: bool, as_json: bool, command: str, text_view: bool = True) -> None:
    """--logprobs and --prompt-logprobs fill JSON records; only run shows --logprobs on a
    terminal too (``text_view``)."""
    if n < 0:
        raise UsageError(f"--logprobs must be >= 0, got {n}")
    for flag, given in (("--prompt-logprobs", prompt), ("--logprobs", n and not text_view)):
        if given and not as_json:
            raise UsageError(f"{flag} goes into the JSON records: add --json (llmgen {command})")


def _shown_prompt(ckpt, text: str, ids: list[int], echo: bool, show_prompt: bool, chat: bool) -> str:
    """What precedes the continuation in plain output: nothing; with --echo the prompt
    (a chat prompt on its own line, the reply below it); with --show-prompt the exact
    text the model was given, template and special tokens included."""
    if show_prompt:
        return ckpt.tokenizer.decode(ids, skip_special_tokens=False)
    if echo:
        return text + "\n" if chat else text
    return ""


def _run_records(ckpt, text: str, ids: list[int], samples, extra: dict, show_probs: bool, show_tree: bool,
                 top_logprobs: int = 0, drafts: dict | None = None) -> None:
    """``run --json``: a record per sample (with its steps under --show-probs, its
    top_logprobs under --logprobs N, its speculation, with ``drafts`` saying where they
    came from, when speculative), then the samples' tree under --show-tree."""
    from llmgen import render, render_speculation
    from llmgen.decoding.trace import prefix_tree

    for s in samples:
        steps = {"steps": render.steps_record(s, ckpt.token_text)} if show_probs else {}
        if top_logprobs:
            steps["top_logprobs"] = render.top_logprobs_record([st.alternatives for st in s.steps], ckpt.token_text, top_logprobs)
        if s.speculation is not None:
            steps["speculation"] = {**render_speculation.speculation_record(s.speculation, ckpt.token_text, len(s.token_ids)),
                                    **(drafts or {})}
        _write_json(_record(text, ids, s.text, s.token_ids, s.logprobs, s.finish_reason, s.seed, entropy=s.entropies,
                            **s.constraint_record(), **extra, **steps))
    if show_tree:
        _write_json({"event": "tree", "tree": render.prefix_tree_record(prefix_tree(samples), ckpt.token_text)})


def _print_samples(out, samples, shown: str, between: str) -> None:
    """Plain output of finished samples: a header above each on a terminal when there
    are several, else ``between`` them."""
    from llmgen import render

    for i, s in enumerate(samples):
        if len(samples) > 1 and render.is_terminal():
            out.print(render.sample_header(i, s.seed, s.finish_reason, len(s.token_ids)))
        elif i:
            out.print(between, end="", markup=False, highlight=False)
        out.print(shown + s.text, markup=False, highlight=False)


def _separator(value: str | None) -> str:
    """Written between samples in plain output: ``--separator`` with backslash escapes
    (``\\n``, ``\\t``, ``\\0``) read, else a line of three dashes."""
    if value is None:
        return "---\n"
    import codecs

    return codecs.decode(value, "unicode_escape")


def _json_events(ckpt):
    """``--json --stream``: one event per token as it is chosen, before the records."""

    def on_token(row: int, token: int, logprob: float, entropy: float, delta: str) -> None:
        _write_json({"event": "token", "sample": row, "token_id": token, "token": ckpt.token_text(token),
                     "logprob": logprob, "entropy": entropy, "text": delta})

    return on_token


@app.command()
@with_settings(*config.CONSTRAINT_KINDS)
def beam(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    width: Annotated[int, typer.Option("--width", "-w", help="Beams kept at each step (1 = greedy).")] = 4,
    logprobs: LogprobsOpt = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 20,
    length_penalty: Annotated[float, typer.Option("--length-penalty", help="alpha: a finished hypothesis scores sum(logprobs) / length**alpha.")] = 1.0,
    num_return: Annotated[int, typer.Option("--num-return", help="Hypotheses to return, best first (<= width).")] = 1,
    no_repeat_ngram_size: Annotated[int, typer.Option("--no-repeat-ngram-size", help="Forbid repeating any n-gram of this size; 0 = off.")] = 0,
    early_stopping: Annotated[bool, typer.Option("--early-stopping", help="Stop as soon as `width` hypotheses have finished.")] = False,
    show_tree: ShowTreeOpt = False,
    tree_top: TreeTopOpt = 3,
    tree_depth: TreeDepthOpt = 4,
    echo: EchoOpt = False,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """Beam search: keep the WIDTH most probable partial sequences at every step.

    --show-tree draws every candidate each beam considered: survivors bold, pruned dim, finished hypotheses marked, the winning path green.
    """
    from llmgen import orchestrate as orch
    from llmgen.decoding.beam import BeamConfig, beam_search

    cfg = BeamConfig(width, max_new_tokens, length_penalty, num_return, no_repeat_ngram_size, early_stopping, (), tree_top)
    _check_logprobs(logprobs, False, as_json, "beam", text_view=False)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen import render

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    cfg = replace(cfg, eos_token_ids=orch.stop_ids(ckpt, chat), grammar=orch.constraint(ckpt, settings, chat))
    ids = orch.prompt_ids(ckpt, text, truncate.value, max_new_tokens, chat, system, chat_template)
    result = beam_search(ckpt.model, ids, cfg)
    hyps = result.hypotheses
    if as_json:
        best = hyps[0]
        beams = [
            {"text": ckpt.decode(h.token_ids), "token_ids": h.token_ids, "logprob": h.logprob, "score": h.score,
             "finish_reason": h.finish_reason}
            for h in hyps
        ]
        for b, h in zip(beams, hyps):
            b.update(orch.forced_records(ckpt, ids, h.token_ids, logprobs, cfg.grammar))
        tree = {"tree": render.search_tree_record(result.tree, ckpt.token_text)} if show_tree else {}
        steps = {k: beams[0][k] for k in ("entropy", "top_logprobs", "constraint_mass") if k in beams[0]}
        _write_json(_record(text, ids, beams[0]["text"], best.token_ids, best.logprobs, best.finish_reason, None, **steps,
                            beams=beams, **tree))
        return
    out = render.stdout_console()
    if show_tree:
        out.print(render.search_tree(result.tree, ckpt.token_text, text, f"beam search, width {width}", tree_top, depth=tree_depth), soft_wrap=False)
        out.print(render.tree_legend("beam"), soft_wrap=False)
    for i, h in enumerate(hyps):
        if len(hyps) > 1 or show_tree:
            out.print(render.hypothesis_header(i, h.logprob, h.score, h.finish_reason))
        out.print((text if echo else "") + ckpt.decode(h.token_ids), markup=False, highlight=False)


@app.command()
@with_settings(*config.CONSTRAINT_KINDS)
def exact(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="N: sequences end at EOS or after N tokens.")] = 5,
    max_expansions: Annotated[int, typer.Option("--max-expansions", help="Bound on partial sequences expanded; past it, optimality is not proven.")] = 2000,
    top: Annotated[int, typer.Option("--top", metavar="K", help="The K most probable sequences (K <= 1000), best first, each proven in its rank, as a table with the probability they cover.")] = 1,
    show_tree: ShowTreeOpt = False,
    tree_top: TreeTopOpt = 3,
    tree_depth: TreeDepthOpt = 4,
    echo: EchoOpt = False,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """The provably most probable continuation (ending at EOS or after N tokens).

    Best-first search on cumulative log-probability, bounded by the greedy sequence: reports the nodes expanded against the |V|^N sequences brute force would score. With --top K the search goes on past the first until K are proven; --json then prints one record per sequence, with its rank.
    """
    from llmgen import orchestrate as orch
    from llmgen.decoding.exact import ExactConfig, exact_search

    cfg = ExactConfig(max_new_tokens=max_new_tokens, max_expansions=max_expansions, top=top)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen import render

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    ids = orch.prompt_ids(ckpt, text, truncate.value, max_new_tokens, chat, system, chat_template)
    cfg = replace(cfg, eos_token_ids=orch.stop_ids(ckpt, chat), grammar=orch.constraint(ckpt, settings, chat))
    result = exact_search(ckpt.model, ids, cfg, ckpt.decode)
    continuation = ckpt.decode(result.token_ids)
    if as_json:
        for rank, h in enumerate(result.hypotheses, 1):  # the tree, shared by all, goes with the first
            _write_json(
                _record(text, ids, ckpt.decode(h.token_ids), h.token_ids, h.logprobs, h.finish_reason, None,
                        **orch.forced_records(ckpt, ids, h.token_ids, 0, cfg.grammar),
                        logprob=h.logprob, rank=rank, expanded=result.expanded, proven=h.proven, mass=result.mass,
                        brute_force_log10=round(result.brute_force_log10, 3),
                        **({"tree": render.search_tree_record(result.tree, ckpt.token_text)} if show_tree and rank == 1 else {}))
            )
        return
    out = render.stdout_console()
    if show_tree:
        out.print(render.search_tree(result.tree, ckpt.token_text, text, "exact search", tree_top, bound_all=True, depth=tree_depth), soft_wrap=False)
        out.print(render.tree_legend("exact"), soft_wrap=False)
    if top > 1:
        texts = [(text if echo else "") + ckpt.decode(h.token_ids) for h in result.hypotheses]
        out.print(render.exact_table(result, texts, text, out.width), soft_wrap=False)
    else:
        out.print((text if echo else "") + continuation, markup=False, highlight=False)
    render.stderr_console().print(render.exact_summary(result, max_expansions, top))


@app.command()
@with_settings(*SAMPLING)
def probs(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Follow the chosen token for this many steps, one table each.")] = 1,
    top: Annotated[int, typer.Option("--top", help="Rows per table.")] = 10,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed of the draw that picks each followed token (with --steps). Default: random, and reported.")] = None,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """The next-token distribution as a table: model probability, after each sampler stage and renormalisation, and which stage removed each token.
    """
    from llmgen import orchestrate as orch
    from llmgen.decoding.probs import follow
    from llmgen.decoding.trace import constraint_mass

    if steps < 1 or top < 1:
        raise UsageError("--steps and --top must be >= 1")
    config.check_seed(seed)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen import render

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    gen = orch.generation(ckpt, settings, seed=seed, chat=chat)
    ids = orch.prompt_ids(ckpt, text, truncate.value, steps, chat, system, chat_template)
    dists = follow(ckpt.model, ids, gen.sampling, steps, gen.seed, gen.stop_token_ids, gen.tokens)
    if as_json:
        for d in dists:
            order = sorted(range(len(d.raw)), key=lambda i: -d.raw[i])[:top]
            _write_json({
                "prompt": text, "prompt_token_ids": ids, "step": d.step, "token_id": d.chosen, "seed": gen.seed,
                "samplers": d.order,
                **({"constraint_mass": constraint_mass([d.constraint_kept])} if d.constraint_kept is not None else {}),
                "candidates": [
                    {"token_id": t, "token": ckpt.token_text(t), "prob": d.raw[t], "tempered_prob": d.tempered[t],
                     "final_prob": d.final[t], "removed_by": d.removed_by[t], "changed_by": d.changed_by.get(t, [])}
                    for t in order
                ],
            })
        return
    out = render.stdout_console()
    context = text
    shown = {t for d in dists for t in sorted(range(len(d.raw)), key=lambda i: -d.raw[i])[:top] + [d.chosen]}
    token_width = max(len(render.token_label(ckpt.token_text(t))) + 2 for t in shown)
    origin = orch.settings_origin(ckpt, settings, gen) + (f" · seed {gen.seed}" if gen.seed is not None else "")
    for d in dists:
        title = f"after {render.prompt_label(context)}"
        out.print(render.distribution_table(d, ckpt.token_text, top, title, out.width, token_width, origin), soft_wrap=False)
        context += ckpt.token_text(d.chosen)


@app.command()
@with_settings(*SAMPLING)
def compare(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per continuation.")] = 8,
    width: Annotated[int, typer.Option("--width", "-w", help="Beam width.")] = 4,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed of the sampled row. Default: random, and reported.")] = None,
    max_expansions: Annotated[int, typer.Option("--max-expansions", help="Budget for the exact search.")] = 2000,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """Greedy, beam, exact and sampled continuations side by side, each with its total log-probability: see for yourself that greedy is not always the most probable.
    """
    from llmgen import orchestrate as orch

    config.check("max_new_tokens", max_new_tokens)
    config.check_seed(seed)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen import render

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    ids = orch.prompt_ids(ckpt, text, truncate.value, max_new_tokens, chat, system, chat_template)
    rows = orch.compare(ckpt, ids, {**settings, "max_new_tokens": max_new_tokens}, seed, width, max_expansions, chat)
    if as_json:
        for r in rows:
            _write_json({"prompt": text, "prompt_token_ids": ids, **r, **orch.forced_records(ckpt, ids, r["token_ids"], 0)})
        return
    out = render.stdout_console()
    out.print(render.compare_table(rows, out.width), soft_wrap=False)


# score's own options
StrideOpt = Annotated[Optional[int], typer.Option(
    "--stride", metavar="S", show_default=False,
    help="A text longer than the context C is scored in windows of C tokens that start every S tokens; each token "
         "is scored once, with at least C - S tokens before it after the first window. Default: C/2.")]
KlReferenceOpt = Annotated[Optional[str], typer.Option(
    "--kl-reference", metavar="MODEL", show_default=False,
    help="Compare with this model (same tokenizer) token by token: KL(reference || model) mean, 99th percentile "
         "and max, how often both models' most probable token agree, and both perplexities.")]
ReferenceDtypeOpt = Annotated[Dtype, typer.Option(
    "--reference-dtype", help="The --kl-reference model's dtype: float32 whatever --dtype says, so that "
                              "--dtype bfloat16 --kl-reference the same model measures what bfloat16 costs.")]
SamplerOpt = Annotated[bool, typer.Option(
    "--sampler", help="Score under the sampler `llmgen run` would use with these settings (any sampling flag implies "
                      "it): each token's probability after every stage, and the stage that removed it when that is 0.")]
SamplerSeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", "-s", help="With the sampler: the seed of its random stages (XTC), as run's --seed. Default: random, "
                         "and reported.", show_default=False)]


@app.command()
@with_settings(*SAMPLING)
def score(
    text: Annotated[Optional[str], typer.Argument(help="Text to score; '-' or a pipe reads stdin.", show_default=False)] = None,
    prompt_file: Annotated[Optional[str], typer.Option(
        "--file", "--prompt-file", "-f", metavar="PATH", help="Read TEXT from this file ('-' is stdin).", show_default=False)] = None,
    model: ModelOpt = None,
    stride: StrideOpt = None,
    kl_reference: KlReferenceOpt = None,
    reference_dtype: ReferenceDtypeOpt = Dtype.float32,
    sampler: SamplerOpt = False,
    seed: SamplerSeedOpt = None,
    errors: ErrorsOpt = Errors.strict,
    chat: Annotated[bool, typer.Option("--chat", help="Score TEXT as the assistant's reply to --reply-to, in the model's chat template.")] = False,
    reply_to: Annotated[Optional[str], typer.Option("--reply-to", help="With --chat: the user's message TEXT answers.", show_default=False)] = None,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """Teacher-forced log-probability of every token of TEXT, and its perplexity.

    The first token is scored after the model's BOS token when it has one; otherwise it has no context and its logprob is null. A text longer than the context is scored in sliding windows (--stride). With --chat, TEXT is scored as the assistant's reply to --reply-to: each token given the rendered conversation and the reply before it.

    Without sampling flags this is the model's own distribution, and generation_config.json plays no part. With any of them (or --sampler), it asks whether `llmgen run` with the same flags could have written TEXT: each token's probability under the sampler's final distribution, the chain fed the text so far, and the stage that removed it; the settings layer over generation_config.json as run's do.
    """
    from llmgen import orchestrate as orch

    config.check_seed(seed)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    if chat != (reply_to is not None):
        raise UsageError("--chat and --reply-to go together: the reply TEXT is scored after the user's message")
    if stride is not None and stride < 1:
        raise UsageError("--stride must be at least 1")
    judged = sampler or any(v is not None for v in settings.values())
    if kl_reference is not None and (judged or chat):
        raise UsageError("--kl-reference compares the two models' own distributions: give it without --chat, --sampler or sampling flags")
    content = orch.read_prompt(text, errors.value, prompt_file)

    from llmgen import render
    from llmgen.sampler_score import sampler_score
    from llmgen.scoring import check_same_tokenizer, divergence
    from llmgen.scoring import score as score_text

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    context = orch.prompt_ids(ckpt, reply_to, chat=True, system=system, template=chat_template) if chat else None
    ids = ckpt.encode(content, special=not chat)
    prompt = {"prompt": reply_to, "prompt_token_ids": context} if chat else {}
    with render.ScoreProgress() as bar:
        if kl_reference is not None:
            reference = orch.load(kl_reference, device, reference_dtype.value, threads=threads)
            check_same_tokenizer(ckpt, reference)
            result = divergence(ckpt.model, reference.model, ids, ckpt.bos_token_id, stride, bar.update)
            extra = {"model": orch.model_label(model), "reference": kl_reference}
        elif judged:
            gen = orch.generation(ckpt, settings, seed=seed, chat=chat)
            result = sampler_score(ckpt.model, ids, ckpt.bos_token_id, gen.sampling, gen.seed, gen.stop_token_ids, gen.tokens,
                                   context, stride, bar.update)
            extra = {"settings": {k: v for k, v in config.effective(gen).items() if k != "max_new_tokens"}}
        else:
            result = score_text(ckpt.model, ids, ckpt.bos_token_id, context, stride, bar.update)
            extra = {}
    if as_json:
        _write_json({**prompt, "text": content, **result.record(), **extra})
        return
    out = render.stdout_console()
    if kl_reference is not None:
        labels = [f"{name} ({str(c.dtype).removeprefix('torch.')})" for name, c in ((orch.model_label(model), ckpt), (kl_reference, reference))]
        out.print(render.divergence_table(result, *labels), soft_wrap=False)
        return
    origin = orch.settings_origin(ckpt, settings, gen) + (f" · seed {gen.seed}" if gen.seed is not None else "") if judged else ""
    _print_score(out, ckpt, ids, result, judged, origin)


def _print_score(out, ckpt, ids: list[int], result, judged: bool, origin: str) -> None:
    """score's text view: the token table (a summary alone past LONG_TEXT tokens), and
    under a sampler its verdict and, for a long text, the impossible tokens."""
    from llmgen import render

    scored = result.score if judged else result
    long = scored.n_tokens > render.LONG_TEXT
    if judged and not long:
        out.print(render.sampler_score_table([ckpt.token_text(t) for t in ids], result, origin, out.width), soft_wrap=False)
    elif not long:
        out.print(render.score_table([ckpt.token_text(t) for t in ids], ids, result.logprobs, result.perplexity), soft_wrap=False)
    if long or scored.windows > 1 or judged:
        out.print(render.score_summary(scored))
    if judged:
        out.print(render.sampler_verdict(result, origin if long else ""))
    if judged and long and result.impossible:
        impossible = {i: ckpt.token_text(t) for i, t in enumerate(ids) if result.probs[i] == 0}
        out.print(render.impossible_tokens(impossible, result), end="")


CHAT_HELP = """commands:
  /set NAME VALUE   change a sampling setting (e.g. /set temperature 0.7, /set top-p 0.9)
  /system TEXT      set the system message (from the next reply on)
  /retry            generate the last reply again
  /undo             forget the last exchange
  /probs            the last reply step by step: each token's probability and the alternatives
  /tree             a beam search (width 2) over the start of the last reply
  /save FILE        write the transcript as JSONL
  /load FILE        read a transcript written by /save
  /help             this list
  /exit             leave (or Ctrl-D); Ctrl-C stops a reply and keeps the session"""


@app.command()
@with_settings("max_new_tokens", *SAMPLING)
def chat(
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.")] = None,
    chat_template: ChatTemplateOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed of the first reply; reply i uses seed + i. Default: random, and reported.")] = None,
    color_by: ColorByOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    settings: dict | None = None,
) -> None:
    """A conversation with a chat model: replies stream in, the KV cache carries over between turns (a turn prefills only its new tokens), and /commands change settings, retry, undo, show probabilities and trees, save and load.

    On a terminal: line editing and history; when stdin is not a terminal, one user turn per line. A model without a chat template gives a plain continuation session.
    """
    from llmgen import orchestrate as orch
    from llmgen import render
    from llmgen.chat_session import ChatSession

    config.check_seed(seed)
    system = orch.check_chat(True, system, chat_template, errors=None)
    ckpt = orch.load(model, device, dtype.value, threads=threads)
    interactive = sys.stdin.isatty()
    session = ChatSession(ckpt, settings, system, seed if seed is not None else orch.draw_seed(), template=chat_template)
    err, out = render.stderr_console(), render.stdout_console()
    if interactive:
        _readline_history()
        err.print(render.chat_banner(orch.model_label(model), session.templated, session.seed))
        if color_by:
            err.print(render.color_legend(color_by.value))
    color = color_by.value if color_by else None
    while True:
        try:
            line = _read_turn(interactive)
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stdout.write("\n")
            continue
        if line is None:
            break
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if _chat_command(session, line, out, err, color) == "exit":
                    break
                continue
            _chat_reply(session, lambda on_token: session.reply(line, on_token), out, err, interactive, color)
        except LlmgenError as e:
            err.print(f"llmgen: {e}", markup=False, highlight=False)


def _read_turn(interactive: bool) -> str | None:
    """The next line the user typed (None at the end: Ctrl-D, or the end of piped input)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _readline_history() -> None:
    """Line editing and a history kept between sessions, where Python has readline."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    from llmgen.models_cache import home

    path = home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def _chat_reply(session, answer, out, err, interactive: bool, color_by: str | None = None) -> None:
    """Stream one reply (coloured by ``color_by`` on a terminal); Ctrl-C stops it and
    keeps the session (and the words so far)."""
    from llmgen import render

    stream = render.TextStream(out, color_by)
    try:
        sample = answer(stream)
    except KeyboardInterrupt:
        stream.end()
        err.print(render.chat_interrupted())
        return
    stream.end()
    if interactive:
        err.print(render.chat_turn_summary(session.stats[-1], sample))


def _chat_command(session, line: str, out, err, color_by: str | None = None) -> str | None:
    from llmgen import render

    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit"):
        return "exit"
    if name == "help":
        out.print(CHAT_HELP, markup=False, highlight=False)
    elif name == "set":
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise LlmgenError("usage: /set NAME VALUE")
        session.set(key, value.strip())
        err.print(f"{key} = {value.strip()}", markup=False, highlight=False)
    elif name == "system":
        session.system = arg or None
        err.print("system message set" if arg else "system message cleared")
    elif name == "retry":
        _chat_reply(session, session.retry, out, err, sys.stdin.isatty(), color_by)
    elif name == "undo":
        session.undo()
        err.print("forgot the last exchange")
    elif name == "probs":
        if session.last is None:
            raise LlmgenError("no reply yet")
        out.print(render.step_table(session.last, session.ckpt.token_text, out.width), soft_wrap=False)
    elif name == "tree":
        _chat_tree(session, out)
    elif name in ("save", "load"):
        if not arg:
            raise LlmgenError(f"usage: /{name} FILE")
        getattr(session, name)(Path(arg).expanduser())
        err.print(f"{'saved to' if name == 'save' else 'loaded'} {arg}", markup=False, highlight=False)
    else:
        raise LlmgenError(f"unknown command /{name} (/help lists them)")
    return None


def _chat_tree(session, out) -> None:
    """A width-2 beam search from the last reply's prompt, over as many tokens as the
    reply had (at most 8): which continuations competed with it."""
    from llmgen import orchestrate as orch
    from llmgen import render
    from llmgen.decoding.beam import BeamConfig, beam_search

    ids = session.last_turn_prompt()
    n = max(1, min(8, len(session.last.token_ids))) if session.last is not None else 8
    cfg = BeamConfig(width=2, max_new_tokens=n, length_penalty=1.0, eos_token_ids=orch.stop_ids(session.ckpt, session.templated))
    result = beam_search(session.ckpt.model, ids, cfg)
    out.print(render.search_tree(result.tree, session.ckpt.token_text, "(the conversation)", "beam search, width 2", 3),
              soft_wrap=False)
    out.print(render.tree_legend("beam"), soft_wrap=False)


@app.command()
def info(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
) -> None:
    """Describe a model: architecture, parameters, vocabulary, context, dtype, device, files and where it came from."""
    from llmgen import orchestrate as orch
    from llmgen import render
    from llmgen.checkpoint import describe

    facts = describe(orch.load(model, device, dtype.value))
    if as_json:
        _write_json(facts)
        return
    if render.is_terminal():
        render.stdout_console().print(render.info_table(facts))
    else:
        sys.stdout.write(render.info_lines(facts))


def _ray_address(value: str | None) -> str | None:
    """--ray's value, checked while parsing (before anything loads)."""
    from llmgen.batch_ray import check_address

    return None if value is None else check_address(value)


@app.command()
@with_settings("max_new_tokens", *SAMPLING)
def batch(
    ctx: typer.Context,
    input_path: Annotated[Optional[str], typer.Argument(metavar="INPUT", show_default=False, help="Prompts: a text file (one per line) or JSONL (.jsonl) of {prompt, id?, seed?, and any sampling setting by name, e.g. top_p}; '-' or no INPUT reads stdin.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL to append to (resumable). Default: stdout.")] = None,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated together.")] = 16,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Base seed: a record without its own seed uses seed + index.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable), for every record.")] = None,
    ignore_eos: IgnoreEosOpt = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: only records whose index is I mod N.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT instead of resuming it.")] = False,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Write an error record for a malformed input record and go on.")] = False,
    ordered: Annotated[bool, typer.Option("--ordered", help="Write records in input order (each waits for the ones before it).")] = False,
    logprobs: LogprobsOpt = 0,
    prompt_logprobs: PromptLogprobsOpt = False,
    truncate: TruncateOpt = Truncate.none,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]", callback=_ray_address, show_default=False,
        help="Generate on Ray workers (needs the ray extra); put it after INPUT. Alone (or 'local'): a Ray instance "
             "started on this machine; 'auto': the cluster $RAY_ADDRESS names, or the one `ray start` began here; "
             "ray://HOST:PORT: that cluster. Records, resume and seeds are those of a local run.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, show_default=False,
        help="With --ray: model replicas (Ray actors), each with --threads CPU threads (default 1) or, with --device "
             "cuda, a GPU. Default: as many as the cluster's CPUs (GPUs) hold.")] = None,
    ship_model: Annotated[bool, typer.Option(
        "--ship-model", help="With --ray: send the model's files to the workers through Ray's object store, "
                             "instead of each node reading the model directory from the same path.")] = False,
    settings: dict | None = None,
) -> None:
    """Generate for every prompt of INPUT: one JSONL record each, with `index` and the fields of run --json.

    Re-running the same command resumes: records already in OUTPUT are skipped, a torn last line is repaired. Records come out in batch order; each carries its `index`.
    """
    from llmgen import batch as batching
    from llmgen import orchestrate as orch
    from llmgen.batch_output import Output

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    _check_logprobs(logprobs, prompt_logprobs, True, "batch")
    if input_path is None and sys.stdin.isatty():
        raise UsageError("missing INPUT (a file of prompts, or pipe them in)")
    input_path = input_path or "-"
    config.GenerationConfig(stop=tuple(stop or ()), seed=seed)  # checked before loading
    system = orch.check_chat(chat, system, chat_template, errors=None)
    options = orch.BatchOptions(settings, seed, tuple(stop or ()), ignore_eos, truncate.value, chat, system, chat_template)
    shard_i, shard_n = batching.parse_shard(shard)
    _ray_connect(ctx, ray, workers, ship_model, device)  # no Ray, or nothing at the address: stop before reading INPUT
    records = batching.read_input(input_path)
    mine = [r for r in records if r.index % shard_n == shard_i]
    _stop_on_invalid(input_path, mine, skip_invalid)
    # locked, checked and repaired now, before the model loads
    out_file = Output(output, [r.prompt for r in records], overwrite) if output else None
    done = out_file.done if out_file else {}
    todo = [r for r in mine if r.index not in done]
    sink = batching.Sink(out_file, [r.index for r in todo] if ordered else None)

    from llmgen import render

    if not todo:
        render.stderr_console().print(render.batch_summary(len(mine), len(mine) - len(todo), 0, 0, 0.0, output))
        sink.close()
        return

    # under --ray the workers hold the weights; the driver tokenizes and resolves settings
    ckpt = orch.load(model, device, dtype.value, threads=threads) if ray is None else orch.load_vocabulary(model)
    base = batching.base_seed(seed, done, records, todo, orch.draw_seed)
    if done:
        batching.check_resume(done, orch.batch_jobs(ckpt, [r for r in mine if r.index in done], options, base),
                              orch.model_label(model), output)
    jobs = orch.batch_jobs(ckpt, todo, options, base)
    _stop_on_invalid(input_path, todo, skip_invalid)
    errors = [batching.error_record(r) for r in todo if r.error is not None]
    if errors:
        sink.write(errors)
    batches, extras = batching.plan(jobs, batch_size), batching.Extras(logprobs, prompt_logprobs)
    with render.BatchProgress(len(todo), already=len(errors), workers=ray is not None) as progress:  # after loading
        if ray is None:
            batching.run_batches(ckpt, batches, sink, progress.update, orch.model_label(model), extras)
        else:
            from llmgen import batch_ray

            spec = batch_ray.WorkerSpec(str(ckpt.path.resolve()), ship_model, device, dtype.value, threads, workers,
                                        orch.model_label(model), extras)
            batch_ray.generate(spec, batches, sink, progress)
    sink.close()
    render.stderr_console().print(render.batch_summary(
        len(mine), len(mine) - len(todo), len(todo), progress.tokens, progress.seconds(), output, errors=len(errors)))


def _ray_connect(ctx: typer.Context, ray: str | None, workers: int | None, ship_model: bool, device: str) -> None:
    """--ray's flags checked, and the cluster joined (or a local one started) until the
    command ends (a local instance stops then: ``main`` leaves by ``os._exit``, past Ray's
    own exit hook)."""
    if ray is None:
        for flag, given in (("--workers", workers is not None), ("--ship-model", ship_model)):
            if given:
                raise UsageError(f"{flag} needs --ray")
        return
    from llmgen import batch_ray

    batch_ray.check_device(device)
    if batch_ray.connect(ray):
        ctx.call_on_close(batch_ray.disconnect)


def _stop_on_invalid(input_path: str, records, skip_invalid: bool) -> None:
    bad = next((r for r in records if r.error is not None), None)
    if bad is not None and not skip_invalid:
        raise LlmgenError(f"{input_path}:{bad.line}: {bad.error} (nothing generated; --skip-invalid writes an error record and goes on)")


KeepQuantOpt = Annotated[bool, typer.Option(
    "--keep-quant", help="Keep the GGUF's Q4_0 matrices as they are (4-bit blocks, bit for bit) and store each other "
                         "matrix it holds quantized (Q8_0, Q4_1, K-quants) as int8 rows with one scale each: half a byte "
                         "or a byte a weight instead of --dtype's two or four. Such a model loads with its matrices as "
                         "stored (the int4 and int8 kernels) on CPU unless another --dtype is given.")]


@app.command()
def convert(
    gguf_file: Annotated[Path, typer.Argument(metavar="MODEL.gguf", help="GGUF file to convert.")],
    output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR", help="Directory to write (Hugging Face layout).")],
    dtype: Annotated[StoreDtype, typer.Option("--dtype", help="How the weights are stored.")] = StoreDtype.bfloat16,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT_DIR if it is not empty.")] = False,
    keep_quant: KeepQuantOpt = False,
) -> None:
    """Convert a GGUF file (llama.cpp) into a safetensors model directory that --model loads: weights dequantized (or with --keep-quant kept quantized: Q4_0 as its own blocks, other formats as int8 rows), config, tokenizer, generation config and chat template rebuilt from the GGUF metadata."""
    from llmgen import render
    from llmgen.checkpoint import DTYPES
    from llmgen.convert import convert_into, tensor_count

    if not gguf_file.is_file():
        raise LlmgenError(f"{gguf_file}: file not found")
    with render.TaskProgress("convert", tensor_count(gguf_file)) as progress:
        cfg = convert_into(gguf_file, output_dir, DTYPES[dtype.value], progress.advance, replace=force, keep_quant=keep_quant)
    render.stderr_console().print(render.converted_summary(cfg, output_dir))


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A model from the catalogue (see `llmgen list --available`).")],
    dtype: Annotated[StoreDtype, typer.Option("--dtype", help="How the weights are stored.")] = StoreDtype.bfloat16,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert it again even if it is in the cache.")] = False,
    keep_quant: KeepQuantOpt = False,
) -> None:
    """Fetch a model by name into the cache ($LLMGEN_HOME, else the XDG cache) and convert it; then --model NAME works."""
    from llmgen import render
    from llmgen.checkpoint import DTYPES
    from llmgen.models_cache import catalog, is_pulled, model_path
    from llmgen.models_cache import pull as pull_model

    if name in catalog() and is_pulled(name) and not force:
        render.stderr_console().print(render.already_pulled(name, model_path(name)))
        return
    entry = catalog().get(name, {})
    err = render.stderr_console()
    if entry.get("download_bytes"):
        err.print(render.download_notice(name, entry))
    progress = render.TaskProgress(f"convert {name}", None)

    def converting(tensors: int) -> None:  # the bar starts once pip's own download bar is done
        progress.set_total(tensors)
        progress.__enter__()

    try:
        path = pull_model(name, DTYPES[dtype.value], progress.advance, converting,
                          lambda size, seconds: err.print(render.downloaded(size, seconds)), render.is_terminal(sys.stderr),
                          keep_quant)
    finally:
        progress.__exit__(None, None, None)
    err.print(render.pulled_summary(name, path))


@app.command()
def rm(name: Annotated[str, typer.Argument(help="A pulled model (see `llmgen list`).")]) -> None:
    """Remove a pulled model from the cache."""
    from llmgen import render
    from llmgen.models_cache import remove

    path = remove(name)
    render.stderr_console().print(render.removed_summary(name, path))


@app.command(name="list")
def list_models(
    available: Annotated[bool, typer.Option("--available", help="Show the catalogue of pullable models instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The models you can run: the embedded one and those in the cache, with size and source (or, with --available, the ones `pull` can fetch, with their download size)."""
    from llmgen import render
    from llmgen.models_cache import cached, catalog, embedded_row, is_pulled

    if available:
        rows = [{"name": k, **v, "pulled": is_pulled(k)} for k, v in sorted(catalog().items())]
    else:
        rows = [r for r in [embedded_row()] if r] + cached()
    if as_json:
        for row in rows:
            _write_json(row)
        return
    render.stdout_console().print(render.models_table(rows, available), soft_wrap=False)


@app.command()
def train(
    text_files: Annotated[Optional[list[Path]], typer.Argument(help="Plain-text training files (UTF-8).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")] = Path("model"),
    preset: Annotated[Preset, typer.Option(help="Size and schedule to start from.")] = Preset.tiny,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per step.")] = None,
    context: Annotated[Optional[int], typer.Option(help="Tokens per training sequence (and the model's context).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (after warm-up; cosine decay to 10%).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="BPE vocabulary size.")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Transformer blocks.")] = None,
    dim: Annotated[Optional[int], typer.Option(help="Embedding width.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads.")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="Autocast matmuls to bfloat16.")] = None,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed for init, split and batches.")] = 0,
    init: Annotated[Optional[Path], typer.Option(help="Fine-tune this checkpoint instead of training from scratch.")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, completion} to fine-tune on (with --init).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --output from its newest save; a save found damaged is skipped, with a warning, for the one before it (the weights come out the same).")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a GPT-2 model on TEXT_FILES (tokenizer too), or fine-tune one with --init and --pairs.

    Writes an ordinary checkpoint directory that --model loads, plus training.json (config, data hashes, losses). Progress goes to stderr.
    """
    from llmgen import train as training

    overrides = {
        "steps": steps, "batch_size": batch_size, "context": context, "lr": lr, "vocab_size": vocab_size,
        "n_layer": layers, "n_embd": dim, "n_head": heads, "bf16": bf16,
    }
    cfg = replace(training.PRESETS[preset.value], seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if (init is None) != (pairs is None):
        raise UsageError("--init and --pairs go together (fine-tuning); give both or neither")
    if init is None and not text_files:
        raise UsageError("give TEXT_FILES to train on, or --init DIR --pairs FILE to fine-tune")
    done = training.finished(output)
    if done is not None:
        if not resume:
            raise LlmgenError(f"{output} holds a finished model ({done['steps']} steps): choose another --output")
        sys.stderr.write(f"llmgen: {output} is already trained ({done['steps']} of {done['config']['steps']} steps); nothing to resume\n")
        training.tidy_finished(output)
        return
    if (output / training.STATE_DIR).exists() and not resume:
        raise LlmgenError(f"{output} holds an earlier run: pass --resume to continue it, or choose another --output")

    from llmgen import render
    from llmgen import threads as cpu_threads
    from llmgen.checkpoint import resolve_device

    cpu_threads.use(threads)
    torch_device = resolve_device(device)
    if init is None:  # fine-tuning's model size comes from --init, not from these flags
        training.check_fits(cfg, torch_device)
    with render.TrainingProgress(cfg.steps) as progress:
        if init is not None:
            result = training.finetune(init, pairs, output, cfg, torch_device, resume, progress.update, on_warning=_train_warning)
        else:
            result = training.pretrain(list(text_files), output, cfg, torch_device, resume, progress.update, on_warning=_train_warning)
    render.stderr_console().print(render.training_summary(result.record, output))


def _train_warning(message: str) -> None:
    sys.stderr.write(f"llmgen: warning: {message}\n")


@app.command()
def lens(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    position: Annotated[int, typer.Option("--position", help="Which prompt token to read at, counted from 1; negative counts from the end.")] = -1,
    top: Annotated[int, typer.Option("--top", help="Best tokens shown per layer.")] = 5,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
) -> None:
    """The logit lens: each layer's residual stream, put through the final norm and the LM head, read as a next-token distribution.

    Layer 0 is the embeddings; the last layer's row is the model's own next-token distribution. Shows where in the network the answer forms.
    """
    from llmgen import orchestrate as orch

    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    if position == 0:
        raise UsageError("--position counts from 1 (or from -1 at the end); 0 names no token")
    system = orch.check_chat(chat, system, chat_template, errors.value)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen import render
    from llmgen.lens import logit_lens

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    ids = orch.prompt_ids(ckpt, text, "none", 1, chat, system, chat_template)
    result = logit_lens(ckpt.model, ids, position - 1 if position > 0 else position, top)
    if as_json:
        _write_json({"prompt": text, "prompt_token_ids": ids, "model": orch.model_label(model), **render.lens_record(result, ckpt.token_text)})
        return
    out = render.stdout_console()
    out.print(render.lens_table(result, ckpt.token_text, [ckpt.token_text(t) for t in ids], out.width), soft_wrap=False)


ScriptOpt = Annotated[Optional[str], typer.Option(
    "--script", metavar="ACTIONS", show_default=False,
    help="Run these actions without the app, separated by ';': take 'TEXT' | take id N, back [N], greedy N, sample N, "
         "beam WIDTH N, exact N, set NAME VALUE, show (the path and candidates), tree, export PATH (.json, .svg, "
         ".html). Prints each show and tree, then the path's text (--json: a record for each, then the session's).")]


@app.command()
@with_settings(*SAMPLING)
def explore(
    prompt: PromptArg = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed of the sampler's random stages; sample i of the session (s) draws with seed + i. Default: random, and reported.")] = None,
    script: ScriptOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Rows of each table that --script's show prints.")] = 10,
    truncate: TruncateOpt = Truncate.none,
    errors: ErrorsOpt = Errors.strict,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    chat_template: ChatTemplateOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    as_json: JsonOpt = False,
    settings: dict | None = None,
) -> None:
    """Walk the tree of possible continuations yourself, in a full-screen app: each candidate next token with its probability before and after every sampler stage; take one, go back, try another branch, extend greedily, sample, or graft a beam or exact search onto the tree.

    Keys: Enter take, Backspace back, g greedy, s sample, b beam, x exact, t/k/p/m/r settings, : any action, / filter, e export, ? help, q quit. Needs Textual (pip install '.[tui]'); --script runs the same actions without it.
    """
    from llmgen import orchestrate as orch

    config.check_seed(seed)
    system = orch.check_chat(chat, system, chat_template, errors.value)
    if script is None:
        _check_app(as_json)
        from llmgen.explore.app import ExploreApp
    else:
        from llmgen.explore.script import parse

        actions = parse(script)
    text = orch.read_prompt(prompt, errors.value, prompt_file)
    from llmgen.explore.session import Session

    ckpt = orch.load(model, device, dtype.value, threads=threads)
    ids = orch.prompt_ids(ckpt, text, truncate.value, 1, chat, system, chat_template)
    session = Session(ckpt, ids, settings, seed, chat, prompt=text)
    if script is None:
        ExploreApp(session).run()
        return
    _explore_script(session, actions, top, as_json)


def _check_app(as_json: bool) -> None:
    """The app's preconditions, before any model loads: Textual, and a terminal."""
    import importlib.util

    if as_json:
        raise UsageError("--json goes with --script (the app draws on the terminal)")
    if importlib.util.find_spec("textual") is None:
        raise LlmgenError("llmgen explore needs Textual: pip install 'textual>=8' (or, in llmgen's source tree, "
                          "pip install '.[tui]'); --script runs without it")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("llmgen explore opens a full-screen app and needs a terminal: use --script for headless use")


def _explore_script(session, actions, top: int, as_json: bool) -> None:
    """--script: each action in turn; show prints the path and the candidates (a JSON
    record under --json), export writes its file; then the path's text, or the record."""
    from llmgen import render, render_explore
    from llmgen.explore.script import apply

    out = render.stdout_console()
    for i, action in enumerate(actions, 1):
        try:
            if action.name == "export":
                render_explore.export(session, action.args[0])
            elif action.name == "show":
                _explore_show(session, out, top, as_json)
            elif action.name == "tree":
                _explore_tree(session, out, as_json)
            else:
                apply(session, action)
        except LlmgenError as e:
            where = UsageError if isinstance(e, UsageError) else LlmgenError  # keeps the exit code
            raise where(f"--script action {i} ({action.source}): {e}") from None
    if as_json:
        _write_json(session.record())
    else:
        out.print(session.text(), markup=False, highlight=False)


def _explore_tree(session, out, as_json: bool) -> None:
    from llmgen import render_explore

    if as_json:
        _write_json({"event": "tree", "prompt": session.prompt, "tree": session.record()["tree"]})
        return
    out.print(render_explore.explore_tree(session), soft_wrap=False)
    out.print(render_explore.tree_legend(), soft_wrap=False)


def _explore_show(session, out, top: int, as_json: bool) -> None:
    from llmgen import render_explore

    if as_json:
        _write_json(session.view_record(top))
        return
    cands = session.candidates()
    out.print(render_explore.path_text(session))
    if cands is not None:
        explored = {session.nodes[c].token_id for c in session.node.children}
        out.print(render_explore.candidates_table(cands, cands.top(top), session.ckpt.token_text, explored, width=out.width),
                  soft_wrap=False)
        out.print(render_explore.candidates_summary(cands, session.seed))


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"llmgen: {message}\n")
    return code


TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def command():
    """The click command tree, with Click's help conventions where Typer 0.29 writes its
    own: INTEGER, FLOAT, TEXT, PATH or [a|b] after an option (not <int>, <list[str]>),
    nothing after a flag, and arguments in capitals, [OPTIONAL] and REQUIRED alike in
    usage lines (not [prompt] beside {INPUT})."""
    import typer.main

    group = typer.main.get_command(app)
    for cmd in [group, *group.commands.values()]:
        for param in cmd.params:
            if param.param_type_name == "argument":
                _argument_conventions(param)
            elif not getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = _option_metavar(param)
            _strict_numbers(param)
    return group


OPTIONAL_VALUES = {"--ray": "local"}  # an option that may be given alone, and the value it then means


def _optional_values(args: list[str]) -> list[str]:
    """``--ray`` alone (last, or before another option) as ``--ray=local``. Click calls
    this an option with a ``flag_value``; the parser Typer 0.29 ships has no such
    options, so the arguments are completed before it sees them (up to ``--``)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        following = out[i + 1] if i + 1 < len(out) else None
        if arg in OPTIONAL_VALUES and (following is None or (following.startswith("-") and len(following) > 1)):
            out[i] = f"{arg}={OPTIONAL_VALUES[arg]}"
    return out


def _strict_numbers(param) -> None:
    """Typer 0.29 parses numbers with Pydantic's lax rules: ``-n 1000000000.0`` is an
    integer and ``-t inf`` or ``nan`` a temperature. Every number flag takes the strict
    parser instead, which refuses those as a usage error naming the flag."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or desc.parameter_info.parser is not None or desc.is_choice:
        return
    annotation = desc.annotation
    while getattr(annotation, "__args__", None):  # Optional[int] -> int
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    parse = {int: _integer, float: _finite}.get(annotation)
    if parse is not None:
        desc.parameter_info.parser = _within(parse, desc.parameter_info.min, desc.parameter_info.max)


def _within(parse, low, high):
    """``parse``, then the option's own min= and max= (a parser replaces Typer's checks)."""
    def parser(text):
        value = parse(text)
        if low is not None and value < low:
            raise ValueError(f"{value} is below the minimum, {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above the maximum, {high}")
        return value

    return parser


def _integer(text):
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _finite(text):
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _option_metavar(param) -> str:
    desc = param.type_descriptor
    if desc.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    annotation = desc.annotation
    while getattr(annotation, "__args__", None):  # Optional[list[str]] -> str
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    return TYPE_NAMES.get(annotation, "TEXT")


def _argument_conventions(param) -> None:
    name = param.metavar or param.name.upper()
    param.metavar = name
    shown = name if param.required else f"[{name}]"
    shown += "..." if param.nargs != 1 else ""
    param._usage_display_name = lambda: shown  # Typer wraps required ones in {braces}
    param.display_type_rich = lambda ctx: None  # the name says it; no <str> beside it


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps every failure to one line on stderr and an exit code (0, 1, 2)."""
    global _debug
    _debug = _debug or bool(os.environ.get("LLMGEN_DEBUG"))
    try:
        args = _optional_values(sys.argv[1:] if argv is None else argv)
        result = command()(args=args, prog_name="llmgen", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # Typer turns Ctrl-C into a silent Exit(130)
            raise KeyboardInterrupt
    except UsageError as e:
        code = _fail(f"error: {e}", e.exit_code)
    except LlmgenError as e:
        if _debug:
            traceback.print_exc()
        code = _fail(f"error: {e}", e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        if sys.stdout.isatty():  # a reply may have stopped mid-line: end it before the message
            _flush_or_quiet()
            sys.stdout.write("\n")
        code = _fail("interrupted", 130)
    except (BrokenPipeError, OutputClosed):
        code = _quiet_broken_pipe()
    except Exception as e:
        if _is_parse_error(e):
            message = e.format_message().replace("Value error, ", "")  # Pydantic's prefix on our parsers' words
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `llmgen` asks for help, not an error
                sys.stdout.write(message + "\n")
                return _finish(argv, 0)
            if not message:
                return _finish(argv, 0)
            where = _subcommand(argv)
            return _finish(argv, _fail(f"usage error: {message} (see 'llmgen {where}--help')", e.exit_code))
        if _debug:
            traceback.print_exc()
        code = _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    return _finish(argv, code)


def _finish(argv: list[str] | None, code: int) -> int:
    if argv is None:
        _flush_or_quiet()
        sys.stderr.flush()
        # Leave without the interpreter's teardown: with torch loaded it takes 0.6 s,
        # which every command would add to a shell loop or pipeline. Nothing is lost:
        # streams are flushed above, and every file llmgen writes is closed (and batch
        # output fsynced) before a command returns.
        os._exit(code)
    return code


def _subcommand(argv: list[str] | None) -> str:
    """The subcommand named on the command line, with a trailing space, or ''."""
    args = sys.argv[1:] if argv is None else argv
    name = next((a for a in args if not a.startswith("-")), None)
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    return f"{name} " if name in commands else ""


def _is_parse_error(e: Exception) -> bool:
    """Typer's command-line parsing errors (its click, vendored or not) carry these two."""
    return hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def _flush_or_quiet() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
