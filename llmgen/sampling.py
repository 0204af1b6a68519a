"""The sampler chain: small pure functions from logits to filtered logits, then a draw.

Order (the same as transformers' logits processors, so that a filtered distribution
can be checked against the reference):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

Every filter takes logits of shape ``[batch, vocab]`` and returns new logits in which
removed tokens are ``-inf``; none of them renormalises, because softmax does that once
at the end. Ties are broken by token id (lower id ranks first) so that a filter keeps
the same set on every run and every device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmgen.config import SamplingConfig

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens that already occurred less likely (CTRL's penalty, as in transformers).

    ``seen`` is a boolean ``[batch, vocab]`` mask of tokens in the prompt or the output so
    far. A positive logit is divided by ``penalty`` and a negative one multiplied, so a
    penalty above 1 always lowers the token's probability relative to the unseen ones.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): T < 1 sharpens the distribution, T > 1 flattens it.

    T = 0 is greedy decoding and is handled by the caller with an argmax, never here.
    """
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy; take the argmax instead")
    return logits if temperature == 1.0 else logits / temperature


def _stable_order(logits: torch.Tensor) -> torch.Tensor:
    """Token ids sorted by descending logit, ties by ascending id."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices


def _keep_sorted_prefix(logits: torch.Tensor, order: torch.Tensor, keep_sorted: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, NEG_INF)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k most probable tokens (0 = off)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    order = _stable_order(logits)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(order)
    return _keep_sorted_prefix(logits, order, rank < k)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of the sorted distribution whose mass reaches p.

    A token is kept when the mass of the tokens ranked above it is still below p, so
    the most probable token always survives and the kept set is minimal.
    """
    if p >= 1.0:
        return logits
    order = _stable_order(logits)
    sorted_probs = torch.softmax(logits.gather(-1, order).float(), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return _keep_sorted_prefix(logits, order, mass_before < p)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def truncation_filters(cfg: SamplingConfig) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The filters that follow temperature, in chain order, each with the name ``explain`` shows."""
    return [
        ("top-k", lambda logits: top_k_filter(logits, cfg.top_k)),
        ("top-p", lambda logits: top_p_filter(logits, cfg.top_p)),
        ("min-p", lambda logits: min_p_filter(logits, cfg.min_p)),
    ]


def seen_tokens(prompts: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``[rows, vocab]`` mask of the tokens in each row's prompt: where the repetition
    penalty starts; decoding then marks each generated token too."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(prompts):
        seen[row, ids] = True
    return seen


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The whole chain up to (not including) the softmax, for a non-greedy config."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = apply_temperature(logits, cfg.temperature)
    for _, keep in truncation_filters(cfg):
        logits = keep(logits)
    return logits


def sampling_distribution(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The renormalised distribution a token is drawn from (one-hot for greedy)."""
    if cfg.greedy:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return torch.softmax(filter_logits(logits, cfg, seen).float(), dim=-1)


def choose_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generators: list[torch.Generator] | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax when greedy, else a draw with that row's generator.

    Each row has its own generator so that a row's text depends only on its seed, not on
    which other rows share the batch.
    """
    if cfg.greedy:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, cfg, seen).float(), dim=-1)
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError("sampling needs one generator per row")
    draws = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat(draws)


def explain(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> dict[str, torch.Tensor | list]:
    """Every stage of the chain for one row of logits ``[vocab]``, for showing to a person.

    Returns the model's probabilities, those after penalty and temperature, the final
    renormalised distribution a token is drawn from, and for each token the first
    filter that removed it (None if it survived).
    """
    logits = logits.float()[None]
    raw = torch.softmax(logits, dim=-1)[0]
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen[None], cfg.repetition_penalty)
    if cfg.greedy:
        final = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])[0].float()
        removed = ["greedy" if p == 0 else None for p in final.tolist()]
        return {"raw": raw, "tempered": torch.softmax(logits, -1)[0], "final": final, "removed_by": removed}
    tempered = apply_temperature(logits, cfg.temperature)
    removed: list[str | None] = [None] * logits.shape[-1]
    current = tempered
    for name, keep in truncation_filters(cfg):
        filtered = keep(current)
        for tok in torch.nonzero(torch.isfinite(current[0]) & ~torch.isfinite(filtered[0])).flatten().tolist():
            removed[tok] = name
        current = filtered
    final = torch.softmax(current, dim=-1)[0]
    return {"raw": raw, "tempered": torch.softmax(tempered, -1)[0], "final": final, "removed_by": removed}
