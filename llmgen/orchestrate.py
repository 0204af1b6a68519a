"""What the commands do between parsing and rendering: read the prompt, load the model,
turn text into prompt ids, resolve the settings once, draw seeds, and assemble the
recipes that several engine calls make up (``compare``, batch jobs).

Nothing here prints, and nothing here parses flags: ``cli.py`` hands over plain values
(settings as a dict, None where a flag was not given).
"""

from __future__ import annotations

import io
import os
import stat
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from llmgen import config
from llmgen.errors import BrokenLogits, LlmgenError, ModelError, UsageError


def read_prompt(prompt: str | None, errors: str = "strict", prompt_file: str | None = None) -> str:
    """The prompt: PROMPT; the file of ``--prompt-file`` (``-``: stdin); stdin for
    ``-``, or when no PROMPT is given and stdin is not a terminal. Text piped in beside a PROMPT is joined
    to it, stdin first and a space between, as ``llm`` does
    (``cat notes.txt | llmgen run "In short:"``).

    One trailing newline from stdin or a file is dropped, as the shell does for ``$(...)``,
    so ``echo "I like" | llmgen run`` means the prompt "I like". An empty stdin with no
    PROMPT is an error (a job under cron would otherwise generate from nothing); an empty
    prompt must be asked for, as ``""``."""
    if prompt_file is not None:
        if prompt is not None:
            raise UsageError("give PROMPT or --prompt-file, not both")
        if prompt_file == "-":
            return read_prompt("-", errors)
        try:
            data = Path(prompt_file).read_bytes()
        except OSError as e:
            raise LlmgenError(f"{prompt_file}: cannot read the prompt file ({e.strerror})") from None
        return _decode(data, errors, prompt_file).removesuffix("\n")
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("missing PROMPT (give it as an argument, '-' to read stdin, or --prompt-file)")
        text = _decode(sys.stdin.buffer.read(), errors, "stdin").removesuffix("\n")
        if not text:
            raise UsageError("missing PROMPT: stdin was empty (give PROMPT, or '' for an empty prompt)")
        return text
    if prompt == "-":
        return _decode(sys.stdin.buffer.read(), errors, "stdin").removesuffix("\n")
    # Invalid bytes in argv reach Python as lone surrogates; judge them like stdin's.
    text = _decode(prompt.encode("utf-8", "surrogateescape"), errors, "PROMPT")
    piped = _piped_stdin()
    if piped:
        return " ".join(t for t in (_decode(piped, errors, "stdin").removesuffix("\n"), text) if t)
    return text


