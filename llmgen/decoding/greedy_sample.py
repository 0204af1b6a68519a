"""Greedy decoding and sampling: one token per step per row, fed back through the KV cache.

The prompt is prefilled once; each later step runs the model on the single newest token
of every row. Rows are independent continuations of the same prompt (``num_samples``),
each with its own generator seeded ``seed + row`` so that sample *i* of a run can be
reproduced on its own with ``--seed seed+i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmgen.config import GenerationConfig
from llmgen.decoding.trace import Candidate, Sample, Step
from llmgen.errors import LlmgenError
from llmgen.sampling import choose_next
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
    context = model.cfg.context_length
    check_prompt_fits(len(prompt_ids), context)
    cfg = gen.sampling
    rows = gen.num_samples
    max_new = min(gen.max_new_tokens, context - len(prompt_ids))
    device = next(model.parameters()).device

    generators = None
    if not cfg.greedy:
        if gen.seed is None:
            raise ValueError("sampling needs a seed; resolve one before calling generate")
        generators = [torch.Generator(device).manual_seed(gen.seed + i) for i in range(rows)]
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(rows, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[:, prompt_ids] = True

    samples = [Sample(seed=None if cfg.greedy else gen.seed + i) for i in range(rows)]
    texts = [ContinuationText(decode, gen.stop) for _ in range(rows)]
    stop_ids = set(gen.stop_token_ids)

    cache = model.new_cache(rows, len(prompt_ids) + max_new)
    input_ids = torch.tensor([prompt_ids] * rows, device=device)
    logits = model(input_ids, None, cache)[:, -1].float()
    for step in range(max_new):
        next_ids = choose_next(logits, cfg, generators, seen)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, next_ids[:, None])[:, 0].tolist()
        top = logprobs.topk(min(trace_top, logprobs.shape[-1])) if trace_top else None
        for row, (sample, text, token) in enumerate(zip(samples, texts, next_ids.tolist())):
            if sample.finish_reason is not None:
                continue
            sample.token_ids.append(token)
            sample.logprobs.append(chosen[row])
            if top is not None:
                alts = tuple(Candidate(t, lp) for t, lp in zip(top.indices[row].tolist(), top.values[row].tolist()))
                sample.steps.append(Step(token, chosen[row], alts))
            delta = ""
            if token in stop_ids:
                sample.finish_reason = "eos"
            else:
                delta, stopped = text.push(token)
                if stopped:
                    sample.finish_reason = "stop"
            if sample.finish_reason is None and step + 1 == max_new:
                sample.finish_reason = "length"
            if sample.finish_reason is not None:
                delta += text.flush()
            if on_text is not None and delta:
                on_text(row, delta)
        if all(s.finish_reason is not None for s in samples):
            break
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits = model(next_ids[:, None], None, cache)[:, -1].float()
    for sample, text in zip(samples, texts):
        sample.text = text.text
    return samples
