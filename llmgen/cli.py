"""The ``llmgen`` command line: parse, validate, call the engine, render. No math here.

torch and the engine are imported inside the commands, so ``--help`` and usage errors
answer without paying for ``import torch``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmgen import __version__
from llmgen.errors import LlmgenError, OutputClosed, UsageError

app = typer.Typer(
    name="llmgen",
    help="Generate text with decoder-only language models, and see how it was chosen.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory (Hugging Face layout) or pulled model name. Default: $LLMGEN_MODEL, else the embedded model."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks CUDA when available.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16. auto: float32 on CPU, bfloat16 on CUDA.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON records instead of text.")]
PromptArg = Annotated[Optional[str], typer.Argument(help="Text to continue; '-' or a pipe reads stdin.", show_default=False)]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="Most tokens to generate. [default: 50]")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "-t", help="Softmax temperature; 0 = greedy. [default: 1.0]")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", "-k", help="Sample among the k most probable tokens; 0 = off.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", "-p", help="Nucleus: smallest set with mass >= p; 1 = off.")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability; 0 = off.")]
RepetitionOpt = Annotated[Optional[float], typer.Option("--repetition-penalty", help="> 1 discourages tokens already present; 1 = off.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed; sample i uses seed + i. Default: random, and reported.")]
EchoOpt = Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")]
ShowTreeOpt = Annotated[bool, typer.Option("--show-tree", help="Draw the search tree.")]
TruncateOpt = Annotated[str, typer.Option("--truncate", help="A prompt too long for the context: 'none' is an error, 'left' keeps its last tokens that fit.")]
ErrorsOpt = Annotated[str, typer.Option("--errors", help="Invalid UTF-8 in PROMPT or on stdin: 'strict' is an error, 'replace' substitutes U+FFFD.")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template; stop at its end-of-turn token.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System message for --chat.")]
TreeTopOpt = Annotated[int, typer.Option("--tree-top", help="Pruned candidates drawn per node in the tree.")]


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


def _read_prompt(prompt: str | None, errors: str = "strict") -> str:
    """PROMPT, or stdin for ``-`` or when no PROMPT is given and stdin is a pipe.

    One trailing newline from stdin is dropped, as the shell does for ``$(...)``,
    so ``echo "I like" | llmgen run`` means the prompt "I like"."""
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    if prompt is None and sys.stdin.isatty():
        raise UsageError("missing PROMPT (give it as an argument, or '-' to read stdin)")
    if prompt is not None and prompt != "-":
        # Invalid bytes in argv reach Python as lone surrogates; judge them like stdin's.
        return _decode(prompt.encode("utf-8", "surrogateescape"), errors, "PROMPT")
    return _decode(sys.stdin.buffer.read(), errors, "stdin").removesuffix("\n")


def _decode(data: bytes, errors: str, source: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LlmgenError(f"{source} is not valid UTF-8 (byte {e.start}); --errors replace substitutes U+FFFD") from None


def _prompt_ids(ckpt, prompt: str, truncate: str = "none", room: int = 1, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of the prompt; BOS alone for an empty prompt when the model has one.

    With ``chat`` the prompt is first wrapped in the model's chat template. With
    ``truncate='left'`` a prompt too long for the context keeps its last tokens,
    leaving ``room`` positions to generate into (at least one)."""
    if truncate not in ("none", "left"):
        raise UsageError(f"--truncate must be none or left, got {truncate!r}")
    if chat:
        from llmgen import chat as chats

        prompt = chats.render(ckpt.path, prompt, system)
    elif system is not None:
        raise UsageError("--system needs --chat")
    ids = ckpt.encode(prompt)
    if not ids and ckpt.bos_token_id is not None:
        ids = [ckpt.bos_token_id]
    context = ckpt.model.cfg.context_length
    if truncate == "left" and len(ids) + 1 > context:
        keep = max(1, context - max(1, min(room, context - 1)))
        ids = ids[-keep:]
    from llmgen.decoding.greedy_sample import check_prompt_fits

    try:
        check_prompt_fits(len(ids), context)
    except LlmgenError as e:
        if not ids:
            raise
        raise LlmgenError(f"{e} (--truncate left keeps the last tokens that fit)") from None
    return ids


def _write_json(record: dict) -> None:
    try:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


