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
    typer.Option("--model", "-m", help="Model directory (Hugging Face layout). Default: $LLMGEN_MODEL, else the embedded model."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks CUDA when available.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16. auto: float32 on CPU, bfloat16 on CUDA.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON records instead of text.")]


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


def _read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin for ``-`` or when no PROMPT is given and stdin is a pipe.

    One trailing newline from stdin is dropped, as the shell does for ``$(...)``,
    so ``echo "I like" | llmgen run`` means the prompt "I like"."""
    if prompt is None and sys.stdin.isatty():
        raise UsageError("missing PROMPT (give it as an argument, or '-' to read stdin)")
    if prompt is not None and prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmgenError(f"stdin is not valid UTF-8 (byte {e.start})") from None
    return text.removesuffix("\n")


def _prompt_ids(ckpt, prompt: str) -> list[int]:
    ids = ckpt.encode(prompt)
    if not ids and ckpt.bos_token_id is not None:
        ids = [ckpt.bos_token_id]
    return ids


def _write_json(record: dict) -> None:
    try:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


@app.command()
def run(
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue; '-' reads stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="Most tokens to generate. [default: 50]")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="Softmax temperature; 0 = greedy. [default: 1.0]")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Sample among the k most probable tokens; 0 = off.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", "-p", help="Nucleus: smallest set with mass >= p; 1 = off.")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability; 0 = off.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="> 1 discourages tokens already present; 1 = off.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed; sample i uses seed + i. Default: random, and reported.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Independent continuations to generate.")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this string appears (repeatable); it is cut from the text.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-sequence token.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Continue PROMPT. Sampling settings default to the model's generation_config.json.

    Prints only the continuation (streamed on a terminal); --json prints one record per sample.
    """
    from llmgen import config

    flags = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "max_new_tokens": max_new_tokens,
    }
    config.sampling_from(config.resolve(flags))  # reject bad flags before loading anything
    gen = config.GenerationConfig(
        max_new_tokens=config.resolve(flags)["max_new_tokens"], num_samples=num_samples, stop=tuple(stop or ()), seed=seed
    )
    text = _read_prompt(prompt)

    from llmgen import render
    from llmgen.checkpoint import default_model_dir, load_checkpoint
    from llmgen.decoding.greedy_sample import generate

    ckpt = load_checkpoint(default_model_dir(model), device=device, dtype=dtype)
    values = config.resolve(flags, ckpt.generation_defaults)
    sampling = config.sampling_from(values)
    if gen.seed is None and not sampling.greedy:
        gen = gen.with_seed(int.from_bytes(os.urandom(4), "little"))
    gen = config.GenerationConfig(
        max_new_tokens=values["max_new_tokens"],
        num_samples=gen.num_samples,
        stop=gen.stop,
        ignore_eos=ignore_eos,
        eos_token_ids=ckpt.eos_token_ids,
        seed=gen.seed,
        sampling=sampling,
    )
    ids = _prompt_ids(ckpt, text)

    out = render.stdout_console()
    streaming = not as_json and num_samples == 1 and render.is_terminal()
    stream = render.TextStream(out) if streaming else None
    if stream and echo:
        stream.prompt(text)
    started = time.perf_counter()
    samples = generate(ckpt.model, ids, gen, ckpt.decode, on_text=stream)
    elapsed = time.perf_counter() - started

    if as_json:
        for s in samples:
            _write_json(
                {
                    "prompt": text,
                    "prompt_token_ids": ids,
                    "text": s.text,
                    "token_ids": s.token_ids,
                    "logprobs": s.logprobs,
                    "finish_reason": s.finish_reason,
                    "seed": s.seed,
                }
            )
        return
    if stream:
        stream.end()
    else:
        for i, s in enumerate(samples):
            if num_samples > 1 and render.is_terminal():
                out.print(render.sample_header(i, s.seed, s.finish_reason, len(s.token_ids)))
            out.print((text if echo else "") + s.text, markup=False, highlight=False)
    if render.is_terminal(sys.stderr):
        s = samples[0]
        n = sum(len(x.token_ids) for x in samples)
        render.stderr_console().print(render.run_summary(n, s.finish_reason, s.seed, elapsed))


@app.command()
def score(
    text: Annotated[Optional[str], typer.Argument(help="Text to score; '-' reads stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Teacher-forced log-probability of every token of TEXT, and its perplexity.

    The first token is scored after the model's BOS token when it has one; otherwise it
    has no context and its logprob is null.
    """
    content = _read_prompt(text)

    from llmgen import render
    from llmgen.checkpoint import default_model_dir, load_checkpoint
    from llmgen.scoring import score as score_text

    ckpt = load_checkpoint(default_model_dir(model), device=device, dtype=dtype)
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
        sys.exit(code)
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
