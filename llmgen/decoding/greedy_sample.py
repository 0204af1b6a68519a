"""Greedy decoding and sampling: one token per step per row, fed back through the KV cache.

The prompts are prefilled once; each later step runs the model on the single newest
token of every live row. Each row has its own generator, so its text depends only on
its seed: sample *i* of ``--num-samples`` uses ``seed + i`` and can be reproduced alone
with ``--seed seed+i``, and a batch record gives the same text whatever shares its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmgen.cache import check_rows, pad, positions_from_mask
from llmgen.config import GenerationConfig
from llmgen.decoding.trace import Candidate, Sample, Step, Timings
from llmgen.errors import LlmgenError
from llmgen.sampling import build_sampler
from llmgen.text import ContinuationText

# Called for every chosen token with (row, token id, its logprob, the text that became
# safe to show with it, often ""), for streaming.
# (row, token, its logprob, the entropy it was chosen from, the text it made safe to show)
OnToken = Callable[[int, int, float, float, str], None]


def check_prompt_fits(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise LlmgenError("the prompt is empty and the model has no BOS token to start from")
    if n_prompt >= context:
        raise LlmgenError(f"the prompt is {n_prompt} tokens; the model's context is {context}, leaving no room to generate")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    gen: GenerationConfig,
    decode: Callable[[list[int]], str],
    on_token: OnToken | None = None,
    trace_top: int = 0,
    timings: Timings | None = None,
) -> list[Sample]:
    """Continue ``prompt_ids`` ``gen.num_samples`` times; ``trace_top`` > 0 records that many
    alternatives per step; ``timings``, when given, is filled in."""
    check_rows(model, gen.num_samples, len(prompt_ids), gen.max_new_tokens)
    seeds = [None if gen.sampling.greedy else need_seed(gen) + i for i in range(gen.num_samples)]
    rows = [Row(prompt_ids, seed, gen.max_new_tokens) for seed in seeds]
    return generate_batch(model, rows, gen, decode, on_token, trace_top, timings)


@dataclass(frozen=True)
class Row:
    """One continuation to generate in a batch: its prompt, seed and length limit."""

    prompt_ids: list[int]
    seed: int | None
    max_new_tokens: int


def need_seed(gen: GenerationConfig) -> int:
    if gen.seed is None:
        raise ValueError("sampling needs a seed; resolve one before calling generate")
    return gen.seed


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    rows: list[Row],
    gen: GenerationConfig,
    decode: Callable[[list[int]], str],
    on_token: OnToken | None = None,
    trace_top: int = 0,
    timings: Timings | None = None,
    cache=None,
    cached: int = 0,
) -> list[Sample]:
    """Continue several prompts at once with one sampling config.

    Prompts of different lengths are left-padded; the cache masks the padding and
    position ids count from each row's first real token, so every row produces what it
    would alone. A row that finishes leaves the batch (its cache row is dropped), so the
    remaining steps cost only what the live rows need. Given a ``cache`` holding the first
    ``cached`` ids of a single row, only the rest is prefilled, and the continuation is
    written on into that cache.
    """
    last = last_steps(rows, model.cfg.context_length)
    device = next(model.parameters()).device
    clock = Clock(timings, device)

    greedy = gen.sampling.greedy
    sampler = build_sampler(
        gen.sampling, [r.prompt_ids for r in rows], [None if greedy else r.seed for r in rows], model.cfg.vocab_size, device,
        gen.stop_token_ids, gen.tokens,
    )
    samples = [Sample(seed=None if greedy else r.seed) for r in rows]
    texts = [ContinuationText(decode, gen.stop) for _ in rows]
    stop_ids = set(gen.stop_token_ids)

    cache, logits, next_pos = _prefill(model, rows, max(n for n, _ in last), device, cache, cached)
    clock.prefilled(rows)
    live = list(range(len(rows)))  # which original row each cache row holds
    step = 0
    while live:
        next_ids = sampler.choose(logits)
        tokens = next_ids.tolist()
        clock.chose()
        sampler.accept(tokens)
        note_constraint(sampler, [samples[row] for row in live])
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, next_ids[:, None])[:, 0].tolist()
        entropy = entropies(logprobs).tolist()
        top = logprobs.topk(min(trace_top, logprobs.shape[-1])) if trace_top else None
        keep = []
        for slot, (row, token) in enumerate(zip(live, tokens)):
            at_limit = last[row][1] if step + 1 == last[row][0] else None
            samples[row].entropies.append(entropy[slot])
            delta = record_token(samples[row], texts[row], token, chosen[slot], alternatives(top, slot), stop_ids, at_limit, sampler.complete(slot))
            if samples[row].finish_reason is None:
                keep.append(slot)
            if on_token is not None:
                on_token(row, token, chosen[slot], entropy[slot], delta)
        step += 1
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            next_ids, next_pos = next_ids[index], next_pos[index]
            sampler.keep(keep)
            live = [live[i] for i in keep]
        logits = model(next_ids[:, None], next_pos, cache)[:, -1].float()
        next_pos = next_pos + 1
    for sample, text in zip(samples, texts):
        sample.text = text.text
    clock.done(samples)
    return samples


def note_constraint(sampler, samples: list[Sample]) -> None:
    """Each live row's ``constraint_kept`` for the step just chosen, when a constraint ran."""
    kept = sampler.constraint_kept()
    if kept is not None:
        for sample, k in zip(samples, kept):
            sample.constraint_kept.append(k)


