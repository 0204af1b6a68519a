"""Stages that remove unlikely tokens (set them to ``-inf``) and leave the rest untouched.

Each keeps at least the most probable token, so no stage can empty the distribution.
Ties are broken by token id: a lower id ranks first.
"""

from __future__ import annotations

import torch

from llmgen.sampling.stage import NEG_INF, Rows, Stage, keep_sorted, stable_order


class Truncation(Stage):
    """A stage that only removes tokens (``explain`` counts no logit it leaves as changed)."""

    truncates = True


class TopK(Truncation):
    """Keep exactly the k most probable tokens."""

    name = "top-k"

    def __init__(self, k: int) -> None:
        self.k = k

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        # The first k of a stable descending sort, without sorting the vocabulary: every
        # token above the k-th largest logit, then the lowest ids among those equal to it.
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        above, tied = logits > kth, logits == kth
        room = self.k - above.sum(-1, keepdim=True)
        return logits.masked_fill(~(above | (tied & (tied.cumsum(-1) <= room))), NEG_INF)


class TopP(Truncation):
    """Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches p.

    A token is kept while the mass ranked above it is still below p, so the most
    probable token always survives and the kept set is minimal. The mass is summed in
    sorted order, as transformers does: on a flat distribution over 50k tokens another
    summation order moves the boundary by a token or two.
    """

    name = "top-p"

    def __init__(self, p: float) -> None:
        self.p = p

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        order = stable_order(logits)
        sorted_probs = torch.softmax(logits.gather(-1, order), dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = mass_before < self.p
        keep[..., 0] = True  # the top token, even when p is below float32's smallest (1e-308 compares as 0)
        return keep_sorted(logits, order, keep)


class MinP(Truncation):
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""

    name = "min-p"

    def __init__(self, min_p: float) -> None:
        self.min_p = min_p

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        threshold = self.min_p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, NEG_INF)


class Typical(Truncation):
    """Locally typical sampling (Meister et al.), as transformers' ``TypicalLogitsWarper``:
    rank tokens by how close their surprise -log p is to the entropy, keep the closest
    until their mass reaches p, and keep every token tied with the last one kept."""

    name = "typical"

    def __init__(self, mass: float) -> None:
        self.mass = mass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        distance = (-logp - entropy).abs()
        sorted_distance, order = torch.sort(distance, dim=-1, stable=True)
        mass = torch.softmax(logits.gather(-1, order), dim=-1).cumsum(-1)
        last = (mass < self.mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        keep = sorted_distance <= sorted_distance.gather(-1, last)
        keep[..., 0] = True
        return keep_sorted(logits, order, keep)


class Epsilon(Truncation):
    """Epsilon sampling (Hewitt et al.), as transformers' ``EpsilonLogitsWarper``: drop
    tokens whose probability is below ``epsilon``, always keeping the most probable."""

    name = "epsilon"

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        return _drop_below(logits, probs < self.epsilon)


class Eta(Truncation):
    """Eta sampling (Hewitt et al.), as transformers' ``EtaLogitsWarper``: the cutoff is
    ``min(eta, sqrt(eta) * exp(-entropy))``, so it loosens as the model grows unsure."""

    name = "eta"

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).nansum(-1, keepdim=True)
        cutoff = torch.clamp(self.eta**0.5 * torch.exp(-entropy), max=self.eta)
        return _drop_below(logits, probs < cutoff)


def _drop_below(logits: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """Mask the ``below`` tokens, except each row's most probable one."""
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(below & (logits < top), NEG_INF)


class TopNSigma(Truncation):
    """Top-n-sigma (Tang et al.), as llama.cpp: keep tokens whose logit is within n
    standard deviations of the largest. The mean and population deviation are over the
    tokens still in play, so the kept set does not depend on temperature."""

    name = "top-n-sigma"

    def __init__(self, n: float) -> None:
        self.n = n

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        live = torch.isfinite(logits)
        count = live.sum(-1, keepdim=True).clamp(min=1)
        values = torch.where(live, logits, torch.zeros_like(logits))
        mean = values.sum(-1, keepdim=True) / count
        std = (torch.where(live, logits - mean, torch.zeros_like(logits)) ** 2).sum(-1, keepdim=True).div(count).sqrt()
        top = logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(logits < top - self.n * std, NEG_INF)


class XTC(Truncation):
    """Exclude Top Choices, as llama.cpp: with probability ``probability`` per step,
    remove every token at or above ``threshold`` except the least probable of them, so
    the text leaves its most predictable path while staying coherent. It needs at least
    two tokens above the threshold to act.

    Each row draws one uniform number per step (when two or more tokens are in play)
    from its own generator, seeded from the row's seed but apart from the draw's."""

    name = "xtc"
    draws = True

    def __init__(self, rows: Rows, probability: float, threshold: float) -> None:
        self.probability, self.threshold = probability, threshold
        self.generators = rows.generators(salt=XTC_SALT)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        live = torch.isfinite(logits).sum(-1).tolist()
        fire = [n >= 2 and torch.rand(1, generator=g, device=g.device).item() <= self.probability for n, g in zip(live, self.generators)]
        if not any(fire):
            return logits
        # (tokens already removed have probability 0, which a threshold of 0 would count)
        above = (probs >= self.threshold) & torch.isfinite(logits) & torch.tensor(fire, device=logits.device)[:, None]
        # The least probable token above the threshold survives: the lowest logit among
        # them, and of equals the highest id (the last of them in stable descending order).
        lowest = torch.where(above, logits, torch.inf).min(-1, keepdim=True).values
        ids = torch.arange(logits.shape[-1], device=logits.device)
        survivor = torch.where(above & (logits == lowest), ids, -1).max(-1, keepdim=True).values
        remove = above & (ids != survivor) & (above.sum(-1, keepdim=True) >= 2)
        return logits.masked_fill(remove, NEG_INF)

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]


XTC_SALT = 0x58544321  # "XTC!": XTC's generator must not replay the draw's stream
