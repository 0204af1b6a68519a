"""Exact search: the provably most probable continuation, without enumerating |V|^N.

A sequence's log-probability is a sum of non-positive terms, so extending a partial
sequence can never make it more probable. Best-first search on cumulative
log-probability therefore finds the optimum: when the most probable entry in the
frontier is a complete sequence (ended by EOS or at N tokens), nothing left can beat it.

Two things make it practical. The greedy continuation is a complete sequence found up
front; any child less probable than the best complete sequence known is never queued
(branch and bound). And the frontier's best nodes are expanded together, several
sequences per model call.

``max_expansions`` bounds the work; past it the best complete sequence found is
returned with ``proven=False``.
"""

from __future__ import annotations

import math

import heapq
from dataclasses import dataclass, field

import torch

from llmgen.cache import pad
from llmgen.config import GenerationConfig, SamplingConfig, require
from llmgen.decoding.greedy_sample import check_prompt_fits, generate
from llmgen.decoding.trace import SearchTree


@dataclass(frozen=True)
class ExactConfig:
    max_new_tokens: int = 5
    eos_token_ids: tuple[int, ...] = ()
    max_expansions: int = 2000
    batch: int = 16  # frontier nodes expanded per model call

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.max_expansions >= 1, f"--max-expansions must be >= 1, got {self.max_expansions}")
        require(self.batch >= 1, f"batch must be >= 1, got {self.batch}")


@dataclass
class ExactResult:
    token_ids: list[int]
    logprobs: list[float]
    expanded: int  # partial sequences whose next-token distribution was computed
    proven: bool
    brute_force_log10: float  # log10 of the sequences brute force would score: sum of |V|^n, n <= N
    finish_reason: str
    tree: SearchTree = field(default_factory=SearchTree)

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)


def brute_force_log10(vocab: int, n: int) -> float:
    """log10 of sum(|V|^k, k = 1..N), as a logarithm because the count itself has thousands
    of digits at -n 1000: more than a float holds, or Python prints by default."""
    if vocab == 1:
        return math.log10(n)
    # the sum is V (V^N - 1) / (V - 1)
    return math.log10(vocab) + n * math.log10(vocab) + math.log1p(-(vocab ** -float(n))) / math.log(10) - math.log10(vocab - 1)


@torch.inference_mode()
def exact_search(model: torch.nn.Module, prompt_ids: list[int], cfg: ExactConfig, decode=None) -> ExactResult:
    context = model.cfg.context_length
    check_prompt_fits(len(prompt_ids), context)
    n = min(cfg.max_new_tokens, context - len(prompt_ids))
    eos = set(cfg.eos_token_ids)
    device = next(model.parameters()).device
    tree = SearchTree()
    root = tree.add(None, None, 0.0, 0.0, 0, "root")

    # Incumbent: the greedy continuation, a complete sequence to bound the search from the start.
    gen = GenerationConfig(max_new_tokens=n, eos_token_ids=cfg.eos_token_ids, sampling=SamplingConfig(temperature=0))
    greedy = generate(model, prompt_ids, gen, decode or (lambda ids: ""))[0]
    best_ids, best_lps = greedy.token_ids, greedy.logprobs
    best_total, best_node = sum(best_lps), None

    # Frontier entries: (-cumulative, tie-break counter, token ids, logprobs, node id)
    frontier: list[tuple[float, int, list[int], list[float], int]] = [(0.0, 0, [], [], root.id)]
    counter, expanded = 1, 0
    while frontier and -frontier[0][0] > best_total and expanded < cfg.max_expansions:
        batch = [heapq.heappop(frontier) for _ in range(min(cfg.batch, len(frontier), cfg.max_expansions - expanded))]
        batch = [b for b in batch if -b[0] > best_total]
        if not batch:
            break
        expanded += len(batch)
        for (neg, _, ids, lps, node_id), row in zip(batch, _next_logprobs(model, prompt_ids, [b[2] for b in batch], device)):
            tree.nodes[node_id].status = "kept"
            cumulative = -neg
            # Only children that could still beat the incumbent are worth a node or a queue slot.
            candidates = torch.nonzero(row + cumulative > best_total).flatten().tolist()
            for tok in candidates:
                lp = row[tok].item()
                total = cumulative + lp
                if total <= best_total:
                    continue
                child = tree.add(node_id, tok, lp, total, len(ids) + 1, "pruned")
                if tok in eos or len(ids) + 1 == n:
                    best_ids, best_lps, best_total, best_node = ids + [tok], lps + [lp], total, child.id
                else:
                    heapq.heappush(frontier, (-total, counter, ids + [tok], lps + [lp], child.id))
                    counter += 1
    proven = not frontier or -frontier[0][0] <= best_total
    if best_node is None:  # greedy was optimal: find (or add) its path in the tree
        children = tree.children()
        parent, total = root.id, 0.0
        for depth, (tok, lp) in enumerate(zip(best_ids, best_lps), 1):
            total += lp
            known = next((n for n in children.get(parent, []) if n.token_id == tok), None)
            parent = known.id if known else tree.add(parent, tok, lp, total, depth, "kept").id
        best_node = parent
    tree.nodes[best_node].status = "finished"
    tree.best_path = tree.path_to(best_node)
    finish = "eos" if best_ids and best_ids[-1] in eos else "length"
    return ExactResult(best_ids, best_lps, expanded, proven, brute_force_log10(model.cfg.vocab_size, n), finish, tree)


def _next_logprobs(model, prompt_ids, continuations, device) -> torch.Tensor:
    """Next-token log-probabilities after prompt + each continuation, in one right-padded batch."""
    seqs = [prompt_ids + c for c in continuations]
    ids, mask = pad(seqs, left=False)
    logits = model(ids.to(device), attention_mask=mask.to(device)).float()
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    return torch.log_softmax(logits[torch.arange(len(seqs), device=device), last], dim=-1).cpu()