def _piped_stdin() -> bytes | None:
    """What a pipe or a redirected file on stdin holds; None for a terminal, /dev/null
    or no stdin at all (a test harness, a daemon)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return None
    return sys.stdin.buffer.read()


def _decode(data: bytes, errors: str | None, source: str) -> str:
    """``data`` as text; ``errors`` None for a command without ``--errors`` (strict, and
    no hint at a flag it does not have)."""
    try:
        return data.decode("utf-8", errors=errors or "strict")
    except UnicodeDecodeError as e:
        hint = "; --errors replace substitutes U+FFFD" if errors else ""
        raise LlmgenError(f"{source} is not valid UTF-8 (byte {e.start}){hint}") from None


def load(model: str | None, device: str, dtype: str, threads: int | None = None):
    """The model, with torch set to ``threads`` threads (None: ``llmgen.threads``' default)."""
    from llmgen import threads as cpu_threads
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    cpu_threads.use(threads)

    ckpt = load_checkpoint(default_model_dir(model), device=device, dtype=dtype)
    BrokenLogits.model = str(ckpt.path)
    return ckpt


def load_vocabulary(model: str | None):
    """The model's config, tokenizer and generation defaults, with no weights read (its
    modules stay on the meta device): what ``batch --ray``'s driver needs to turn records
    into jobs exactly as a local batch does, while only the workers hold the weights."""
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    return load_checkpoint(default_model_dir(model), device="cpu", weights=False)


DRAFT_TOKENS = 5  # drafted tokens per round when --draft-tokens is not given (gpt-fast's default)


def check_speculation(draft_model: str | None, prompt_lookup: int | None, draft_tokens: int | None, show: bool) -> None:
    """The speculative decoding flags' combination, checked before any model loads."""
    if draft_model is not None and prompt_lookup is not None:
        raise UsageError("give --draft-model or --prompt-lookup, not both")
    if draft_model is None and prompt_lookup is None:
        for flag, given in (("--draft-tokens", draft_tokens is not None), ("--show-speculation", show)):
            if given:
                raise UsageError(f"{flag} needs --draft-model or --prompt-lookup")


def speculation(ckpt, draft_model: str | None, prompt_lookup: int | None, draft_tokens: int | None, dtype: str):
    """How to speculate (``decoding.drafts.Speculate``), with the draft model loaded on the
    model's device; None when neither flag was given. A draft model must give every
    token the model's id, or its drafts would be other words: it is refused unless its
    vocabulary is the model's, id for id."""
    from llmgen.decoding.drafts import Speculate

    k = DRAFT_TOKENS if draft_tokens is None else draft_tokens
    if prompt_lookup is not None:
        return Speculate(k, prompt_lookup=prompt_lookup)
    if draft_model is None:
        return None
    from llmgen.checkpoint import default_model_dir, load_checkpoint

    draft = load_checkpoint(default_model_dir(draft_model), device=str(ckpt.device), dtype=dtype)
    ours, theirs = ckpt.tokenizer.get_vocab(with_added_tokens=True), draft.tokenizer.get_vocab(with_added_tokens=True)
    if draft.model.cfg.vocab_size != ckpt.model.cfg.vocab_size or ours != theirs:
        raise ModelError(f"{draft.path}: a draft model must share the model's vocabulary, and {ckpt.path}'s differs "
                         f"({len(theirs):,} tokens in {draft.model.cfg.vocab_size:,} rows against {len(ours):,} in "
                         f"{ckpt.model.cfg.vocab_size:,}, or other ids)")
    return Speculate(k, draft_model=draft.model)


def prompt_logprobs(ckpt, ids: list[int]) -> list[float | None]:
    """Each prompt token's logprob given the tokens before it (vLLM's prompt_logprobs);
    the first has no context, so it is None."""
    from llmgen.scoring import score

    return score(ckpt.model, ids, None).logprobs


def forced_records(ckpt, ids: list[int], token_ids: list[int], top: int, grammar=None) -> dict:
    """A searched answer's ``entropy`` per step, its ``top_logprobs`` when ``top``, and
    its ``constraint_mass`` under a constraint's ``grammar``."""
    from llmgen import render
    from llmgen.decoding.forced import forced_steps

    entropy, tops, kept = forced_steps(ckpt.model, ids, token_ids, top, grammar)
    out = {"entropy": entropy, **({"top_logprobs": render.top_logprobs_record(tops, ckpt.token_text, top)} if top else {})}
    if grammar is not None:
        from llmgen.decoding.trace import constraint_mass

        out["constraint_mass"] = constraint_mass(kept)
    return out


def constraint(ckpt, settings: dict[str, Any], chat: bool = False):
    """The constraint the flags set, compiled for the model's vocabulary (None without
    one): for the searches that take no sampler chain (beam, exact)."""
    from llmgen.constraint import compile_for

    values = {k: settings.get(k) for k in config.CONSTRAINT_KINDS if settings.get(k)}
    constrained = config.SamplingConfig(**values).constraint  # one at most, each checked
    return compile_for(constrained, ckpt.vocabulary, ckpt.model.cfg.vocab_size, stop_ids(ckpt, chat)) if constrained else None


def model_label(model: str | None) -> str:
    """How a record names its model, so the run can be repeated with ``--model`` that:
    the flag as given, else ``$LLMGEN_MODEL``, else ``embedded``."""
    return model or os.environ.get("LLMGEN_MODEL") or "embedded"


def check_chat(chat: bool, system: str | None, template: str | None = None, errors: str | None = "strict") -> str | None:
    """The chat options, checked before any model loads: their combination, and
    --system's UTF-8, judged as ``--errors`` judges PROMPT's (the tokenizer cannot take
    the lone surrogates that invalid bytes in argv become). Returns --system's text."""
    if system is not None and not chat:
        raise UsageError("--system needs --chat")
    if template is not None and not chat:
        raise UsageError("--chat-template needs --chat")
    if system is None:
        return None
    return _decode(system.encode("utf-8", "surrogateescape"), errors, "--system")


def prompt_ids(ckpt, prompt: str, truncate: str = "none", room: int = 1, chat: bool = False, system: str | None = None,
               template: str | None = None) -> list[int]:
    """Token ids of the prompt; BOS alone for an empty prompt when the model has one.

    With ``chat`` the prompt is first wrapped in the model's chat template (the one
    named ``template``, default ``default``). With
    ``truncate='left'`` a prompt too long for the context keeps its last tokens,
    leaving ``room`` positions to generate into (at least one). The commands check the
    chat options' combination (``check_chat``) before the model loads."""
    from llmgen.decoding.greedy_sample import check_prompt_fits

    if chat:
        from llmgen import chat as chats

        prompt = chats.render(ckpt.path, prompt, system, context=ckpt.model.cfg.context_length, name=template)
    ids = ckpt.encode(prompt, special=not chat)
    if not ids and ckpt.bos_token_id is not None:
        ids = [ckpt.bos_token_id]
    context = ckpt.model.cfg.context_length
    if truncate == "left" and len(ids) + 1 > context:
        keep = max(1, context - max(1, min(room, context - 1)))
        ids = ids[-keep:]
    try:
        check_prompt_fits(len(ids), context)
    except LlmgenError as e:
        if not ids:
            raise
        raise LlmgenError(f"{e} (--truncate left keeps the last tokens that fit)") from None
    return ids


def settings_origin(ckpt, settings: dict[str, Any], gen: config.GenerationConfig) -> str:
    """The settings in effect (as ``config.effective`` lists them) and where each came
    from: ``temperature=0.7 (flag) · top_p=0.95 (generation_config)``."""
    parts = []
    for name, value in config.effective(gen).items():
        if name == "max_new_tokens":
            continue
        if settings.get(name) is not None:
            source = "flag"
        elif ckpt.generation_defaults.get(name) is not None:
            source = "generation_config"
        else:
            source = "default"
        parts.append(f"{name}={_shown(name, value)} ({source})")
    return " · ".join(parts)


def _shown(name: str, value: Any, width: int = 60) -> str:
    """A setting's value for a caption: a constraint's text on one line, cut at ``width``."""
    if name not in config.CONSTRAINT_KINDS or not isinstance(value, str):
        return str(value)
    text = " ".join(value.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def stop_ids(ckpt, chat: bool) -> tuple[int, ...]:
    """The model's EOS ids; with ``chat``, its end-of-turn tokens too."""
    if not chat:
        return ckpt.eos_token_ids
    from llmgen.chat import end_of_turn_ids

    return tuple(dict.fromkeys(ckpt.eos_token_ids + end_of_turn_ids(ckpt.tokenizer)))


def draw_seed() -> int:
    """A fresh seed for a sampling run that was given none (it is reported, so the run can be repeated)."""
    return int.from_bytes(os.urandom(4), "little")


def generation(ckpt, settings: dict[str, Any], record: dict[str, Any] | None = None, *, seed: int | None = None,
               num_samples: int = 1, stop: tuple[str, ...] = (), ignore_eos: bool = False, chat: bool = False) -> config.GenerationConfig:
    """The settings resolved once: ``record`` > ``settings`` (flags) > the model's
    generation_config > llmgen's defaults; a seed drawn if sampling needs one. A chat
    reply runs to its end of turn: unless something above sets ``max_new_tokens``, it is
    the whole context (generation stops at the end of turn, or where the context ends)."""
    from llmgen.sampling import resolve_tokens

    chat_default = {"max_new_tokens": ckpt.model.cfg.context_length} if chat else None
    values = config.layer(record, settings, ckpt.generation_defaults, chat_default)
    sampling = config.SamplingConfig.from_values(values)
    if seed is None and not sampling.greedy:
        seed = draw_seed()
    return config.GenerationConfig(
        max_new_tokens=values["max_new_tokens"], num_samples=num_samples, stop=stop, ignore_eos=ignore_eos,
        eos_token_ids=stop_ids(ckpt, chat), seed=seed, sampling=sampling,
        tokens=resolve_tokens(sampling, ckpt.vocabulary, ckpt.model.cfg.vocab_size, stop_ids(ckpt, chat)),
    )


# ---------------------------------------------------------------- compare


def compare(ckpt, ids: list[int], settings: dict[str, Any], seed: int | None, width: int, max_expansions: int,
            chat: bool = False) -> list[dict]:
    """Greedy, beam, exact and one sample for the same prompt and length, each with its
    total log-probability under the model; with ``chat`` each also ends at the end of
    turn. The sample uses the sampling settings; when they would make it greedy (``-t 0``)
    it samples at temperature 1 with no top-k instead, and its label says so. Under a
    constraint, greedy, beam and exact run twice, without it and with it, and the
    sample runs with it."""
    from llmgen.decoding.greedy_sample import generate

    sampled = generation(ckpt, settings, seed=seed, chat=chat)
    asked_greedy = sampled.sampling.greedy
    if asked_greedy:
        sampled = replace(sampled, sampling=replace(sampled.sampling, temperature=1.0, top_k=0), seed=sampled.seed or 0)
    grammar = sampled.tokens.grammar
    rows = _searches(ckpt, ids, sampled, width, max_expansions, None)
    if grammar is not None:
        rows += _searches(ckpt, ids, sampled, width, max_expansions, grammar)
    s = generate(ckpt.model, ids, sampled, ckpt.decode)[0]
    rows.append({"strategy": sample_label(sampled.sampling), "token_ids": s.token_ids, "logprob": s.logprob,
                 "finish_reason": s.finish_reason, **s.constraint_record(),
                 "note": f"seed {s.seed}" + ("; -t 0 is the greedy row, so T=1 here" if asked_greedy else "")})
    for r in rows:
        r["text"] = ckpt.decode(r["token_ids"])
    return rows


def _searches(ckpt, ids: list[int], gen: config.GenerationConfig, width: int, max_expansions: int, grammar) -> list[dict]:
    """compare's greedy, beam and exact rows, under ``grammar`` when it is not None (each
    strategy's label then names the constraint, and each row says what it cost)."""
    from llmgen.decoding.beam import BeamConfig, beam_search
    from llmgen.decoding.exact import ExactConfig, exact_search
    from llmgen.decoding.greedy_sample import generate
    from llmgen.sampling import TokenRules

    n, eos = gen.max_new_tokens, gen.eos_token_ids
    greedy = replace(gen, sampling=config.SamplingConfig(temperature=0), seed=None, tokens=TokenRules(grammar=grammar))
    g = generate(ckpt.model, ids, greedy, ckpt.decode)[0]
    searched = beam_search(ckpt.model, ids, BeamConfig(width=width, max_new_tokens=n, length_penalty=0.0, eos_token_ids=eos,
                                                       grammar=grammar))
    b = searched.hypotheses[0]
    e = exact_search(ckpt.model, ids, ExactConfig(max_new_tokens=n, max_expansions=max_expansions, eos_token_ids=eos,
                                                  grammar=grammar), ckpt.decode)
    note = f"optimal, {e.expanded:,} expansions" if e.proven else f"not proven within {max_expansions:,} expansions"
    suffix = "" if grammar is None else f" + {grammar.kind.replace('_', ' ')}"
    rows = [
        {"strategy": "greedy" + suffix, "token_ids": g.token_ids, "logprob": g.logprob, "finish_reason": g.finish_reason},
        {"strategy": f"beam (width {width})" + suffix, "token_ids": b.token_ids, "logprob": b.logprob,
         "finish_reason": b.finish_reason, **beam_versus_exact(searched.tree, b, e)},
        {"strategy": "exact" + suffix, "token_ids": e.token_ids, "logprob": e.logprob, "finish_reason": e.finish_reason,
         "note": note},
    ]
    for r in rows:
        if grammar is not None:
            r["constraint_mass"] = forced_records(ckpt, ids, r["token_ids"], 0, grammar)["constraint_mass"]
    return rows


def beam_versus_exact(tree, beam, exact) -> dict:
    """Search error made visible: the step at which the exact sequence fell out of the
    beam (``lost_optimum_at_step``, None when beam found it or one as probable) and
    ``gap``, beam's log-probability minus exact's (0 when found, below 0 when lost). When
    exact is not proven (its budget ran out), the comparison is against its best found,
    which a beam can even beat. A beam that found the optimum and still reads badly is
    the model's error, not the search's."""
    same = beam.token_ids == exact.token_ids  # two searches sum one sequence in different orders
    gap = 0.0 if same else beam.logprob - exact.logprob
    found = same or gap >= -1e-6  # a tie is an optimum too
    lost = None if found else tree.dropped_at(exact.token_ids)
    target = "the optimum" if exact.proven else "exact's best found"
    if found and gap > 1e-6:
        note = f"beat exact's best found by {gap:.3f} logprob (exact not proven)"
    elif found:
        note = f"found {target}" + ("" if exact.proven else " (not proven optimal)")
    else:
        where = f"at step {lost} " if lost is not None else ""
        note = f"lost {target} {where}({gap:.3f} logprob)"
    return {"lost_optimum_at_step": lost, "gap": gap, "optimum_proven": exact.proven, "note": note}


def sample_label(s: config.SamplingConfig) -> str:
    """``sample (T=0.8, k=40, p=0.95)``, plus every other setting that is not at its default."""
    parts = [f"T={s.temperature:g}"] + [f"k={s.top_k}"] * bool(s.top_k) + [f"p={s.top_p:g}"] * (s.top_p < 1)
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name in config.CONSTRAINT_KINDS and value:
            parts.append(f"+ {f.name.replace('_', ' ')}")
        elif f.name not in ("temperature", "top_k", "top_p") and value != config.DEFAULTS[f.name]:
            parts.append(f"{f.name}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return f"sample ({', '.join(parts)})"


# ---------------------------------------------------------------- batch jobs


@dataclass(frozen=True)
class BatchOptions:
    """What every record of a batch shares, from the command line."""

    settings: dict[str, Any]
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: str = "none"
    chat: bool = False
    system: str | None = None
    chat_template: str | None = None


def batch_jobs(ckpt, records, options: BatchOptions, base_seed: int) -> list:
    """One job per valid record, its settings resolved once; a record that cannot run
    (bad values, a prompt too long, a conversation its template refuses) gets its
    ``error`` instead. A template that cannot be found or read is the whole command's error."""
    from llmgen.batch import Job

    if options.chat:
        from llmgen import chat as chats

        chats.load(ckpt.path, options.chat_template)
    jobs = []
    for rec in records:
        if rec.error is not None:
            continue
        try:
            gen = generation(
                ckpt, options.settings, rec.overrides, seed=rec.seed if rec.seed is not None else base_seed + rec.index,
                stop=options.stop, ignore_eos=options.ignore_eos, chat=options.chat,
            )
            ids = prompt_ids(ckpt, rec.prompt, options.truncate, gen.max_new_tokens, options.chat, options.system,
                             options.chat_template)
        except config.SettingError as e:
            rec.error = e.in_record()
            continue
        except LlmgenError as e:
            rec.error = str(e)
            continue
        jobs.append(Job(rec, ids, gen))
    return jobs
