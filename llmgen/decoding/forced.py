"""What the model thought at each step of a continuation it was handed rather than one
it sampled: beam's and exact search's answers come out of a search, not out of a
decode loop that records alternatives, so their per-step entropy and best alternatives
are read back with one teacher-forced pass over prompt + continuation."""

from __future__ import annotations

import torch

from llmgen.decoding.greedy_sample import entropies
from llmgen.decoding.trace import Candidate


@torch.inference_mode()
def forced_steps(model: torch.nn.Module, prompt_ids: list[int], token_ids: list[int], top: int = 0, grammar=None
                 ) -> tuple[list[float], list[tuple[Candidate, ...]], list[float]]:
    """For each token of ``token_ids``: the entropy (nats) of the model's distribution it
    was chosen from, that distribution's ``top`` most probable tokens, and (under a
    constraint's ``grammar``) the log of the probability the constraint kept of it."""
    if not token_ids:
        return [], [], []
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + token_ids], device=device)
    # position p predicts token p + 1: the continuation's tokens are predicted from the
    # last prompt position up to the one before the last token
    logits = model(ids)[0, len(prompt_ids) - 1 : -1].float()  # (len(token_ids), vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    tops: list[tuple[Candidate, ...]] = [()] * len(token_ids)
    if top:
        best = logprobs.topk(min(top, logprobs.shape[-1]))
        tops = [tuple(Candidate(t, lp) for t, lp in zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    return entropies(logprobs).tolist(), tops, _kept(grammar, logprobs, token_ids) if grammar is not None else []


def _kept(grammar, logprobs: torch.Tensor, token_ids: list[int]) -> list[float]:
    """The log of the mass a constraint kept at each step, its matcher fed the tokens in turn."""
    from llmgen.sampling.grammar import allowed_tokens

    m, out = grammar.matcher(), []
    for row, token in zip(logprobs, token_ids):
        allowed = allowed_tokens(grammar, [m], row.shape[-1], row.device)[0]
        out.append(float(torch.logsumexp(row.masked_fill(~allowed, float("-inf")), -1)))
        m.consume_token(token)
    return out