@app.command()
def run(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Independent continuations to generate.")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this string appears (repeatable); it is cut from the text.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-sequence token.")] = False,
    echo: EchoOpt = False,
    show_probs: Annotated[bool, typer.Option("--show-probs", help="After generating, show each step's token probability and the best alternatives.")] = False,
    show_tree: Annotated[bool, typer.Option("--show-tree", help="With --num-samples: merge the samples into one prefix tree with counts.")] = False,
    truncate: TruncateOpt = "none",
    errors: ErrorsOpt = "strict",
    chat: ChatOpt = False,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Continue PROMPT. Sampling settings default to the model's generation_config.json.

    Prints only the continuation (streamed on a terminal); --json prints one record per sample.
    """
    from llmgen import config

    flags = _sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
    gen = config.GenerationConfig(num_samples=num_samples, stop=tuple(stop or ()), seed=seed, ignore_eos=ignore_eos)
    text = _read_prompt(prompt, errors)

    from llmgen import render
    from llmgen.decoding.greedy_sample import generate

    ckpt = _load(model, device, dtype)
    gen = _generation_for(ckpt, flags, gen, chat)
    ids = _prompt_ids(ckpt, text, truncate, gen.max_new_tokens, chat, system)

    out = render.stdout_console()
    streaming = not as_json and num_samples == 1 and render.is_terminal() and not show_tree
    stream = render.TextStream(out) if streaming else None
    if stream and echo:
        stream.prompt(text)
    started = time.perf_counter()
    samples = generate(ckpt.model, ids, gen, ckpt.decode, on_text=stream, trace_top=6 if show_probs else 0)
    elapsed = time.perf_counter() - started

    if as_json:
        for s in samples:
            _write_json(_record(text, ids, s.text, s.token_ids, s.logprobs, s.finish_reason, s.seed))
        return
    if stream:
        stream.end()
    elif show_tree:
        from llmgen.decoding.trace import prefix_tree

        out.print(render.samples_tree(prefix_tree(samples), ckpt.decode, text))
    else:
        for i, s in enumerate(samples):
            if num_samples > 1 and render.is_terminal():
                out.print(render.sample_header(i, s.seed, s.finish_reason, len(s.token_ids)))
            out.print((text if echo else "") + s.text, markup=False, highlight=False)
    if show_probs:
        for s in samples:
            out.print(render.step_table(s, ckpt.token_text))
    if render.is_terminal(sys.stderr):
        s = samples[0]
        n = sum(len(x.token_ids) for x in samples)
        render.stderr_console().print(render.run_summary(n, s.finish_reason, s.seed, elapsed))


def _sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens) -> dict:
    """The sampling flags as given (None = not given), checked before any model loads."""
    from llmgen import config

    flags = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "max_new_tokens": max_new_tokens,
    }
    resolved = config.resolve(flags)
    config.sampling_from(resolved)
    config.GenerationConfig(max_new_tokens=resolved["max_new_tokens"])
    return flags


def _load(model: str | None, device: str, dtype: str):
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    return load_checkpoint(default_model_dir(model), device=device, dtype=dtype)


def _generation_for(ckpt, flags: dict, gen, chat: bool = False):
    """Fill in the model's defaults and EOS ids (with --chat, its end-of-turn tokens too);
    draw a seed if sampling needs one."""
    from llmgen import config

    values = config.resolve(flags, ckpt.generation_defaults)
    sampling = config.sampling_from(values)
    seed = gen.seed
    if seed is None and not sampling.greedy:
        seed = int.from_bytes(os.urandom(4), "little")
    return replace(
        gen, max_new_tokens=values["max_new_tokens"], eos_token_ids=_stop_ids(ckpt, chat), seed=seed, sampling=sampling
    )


def _stop_ids(ckpt, chat: bool) -> tuple[int, ...]:
    if not chat:
        return ckpt.eos_token_ids
    from llmgen.chat import end_of_turn_ids

    return tuple(dict.fromkeys(ckpt.eos_token_ids + end_of_turn_ids(ckpt.tokenizer)))


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
def beam(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    width: Annotated[int, typer.Option("--width", "-w", help="Beams kept at each step (1 = greedy).")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 20,
    length_penalty: Annotated[float, typer.Option("--length-penalty", help="alpha: a finished hypothesis scores sum(logprobs) / length**alpha.")] = 1.0,
    num_return: Annotated[int, typer.Option("--num-return", help="Hypotheses to return, best first (<= width).")] = 1,
    no_repeat_ngram_size: Annotated[int, typer.Option("--no-repeat-ngram-size", help="Forbid repeating any n-gram of this size; 0 = off.")] = 0,
    early_stopping: Annotated[bool, typer.Option("--early-stopping", help="Stop as soon as `width` hypotheses have finished.")] = False,
    show_tree: ShowTreeOpt = False,
    tree_top: TreeTopOpt = 3,
    echo: EchoOpt = False,
    truncate: TruncateOpt = "none",
    errors: ErrorsOpt = "strict",
    chat: ChatOpt = False,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Beam search: keep the WIDTH most probable partial sequences at every step.

    --show-tree draws every candidate each beam considered: survivors bold, pruned dim, finished hypotheses marked, the winning path green.
    """
    from llmgen.decoding.beam import BeamConfig, beam_search

    cfg = BeamConfig(width, max_new_tokens, length_penalty, num_return, no_repeat_ngram_size, early_stopping, (), tree_top)
    text = _read_prompt(prompt, errors)
    from llmgen import render

    ckpt = _load(model, device, dtype)
    cfg = replace(cfg, eos_token_ids=_stop_ids(ckpt, chat))
    ids = _prompt_ids(ckpt, text, truncate, max_new_tokens, chat, system)
    result = beam_search(ckpt.model, ids, cfg)
    hyps = result.hypotheses
    if as_json:
        best = hyps[0]
        beams = [
            {"text": ckpt.decode(h.token_ids), "token_ids": h.token_ids, "logprob": h.logprob, "score": h.score,
             "finish_reason": h.finish_reason}
            for h in hyps
        ]
        _write_json(_record(text, ids, beams[0]["text"], best.token_ids, best.logprobs, best.finish_reason, None, beams=beams))
        return
    out = render.stdout_console()
    if show_tree:
        out.print(render.search_tree(result.tree, ckpt.token_text, text, f"beam search, width {width}", tree_top))
    for i, h in enumerate(hyps):
        if len(hyps) > 1 or show_tree:
            out.print(render.hypothesis_header(i, h.logprob, h.score, h.finish_reason))
        out.print((text if echo else "") + ckpt.decode(h.token_ids), markup=False, highlight=False)


