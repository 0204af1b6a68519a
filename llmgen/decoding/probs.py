"""The next-token distribution, step by step along the path the sampler chooses.

For ``llmgen probs``: at each step the sampler chain explains itself (what each stage
removed or moved) while it chooses the token to follow, in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmgen.config import SamplingConfig
from llmgen.decoding.greedy_sample import check_prompt_fits
from llmgen.sampling import build_sampler


@dataclass
class StepDistribution:
    step: int
    raw: list[float]
    tempered: list[float]
    final: list[float]
    removed_by: Sequence[str | None]  # the chain's RemovedBy: a stage's name per token, named when read
    chosen: int
    order: list[str] = field(default_factory=list)  # the stages that ran, terminal last
    changed_by: dict[int, list[str]] = field(default_factory=dict)

    @property
    def constraint_kept(self) -> float | None:
        """The log of the model's probability of the tokens a constraint allowed (None without one)."""
        if "constraint" not in self.order:
            return None
        return math.log(max(sum(p for p, stage in zip(self.raw, self.removed_by) if stage != "constraint"), 1e-300))


@torch.inference_mode()
def follow(
    model: torch.nn.Module,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    steps: int,
    seed: int | None,
    eos_token_ids: tuple[int, ...] = (),
    tokens=None,
) -> list[StepDistribution]:
    """``steps`` explained steps after ``prompt_ids``; ``eos_token_ids`` and ``tokens`` as
    for ``sampling.build_sampler``."""
    check_prompt_fits(len(prompt_ids), model.cfg.context_length)
    steps = min(steps, model.cfg.context_length - len(prompt_ids))
    device = next(model.parameters()).device
    seed = None if cfg.greedy else (seed or 0)
    sampler = build_sampler(cfg, [prompt_ids], [seed], model.cfg.vocab_size, device, eos_token_ids, tokens)
    cache = model.new_cache(1, len(prompt_ids) + steps)
    logits = model(torch.tensor([prompt_ids], device=device), None, cache)[:, -1].float()
    out = []
    for step in range(steps):
        chosen, (why,) = sampler.explain(logits)
        sampler.accept(chosen)
        out.append(
            StepDistribution(
                step, why.raw.tolist(), why.tempered.tolist(), why.final.tolist(), why.removed_by, int(chosen[0]),
                why.order, why.changed_by,
            )
        )
        if step + 1 < steps:
            logits = model(chosen[:, None], None, cache)[:, -1].float()
    return out