def entropies(logprobs: torch.Tensor) -> torch.Tensor:
    """Each row's entropy in nats, ``(rows,)``, from its log-probabilities: how unsure the
    model was before choosing (0 when one token has it all; ln |V| when all are equal)."""
    return torch.special.entr(logprobs.exp()).sum(-1)


def last_steps(rows: list[Row], context: int) -> list[tuple[int, str]]:
    """Each row's last allowed step and the finish reason it gives: ``length`` when
    max_new_tokens ends the row, ``context`` when the context runs out first."""
    out = []
    for r in rows:
        check_prompt_fits(len(r.prompt_ids), context)
        room = context - len(r.prompt_ids)
        out.append((min(r.max_new_tokens, room), "context" if room < r.max_new_tokens else "length"))
    return out


def _prefill(model, rows: list[Row], room: int, device, cache=None, cached: int = 0):
    """Every prompt through the model at once; returns the cache, the logits for each
    row's first new token, and the position that token takes. Prompts are left-padded
    into a new cache with ``room`` slots to spare; or, given a ``cache`` holding the
    first ``cached`` ids of a single row, only the rest of that row is run."""
    ids, mask = pad([r.prompt_ids for r in rows], left=True)
    ids, mask = ids.to(device), mask.to(device)
    if cache is None:
        cache = model.new_cache(len(rows), ids.shape[1] + room)
        cache.set_padding(mask)
        positions = positions_from_mask(mask)
        logits = model(ids, positions, cache)
    else:
        cache.length = cached
        positions = torch.arange(cached, ids.shape[1], device=device)[None]
        logits = model(ids[:, cached:], positions, cache)
    return cache, logits[:, -1].float(), positions[:, -1:] + 1


def alternatives(top, slot: int) -> tuple[Candidate, ...] | None:
    """One row's best candidates when tracing (``top`` from ``topk``), else None."""
    if top is None:
        return None
    return tuple(Candidate(t, lp) for t, lp in zip(top.indices[slot].tolist(), top.values[slot].tolist()))


class Clock:
    """Fills ``timings``, when asked for them, at the phases llama.cpp reports: the
    prefill, the first chosen token, the end."""

    def __init__(self, timings: Timings | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self.started = time.perf_counter()
        self.first: float | None = None

    def prefilled(self, rows: list[Row]) -> None:
        if self.timings is not None:
            _sync(self.device)
            self.timings.prompt_tokens = sum(len(r.prompt_ids) for r in rows)
            self.timings.prompt_seconds = time.perf_counter() - self.started

    def chose(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def done(self, samples: list[Sample]) -> None:
        if self.timings is not None:
            self.timings.first_token_seconds = self.first - self.started
            self.timings.generated_tokens = sum(len(s.token_ids) for s in samples)
            self.timings.generation_seconds = time.perf_counter() - self.first


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timestamp marks work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_token(sample: Sample, text: ContinuationText, token: int, logprob: float, alts, stop_ids, at_limit: str | None,
                 complete: bool = False) -> str:
    """Append one chosen token to its sample (with its ``alts`` when tracing, else None)
    and say whether it finished (``at_limit``: the finish reason if this was its last
    allowed token; ``complete``: the constraint finished the text, with this token or by
    taking EOS); returns the text that became safe to show."""
    sample.token_ids.append(token)
    sample.logprobs.append(logprob)
    if alts is not None:
        sample.steps.append(Step(token, logprob, alts))
    delta = ""
    if complete:
        sample.finish_reason = "constraint"
        if token not in stop_ids:
            delta, _ = text.push(token)
    elif token in stop_ids:
        sample.finish_reason = "eos"
    else:
        delta, stopped = text.push(token)
        if stopped:
            sample.finish_reason = "stop"
    if sample.finish_reason is None and at_limit:
        sample.finish_reason = at_limit
    if sample.finish_reason is not None:
        delta += text.flush()
    return delta