@app.command()
def exact(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="N: sequences end at EOS or after N tokens.")] = 5,
    max_expansions: Annotated[int, typer.Option("--max-expansions", help="Bound on partial sequences expanded; past it, optimality is not proven.")] = 2000,
    show_tree: ShowTreeOpt = False,
    tree_top: TreeTopOpt = 3,
    echo: EchoOpt = False,
    truncate: TruncateOpt = "none",
    errors: ErrorsOpt = "strict",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The provably most probable continuation (ending at EOS or after N tokens).

    Best-first search on cumulative log-probability, bounded by the greedy sequence: reports the nodes expanded against the |V|^N sequences brute force would score.
    """
    from llmgen.decoding.exact import ExactConfig, exact_search

    cfg = ExactConfig(max_new_tokens=max_new_tokens, max_expansions=max_expansions)
    text = _read_prompt(prompt, errors)
    from llmgen import render

    ckpt = _load(model, device, dtype)
    ids = _prompt_ids(ckpt, text, truncate, max_new_tokens)
    result = exact_search(ckpt.model, ids, replace(cfg, eos_token_ids=ckpt.eos_token_ids), ckpt.decode)
    continuation = ckpt.decode(result.token_ids)
    if as_json:
        _write_json(
            _record(text, ids, continuation, result.token_ids, result.logprobs, result.finish_reason, None,
                    logprob=result.logprob, expanded=result.expanded, proven=result.proven, brute_force=result.brute_force)
        )
        return
    out = render.stdout_console()
    if show_tree:
        out.print(render.search_tree(result.tree, ckpt.token_text, text, "exact search", tree_top, bound_all=True))
    out.print((text if echo else "") + continuation, markup=False, highlight=False)
    render.stderr_console().print(render.exact_summary(result, max_expansions))


@app.command()
def probs(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Follow the chosen token for this many steps, one table each.")] = 1,
    top: Annotated[int, typer.Option("--top", help="Rows per table.")] = 10,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    truncate: TruncateOpt = "none",
    errors: ErrorsOpt = "strict",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The next-token distribution as a table: model probability, after temperature, after top-k / top-p / min-p and renormalisation, and which filter removed each token.
    """
    from llmgen import config
    from llmgen.decoding.probs import follow

    if steps < 1 or top < 1:
        raise UsageError("--steps and --top must be >= 1")
    flags = _sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, None)
    text = _read_prompt(prompt, errors)
    from llmgen import render

    ckpt = _load(model, device, dtype)
    gen = _generation_for(ckpt, flags, config.GenerationConfig(seed=seed))
    ids = _prompt_ids(ckpt, text, truncate, steps)
    dists = follow(ckpt.model, ids, gen.sampling, steps, gen.seed)
    if as_json:
        for d in dists:
            order = sorted(range(len(d.raw)), key=lambda i: -d.raw[i])[:top]
            _write_json({
                "prompt": text, "prompt_token_ids": ids, "step": d.step, "token_id": d.chosen, "seed": gen.seed,
                "candidates": [
                    {"token_id": t, "token": ckpt.token_text(t), "prob": d.raw[t], "tempered_prob": d.tempered[t],
                     "final_prob": d.final[t], "removed_by": d.removed_by[t]}
                    for t in order
                ],
            })
        return
    out = render.stdout_console()
    context = text
    for d in dists:
        out.print(render.distribution_table(d, ckpt.token_text, top, f"after {render.token_label(context[-60:])}"))
        context += ckpt.token_text(d.chosen)


