"""Greedy decoding and sampling: one token per step per row, fed back through the KV cache.

The prompts are prefilled once; each later step runs the model on the single newest
token of every live row. Each row has its own generator, so its text depends only on
its seed: sample *i* of ``--num-samples`` uses ``seed + i`` and can be reproduced alone
with ``--seed seed+i``, and a batch record gives the same text whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmgen.cache import pad, positions_from_mask
from llmgen.config import GenerationConfig
from llmgen.decoding.trace import Candidate, Sample, Step
from llmgen.errors import LlmgenError
from llmgen.sampling import choose_next, seen_tokens
from llmgen.text import ContinuationText

# Called with (row, newly safe text) as a continuation grows, for streaming.
OnText = Callable[[int, str], None]


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
    on_text: OnText | None = None,
    trace_top: int = 0,
) -> list[Sample]:
    """Continue ``prompt_ids`` ``gen.num_samples`` times; ``trace_top`` > 0 records that many
    alternatives per step."""
    seeds = [None if gen.sampling.greedy else _need_seed(gen) + i for i in range(gen.num_samples)]
    rows = [Row(prompt_ids, seed, gen.max_new_tokens) for seed in seeds]
    return generate_batch(model, rows, gen, decode, on_text, trace_top)


@dataclass(frozen=True)
class Row:
    """One continuation to generate in a batch: its prompt, seed and length limit."""

    prompt_ids: list[int]
    seed: int | None
    max_new_tokens: int


def _need_seed(gen: GenerationConfig) -> int:
    if gen.seed is None:
        raise ValueError("sampling needs a seed; resolve one before calling generate")
    return gen.seed


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    rows: list[Row],
    gen: GenerationConfig,
    decode: Callable[[list[int]], str],
    on_text: OnText | None = None,
    trace_top: int = 0,
) -> list[Sample]:
    """Continue several prompts at once with one sampling config.

    Prompts of different lengths are left-padded; the cache masks the padding and
    position ids count from each row's first real token, so every row produces what it
    would alone. A row that finishes leaves the batch (its cache row is dropped), so
    the remaining steps cost only what the live rows need.
    """
    cfg = gen.sampling
    context = model.cfg.context_length
    for row in rows:
        check_prompt_fits(len(row.prompt_ids), context)
    limits = [min(r.max_new_tokens, context - len(r.prompt_ids)) for r in rows]
    device = next(model.parameters()).device
    ids, mask = pad([r.prompt_ids for r in rows], left=True)
    ids, mask = ids.to(device), mask.to(device)
    width = ids.shape[1]

    generators = None
    if not cfg.greedy:
        if any(r.seed is None for r in rows):
            raise ValueError("sampling needs a seed per row")
        generators = [torch.Generator(device).manual_seed(r.seed) for r in rows]
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = seen_tokens([r.prompt_ids for r in rows], model.cfg.vocab_size, device)

    samples = [Sample(seed=None if cfg.greedy else r.seed) for r in rows]
    texts = [ContinuationText(decode, gen.stop) for _ in rows]
    stop_ids = set(gen.stop_token_ids)

    cache = model.new_cache(len(rows), width + max(limits))
    cache.set_padding(mask)
    positions = positions_from_mask(mask)
    logits = model(ids, positions, cache)[:, -1].float()
    next_pos = positions[:, -1:] + 1
    live = list(range(len(rows)))  # which original row each cache row holds
    step = 0
    while live:
        next_ids = choose_next(logits, cfg, generators, seen)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, next_ids[:, None])[:, 0].tolist()
        top = logprobs.topk(min(trace_top, logprobs.shape[-1])) if trace_top else None
        keep = []
        for slot, (row, token) in enumerate(zip(live, next_ids.tolist())):
            sample, text = samples[row], texts[row]
            sample.token_ids.append(token)
            sample.logprobs.append(chosen[slot])
            if top is not None:
                alts = tuple(Candidate(t, lp) for t, lp in zip(top.indices[slot].tolist(), top.values[slot].tolist()))
                sample.steps.append(Step(token, chosen[slot], alts))
            delta = ""
            if token in stop_ids:
                sample.finish_reason = "eos"
            else:
                delta, stopped = text.push(token)
                if stopped:
                    sample.finish_reason = "stop"
            if sample.finish_reason is None and step + 1 == limits[row]:
                sample.finish_reason = "length"
            if sample.finish_reason is not None:
                delta += text.flush()
            else:
                keep.append(slot)
            if on_text is not None and delta:
                on_text(row, delta)
        step += 1
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            next_ids, next_pos = next_ids[index], next_pos[index]
            seen = seen[index] if seen is not None else None
            generators = [generators[i] for i in keep] if generators is not None else None
            live = [live[i] for i in keep]
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits = model(next_ids[:, None], next_pos, cache)[:, -1].float()
        next_pos = next_pos + 1
    for sample, text in zip(samples, texts):
        sample.text = text.text
    return samples
