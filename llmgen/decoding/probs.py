"""The next-token distribution, step by step along the path the sampler chooses.

For ``llmgen probs``: at each step the model's probabilities, the effect of temperature
and each filter, and which token was then chosen (argmax when greedy, else a seeded draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmgen.config import SamplingConfig
from llmgen.decoding.greedy_sample import check_prompt_fits
from llmgen.sampling import choose_next, explain, seen_tokens


@dataclass
class StepDistribution:
    step: int
    raw: list[float]
    tempered: list[float]
    final: list[float]
    removed_by: list[str | None]
    chosen: int


@torch.inference_mode()
def follow(
    model: torch.nn.Module, prompt_ids: list[int], cfg: SamplingConfig, steps: int, seed: int | None
) -> list[StepDistribution]:
    check_prompt_fits(len(prompt_ids), model.cfg.context_length)
    steps = min(steps, model.cfg.context_length - len(prompt_ids))
    device = next(model.parameters()).device
    gens = None if cfg.greedy else [torch.Generator(device).manual_seed(seed or 0)]
    seen = seen_tokens([prompt_ids], model.cfg.vocab_size, device) if cfg.repetition_penalty != 1.0 else None
    cache = model.new_cache(1, len(prompt_ids) + steps)
    logits = model(torch.tensor([prompt_ids], device=device), None, cache)[:, -1].float()
    out = []
    for step in range(steps):
        stages = explain(logits[0], cfg, seen[0] if seen is not None else None)
        chosen = choose_next(logits, cfg, gens, seen)
        out.append(
            StepDistribution(
                step,
                stages["raw"].tolist(),
                stages["tempered"].tolist(),
                stages["final"].tolist(),
                stages["removed_by"],
                int(chosen[0]),
            )
        )
        if step + 1 < steps:
            if seen is not None:
                seen[0, chosen] = True
            logits = model(chosen[:, None], None, cache)[:, -1].float()
    return out
