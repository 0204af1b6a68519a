"""Could this sampler have written this text? Each token's probability under the
sampler chain's final distribution, not the model's.

The text is fed through the model in the same sliding windows as ``scoring.score``,
and the chain is fed the text itself, token by token, exactly as a decode loop feeds it
the tokens it chose: the penalties and n-gram bans see the text's real history, random
stages (XTC) draw from the seed as they would while generating, and mirostat moves its
target as if it had drawn each token. A token the chain leaves no probability has the
stage that removed it; one such token makes the whole text impossible for the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmgen.config import SamplingConfig
from llmgen.sampling import build_sampler
from llmgen.scoring import Progress, Score, layout, passes, targets


@dataclass
class SamplerScore:
    """``probs[i]``: token i's probability under the sampler's final distribution (None
    where it has no context); ``removed_by[i]``: the stage that removed it, when that is
    0. ``score`` holds the model's own logprobs of the same tokens."""

    score: Score
    probs: list[float | None]
    removed_by: list[str | None]
    order: list[str]  # the stages that ran, terminal last
    seed: int | None

    @property
    def impossible(self) -> int:
        return sum(p == 0 for p in self.probs if p is not None)

    @property
    def logprob(self) -> float:
        """The text's log-probability under the sampler: -inf when any token is impossible."""
        if self.impossible:
            return -math.inf
        return sum(math.log(p) for p in self.probs if p is not None)

    def record(self) -> dict:
        """``score --json`` with the sampler's view added; ``sampler_logprob`` is null
        when the text is impossible (JSON has no -inf)."""
        logprob = self.logprob
        return {**self.score.record(), "sampler_probs": self.probs, "removed_by": self.removed_by,
                "impossible": self.impossible, "sampler_logprob": None if math.isinf(logprob) else logprob,
                "samplers": self.order, "seed": self.seed}


@torch.inference_mode()
def sampler_score(
    model: torch.nn.Module,
    token_ids: list[int],
    bos_token_id: int | None,
    cfg: SamplingConfig,
    seed: int | None,
    eos_token_ids: tuple[int, ...] = (),
    tokens=None,
    context: list[int] | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
    per_pass: int | None = None,
) -> SamplerScore:
    """Score the text under the model and under the chain for ``cfg`` (``seed`` for its
    random stages; ``eos_token_ids`` and ``tokens`` as for ``sampling.build_sampler``).
    The chain's prompt is what precedes the first scored token: BOS, or ``context``."""
    text = layout(token_ids, bos_token_id, model.cfg.context_length, context, stride)
    device = next(model.parameters()).device
    seed = None if cfg.greedy else (seed or 0)
    prompt = text.ids[: text.windows[0].first]
    sampler = build_sampler(cfg, [prompt], [seed], model.cfg.vocab_size, device, eos_token_ids, tokens)
    logprobs: list[float | None] = [None] * text.unscored
    probs, removed = list(logprobs), list(logprobs)
    for w, (logits,) in passes([model], text, per_pass, progress):
        index = targets(text.ids, w, logits.device)
        logprobs += torch.log_softmax(logits, -1).gather(-1, index[:, None])[:, 0].tolist()
        for row, token in enumerate(index.tolist()):  # one step of the chain per token, in order
            (p,), (why,) = sampler.judge(logits[row : row + 1], [token])
            sampler.accept([token])
            probs.append(p)
            removed.append(why)
    return SamplerScore(text.result(token_ids, logprobs), probs, removed, sampler.order, seed)
