"""The logit lens: what the model would say next if it stopped after each layer.

The residual stream after layer l, put through the final norm and the LM head, is read
as a next-token distribution (nostalgebraist's "logit lens"). Early layers often
predict the current token or noise; the answer firms up layer by layer. The last row is
the model's own distribution. It works for every family because every model exposes
its residual stream and its head through the one interface (``llmgen.models``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmgen.decoding.greedy_sample import entropies
from llmgen.decoding.trace import Candidate
from llmgen.errors import UsageError


@dataclass
class LensRow:
    """One layer's reading: ``layer`` 0 is the embeddings, ``n_layer`` the model's output."""

    layer: int
    top: tuple[Candidate, ...]  # most probable first, logprobs
    entropy: float  # nats
    final_top_logprob: float  # the log-probability it gives the model's final answer


@dataclass
class Lens:
    position: int  # index into the prompt ids of the position read (0-based)
    rows: list[LensRow]


@torch.inference_mode()
def logit_lens(model: torch.nn.Module, ids: list[int], position: int = -1, top: int = 5) -> Lens:
    """Read every layer's residual stream at ``position`` (an index into ``ids``, negative
    from the end) through the model's head."""
    if not -len(ids) <= position < len(ids):
        raise UsageError(f"--position must be within the prompt's {len(ids)} tokens (1 to {len(ids)}, or -1 for the last)")
    if len(ids) > model.cfg.context_length:
        raise UsageError(f"the prompt is {len(ids)} tokens; the model's context is {model.cfg.context_length}")
    position %= len(ids)
    device = next(model.parameters()).device
    residuals: list[torch.Tensor] = []
    model(torch.tensor([ids[: position + 1]], device=device), residuals=residuals)
    stream = torch.cat([r[:, -1] for r in residuals])  # (layers + 1, C): the position read, after each layer
    logprobs = torch.log_softmax(model.head(stream[:, None])[:, 0].float(), dim=-1)  # (layers + 1, V)
    answer = int(logprobs[-1].argmax())
    best = logprobs.topk(min(top, logprobs.shape[-1]))
    rows = [
        LensRow(layer, tuple(Candidate(t, lp) for t, lp in zip(idx, val)), h, final)
        for layer, (idx, val, h, final) in enumerate(zip(best.indices.tolist(), best.values.tolist(),
                                                         entropies(logprobs).tolist(), logprobs[:, answer].tolist()))
    ]
    return Lens(position, rows)
