"""Teacher-forced scoring: how probable the model finds a given text, token by token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmgen.errors import LlmgenError


@dataclass
class Score:
    """``logprobs[i]`` is log p(token_ids[i] | everything before it); None where no
    context exists (the first token, when the model has no BOS token)."""

    token_ids: list[int]
    logprobs: list[float | None]

    @property
    def perplexity(self) -> float | None:
        scored = [lp for lp in self.logprobs if lp is not None]
        return math.exp(-sum(scored) / len(scored)) if scored else None


@torch.inference_mode()
def score(model: torch.nn.Module, token_ids: list[int], bos_token_id: int | None, context: list[int] | None = None) -> Score:
    """One forward pass over ``[BOS] + text``, or ``context + text`` (a chat prompt the
    text answers): the logits at position i predict token i + 1; only the text is scored."""
    if not token_ids:
        raise LlmgenError("nothing to score: the text is empty")
    prefix = list(context) if context else ([bos_token_id] if bos_token_id is not None else [])
    ids = prefix + token_ids
    if len(ids) > model.cfg.context_length:
        raise LlmgenError(f"the text is {len(ids)} tokens; the model's context is {model.cfg.context_length}")
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
    values: list[float | None] = logprobs.tolist()[max(0, len(prefix) - 1):]
    if not prefix:
        values = [None] + values
    return Score(token_ids=token_ids, logprobs=values)