@app.command()
def compare(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per continuation.")] = 8,
    width: Annotated[int, typer.Option("--width", "-w", help="Beam width.")] = 4,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    seed: SeedOpt = None,
    max_expansions: Annotated[int, typer.Option("--max-expansions", help="Budget for the exact search.")] = 2000,
    truncate: TruncateOpt = "none",
    errors: ErrorsOpt = "strict",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Greedy, beam, exact and sampled continuations side by side, each with its total log-probability: see for yourself that greedy is not always the most probable.
    """
    from llmgen import config
    from llmgen.decoding.beam import BeamConfig, beam_search
    from llmgen.decoding.exact import ExactConfig, exact_search
    from llmgen.decoding.greedy_sample import generate

    flags = _sampling_flags(temperature, top_k, top_p, min_p, None, max_new_tokens)
    beam_cfg = BeamConfig(width=width, max_new_tokens=max_new_tokens, length_penalty=0.0)
    exact_cfg = ExactConfig(max_new_tokens=max_new_tokens, max_expansions=max_expansions)
    text = _read_prompt(prompt, errors)
    from llmgen import render

    ckpt = _load(model, device, dtype)
    ids = _prompt_ids(ckpt, text, truncate, max_new_tokens)
    eos = ckpt.eos_token_ids
    sampled = _generation_for(ckpt, flags, config.GenerationConfig(seed=seed))
    if sampled.sampling.greedy:
        sampled = replace(sampled, sampling=replace(sampled.sampling, temperature=1.0, top_k=0), seed=sampled.seed or 0)
    greedy = replace(sampled, sampling=config.SamplingConfig(temperature=0), seed=None)
    rows = []
    g = generate(ckpt.model, ids, greedy, ckpt.decode)[0]
    rows.append({"strategy": "greedy", "token_ids": g.token_ids, "logprob": g.logprob})
    b = beam_search(ckpt.model, ids, replace(beam_cfg, eos_token_ids=eos)).hypotheses[0]
    rows.append({"strategy": f"beam (width {width})", "token_ids": b.token_ids, "logprob": b.logprob})
    e = exact_search(ckpt.model, ids, replace(exact_cfg, eos_token_ids=eos), ckpt.decode)
    note = f"optimal, {e.expanded:,} expansions" if e.proven else f"not proven within {max_expansions:,} expansions"
    rows.append({"strategy": "exact", "token_ids": e.token_ids, "logprob": e.logprob, "note": note})
    s = sampled.sampling
    s_name = f"sample (T={s.temperature:g}" + (f", k={s.top_k}" if s.top_k else "") + (f", p={s.top_p:g}" if s.top_p < 1 else "") + ")"
    smp = generate(ckpt.model, ids, sampled, ckpt.decode)[0]
    rows.append({"strategy": s_name, "token_ids": smp.token_ids, "logprob": smp.logprob, "note": f"seed {smp.seed}"})
    for r in rows:
        r["text"] = ckpt.decode(r["token_ids"])
    if as_json:
        for r in rows:
            _write_json({"prompt": text, "prompt_token_ids": ids, **r})
        return
    render.stdout_console().print(render.compare_table(rows))


@app.command()
def score(
    text: Annotated[Optional[str], typer.Argument(help="Text to score; '-' reads stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    errors: ErrorsOpt = "strict",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Teacher-forced log-probability of every token of TEXT, and its perplexity.

    The first token is scored after the model's BOS token when it has one; otherwise it has no context and its logprob is null.
    """
    content = _read_prompt(text, errors)

    from llmgen import render
    from llmgen.scoring import score as score_text

    ckpt = _load(model, device, dtype)
    result = score_text(ckpt.model, ckpt.encode(content), ckpt.bos_token_id)
    if as_json:
        _write_json(
            {
                "text": content,
                "token_ids": result.token_ids,
                "logprobs": result.logprobs,
                "perplexity": result.perplexity,
            }
        )
        return
    tokens = [ckpt.token_text(t) for t in result.token_ids]
    render.stdout_console().print(render.score_table(tokens, result.token_ids, result.logprobs, result.perplexity))


@app.command()
def info(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Describe a model: architecture, parameters, vocabulary, context, dtype, device, files and where it came from."""
    from llmgen import render
    from llmgen.checkpoint import describe

    facts = describe(_load(model, device, dtype))
    if as_json:
        _write_json(facts)
        return
    render.stdout_console().print(render.info_table(facts))


@app.command()
def batch(
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="Prompts: a text file (one per line) or JSONL (.jsonl) of {prompt, id?, max_new_tokens?, temperature?, top_k?, top_p?, seed?}; '-' is stdin.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL to append to (resumable). Default: stdout.")] = None,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated together.")] = 16,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Base seed: a record without its own seed uses seed + index.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable), for every record.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-sequence token.")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: only records whose index is I mod N.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT instead of resuming it.")] = False,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Write an error record for a malformed input record and go on.")] = False,
    truncate: TruncateOpt = "none",
    chat: ChatOpt = False,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate for every prompt of INPUT: one JSONL record each, with `index` and the fields of run --json.

    Re-running the same command resumes: records already in OUTPUT are skipped, a torn last line is repaired. Records come out in batch order; each carries its `index`.
    """
    from llmgen import batch as batching
    from llmgen import config

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    flags = _sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
    gen = config.GenerationConfig(stop=tuple(stop or ()), ignore_eos=ignore_eos, seed=seed)
    shard_i, shard_n = batching.parse_shard(shard)
    records = batching.read_input(input_path)
    mine = [r for r in records if r.index % shard_n == shard_i]
    batching.validate(mine, flags, {})
    _stop_on_invalid(input_path, mine, skip_invalid)
    done = batching.load_existing(output, records, overwrite) if output else {}
    todo = [r for r in mine if r.index not in done]
    sink = batching.Sink(output)  # fails now, before the model loads, if OUTPUT is unwritable

    from llmgen import render

    ckpt = _load(model, device, dtype)
    gen = replace(gen, eos_token_ids=_stop_ids(ckpt, chat))
    batching.validate(todo, flags, ckpt.generation_defaults)
    base = seed if seed is not None else batching.base_seed_from(done, records)
    if base is None:
        base = int.from_bytes(os.urandom(4), "little")
    jobs = []
    for rec in todo:
        if rec.error is not None:
            continue
        sampling, limit = batching.settings(rec, flags, ckpt.generation_defaults)
        try:
            ids = _prompt_ids(ckpt, rec.prompt, truncate, limit, chat, system)
        except LlmgenError as e:
            rec.error = str(e)
            continue
        jobs.append(batching.Job(rec, ids, rec.overrides.get("seed", base + rec.index), limit, sampling))
    _stop_on_invalid(input_path, todo, skip_invalid)
    errors = [batching.error_record(r) for r in todo if r.error is not None]
    if errors:
        sink.write(errors)
    with render.BatchProgress(len(todo), already=len(errors)) as progress:
        batching.run_batches(ckpt, batching.plan(jobs, batch_size), gen, sink, progress.update)
    sink.close()


def _stop_on_invalid(input_path: str, records, skip_invalid: bool) -> None:
    bad = next((r for r in records if r.error is not None), None)
    if bad is not None and not skip_invalid:
        raise LlmgenError(f"{input_path}:{bad.line}: {bad.error} (nothing generated; --skip-invalid writes an error record and goes on)")


@app.command()
def convert(
    gguf_file: Annotated[Path, typer.Argument(metavar="MODEL.gguf", help="GGUF file to convert.")],
    output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR", help="Directory to write (Hugging Face layout).")],
    dtype: Annotated[str, typer.Option("--dtype", help="How the weights are stored: bfloat16, float16 or float32.")] = "bfloat16",
) -> None:
    """Convert a GGUF file (llama.cpp) into a safetensors model directory that --model loads: weights dequantized, config, tokenizer, generation config and chat template rebuilt from the GGUF metadata."""
    from llmgen import render
    from llmgen.checkpoint import DTYPES
    from llmgen.convert import convert as convert_gguf
    from llmgen.convert import tensor_count

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not gguf_file.is_file():
        raise LlmgenError(f"{gguf_file}: file not found")
    with render.TaskProgress("convert", tensor_count(gguf_file)) as progress:
        cfg = convert_gguf(gguf_file, output_dir, DTYPES[dtype], progress.advance)
    render.stderr_console().print(render.converted_summary(cfg, output_dir))


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A model from the catalogue (see `llmgen list --available`).")],
    dtype: Annotated[str, typer.Option("--dtype", help="How the weights are stored: bfloat16, float16 or float32.")] = "bfloat16",
) -> None:
    """Fetch a model by name into the cache ($LLMGEN_HOME, else the XDG cache) and convert it; then --model NAME works."""
    from llmgen import render
    from llmgen.checkpoint import DTYPES
    from llmgen.models_cache import pull as pull_model

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    progress = render.TaskProgress(f"pull {name}", None)
    with progress:
        path = pull_model(name, DTYPES[dtype], progress.advance, progress.set_total)
    render.stderr_console().print(render.pulled_summary(name, path))


@app.command(name="list")
def list_models(
    available: Annotated[bool, typer.Option("--available", help="Show the catalogue of pullable models instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The models in the cache, with size and source (or, with --available, the ones `pull` can fetch)."""
    from llmgen import render
    from llmgen.models_cache import cached, catalog

    rows = [{"name": k, **v} for k, v in sorted(catalog().items())] if available else cached()
    if as_json:
        for row in rows:
            _write_json(row)
        return
    render.stdout_console().print(render.models_table(rows, available))


@app.command()
def train(
    text_files: Annotated[Optional[list[Path]], typer.Argument(help="Plain-text training files (UTF-8).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")] = Path("model"),
    preset: Annotated[str, typer.Option(help="Size and schedule to start from: tiny or small.")] = "tiny",
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
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --output from its last save.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a GPT-2 model on TEXT_FILES (tokenizer too), or fine-tune one with --init and --pairs.

    Writes an ordinary checkpoint directory that --model loads, plus training.json (config, data hashes, losses). Progress goes to stderr.
    """
    from llmgen import train as training

    if preset not in training.PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(training.PRESETS)}, got {preset!r}")
    overrides = {
        "steps": steps, "batch_size": batch_size, "context": context, "lr": lr, "vocab_size": vocab_size,
        "n_layer": layers, "n_embd": dim, "n_head": heads, "bf16": bf16,
    }
    cfg = replace(training.PRESETS[preset], seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if (init is None) != (pairs is None):
        raise UsageError("--init and --pairs go together (fine-tuning); give both or neither")
    if init is None and not text_files:
        raise UsageError("give TEXT_FILES to train on, or --init DIR --pairs FILE to fine-tune")
    if (output / training.STATE_DIR).exists() and not resume:
        raise LlmgenError(f"{output} holds an earlier run: pass --resume to continue it, or choose another --output")

    from llmgen import render
    from llmgen.checkpoint import resolve_device

    torch_device = resolve_device(device)
    with render.TrainingProgress(cfg.steps) as progress:
        if init is not None:
            result = training.finetune(init, pairs, output, cfg, torch_device, resume, progress.update)
        else:
            result = training.pretrain(list(text_files), output, cfg, torch_device, resume, progress.update)
    render.stderr_console().print(render.training_summary(result.record, output))


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"llmgen: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps every failure to one line on stderr and an exit code (0, 1, 2)."""
    global _debug
    _debug = _debug or bool(os.environ.get("LLMGEN_DEBUG"))
    try:
        result = app(args=argv, prog_name="llmgen", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except UsageError as e:
        code = _fail(f"error: {e}", e.exit_code)
    except LlmgenError as e:
        if _debug:
            traceback.print_exc()
        code = _fail(f"error: {e}", e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = _fail("interrupted", 130)
    except (BrokenPipeError, OutputClosed):
        code = _quiet_broken_pipe()
    except Exception as e:
        if _is_parse_error(e):
            message = e.format_message()  # empty when the help was shown for a bare `llmgen`
            return _finish(argv, _fail(f"usage error: {message} (see 'llmgen --help')", e.exit_code) if message else e.exit_code)
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
