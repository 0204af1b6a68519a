"""Exact search: the provably most probable continuation, without enumerating |V|^N.

A sequence's log-probability is a sum of non-positive terms, so extending a partial
sequence can never make it more probable. Best-first search on cumulative
log-probability therefore finds the optimum: when the most probable entry in the
frontier is a complete sequence (ended by EOS or at N tokens), nothing left can beat it.

Two things make it practical. The greedy continuation is a complete sequence found up
front; any child less probable than the best complete sequence known is never queued
(branch and bound). And the frontier's best nodes are expanded together, several
sequences per model call.

The same search gives the K most probable sequences (``top``): it keeps the K best
complete sequences found, bounds by the K-th of them, and goes on until no open partial
sequence could still beat it. A sequence is proven when every open partial sequence is
already less probable than it, so ranks are proven best first. For K > 1 a beam search of
width K joins greedy in finding K complete sequences up front, or nothing could be
pruned until K had turned up.

``max_expansions`` bounds the work; past it the best complete sequences found are
returned, each saying whether it is proven.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmgen.cache import pad
from llmgen.config import GenerationConfig, SamplingConfig, require
from llmgen.decoding.greedy_sample import check_prompt_fits, generate
from llmgen.decoding.trace import SearchTree
from llmgen.errors import LlmgenError
from llmgen.sampling.grammar import allowed_tokens

MAX_TOP = 1000  # K seeds a beam of width K: past this its bookkeeping, not the model, is the cost


@dataclass(frozen=True)
class ExactConfig:
    max_new_tokens: int = 5
    eos_token_ids: tuple[int, ...] = ()
    max_expansions: int = 2000
    batch: int = 16  # frontier nodes expanded per model call
    top: int = 1  # K: the K most probable complete sequences
    grammar: Any = None  # constraint.Grammar: search only the tokens it allows; complete = a string it accepts

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.max_expansions >= 1, f"--max-expansions must be >= 1, got {self.max_expansions}")
        require(self.batch >= 1, f"batch must be >= 1, got {self.batch}")
        require(1 <= self.top <= MAX_TOP, f"--top must be between 1 and {MAX_TOP}, got {self.top}")


@dataclass
class Ranked:
    """One of the K most probable complete sequences. ``proven``: every partial sequence
    still open is less probable than it (or none is left), so nothing unseen can rank above it."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    proven: bool

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)


@dataclass
class ExactResult:
    """The K most probable complete sequences, best first (fewer when fewer exist, or the
    budget ran out before K were found); the fields of one sequence are the first's."""

    hypotheses: list[Ranked]
    expanded: int  # partial sequences whose next-token distribution was computed
    brute_force_log10: float  # log10 of the sequences brute force would score: sum of |V|^n, n <= N
    tree: SearchTree = field(default_factory=SearchTree)

    @property
    def token_ids(self) -> list[int]:
        return self.hypotheses[0].token_ids

    @property
    def logprobs(self) -> list[float]:
        return self.hypotheses[0].logprobs

    @property
    def logprob(self) -> float:
        return self.hypotheses[0].logprob

    @property
    def finish_reason(self) -> str:
        return self.hypotheses[0].finish_reason

    @property
    def proven(self) -> bool:
        return self.hypotheses[0].proven

    @property
    def mass(self) -> float:
        """The probability the sequences cover together: all of it once every complete sequence is listed."""
        return sum(math.exp(h.logprob) for h in self.hypotheses)


def brute_force_log10(vocab: int, n: int) -> float:
    """log10 of sum(|V|^k, k = 1..N), as a logarithm because the count itself has thousands
    of digits at -n 1000: more than a float holds, or Python prints by default."""
    if vocab == 1:
        return math.log10(n)
    # the sum is V (V^N - 1) / (V - 1)
    return math.log10(vocab) + n * math.log10(vocab) + math.log1p(-(vocab ** -float(n))) / math.log(10) - math.log10(vocab - 1)


class _Best:
    """The K most probable complete sequences found so far, best first, each sequence once
    (the seeds' are found again by the search, with its own sums)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.entries: list[tuple[float, list[int], list[float], int | None]] = []  # (total, ids, logprobs, tree node)

    def bound(self) -> float:
        """What a sequence must beat to enter: the K-th total once K are known."""
        return self.entries[-1][0] if len(self.entries) == self.k else -math.inf

    def offer(self, total: float, ids: list[int], lps: list[float], node: int | None) -> None:
        self.entries = [e for e in self.entries if e[1] != ids]
        totals = [-e[0] for e in self.entries]
        self.entries.insert(bisect.bisect_right(totals, -total), (total, ids, lps, node))
        del self.entries[self.k :]


@torch.inference_mode()
def exact_search(model: torch.nn.Module, prompt_ids: list[int], cfg: ExactConfig, decode=None) -> ExactResult:
    """The K most probable complete continuations (see the module's docstring). Under a
    constraint (``cfg.grammar``) only allowed tokens are extended, and a sequence is
    complete when the grammar finishes it (EOS where it accepts, or nothing more
    allowed) or at N tokens in an accepting state: the most probable string it allows."""
    context = model.cfg.context_length
    check_prompt_fits(len(prompt_ids), context)
    n = min(cfg.max_new_tokens, context - len(prompt_ids))
    eos = set(cfg.eos_token_ids)
    device = next(model.parameters()).device
    tree = SearchTree()
    root = tree.add(None, None, 0.0, 0.0, 0, "root")
    best = _Best(cfg.top)
    for ids, lps in _seeds(model, prompt_ids, n, cfg, decode):
        if cfg.grammar is None or _finish(cfg.grammar, ids, eos, n) is not None:
            best.offer(sum(lps), ids, lps, None)

    # Frontier entries: (-cumulative, tie-break counter, token ids, logprobs, node id, the
    # matcher before the last token: advanced only when the entry is expanded)
    frontier: list[tuple] = [(0.0, 0, [], [], root.id, cfg.grammar.matcher() if cfg.grammar else None)]
    counter, expanded = 1, 0
    while frontier and -frontier[0][0] > best.bound() and expanded < cfg.max_expansions:
        batch = [heapq.heappop(frontier) for _ in range(min(cfg.batch, len(frontier), cfg.max_expansions - expanded))]
        batch = [b for b in batch if -b[0] > best.bound()]
        if cfg.grammar is not None:
            batch = _settle(batch, n, best, tree)
        if not batch:
            continue  # each pass pops at least one entry, so this ends
        expanded += len(batch)
        rows = _next_logprobs(model, prompt_ids, [b[2] for b in batch], device)
        if cfg.grammar is not None:
            rows = rows.masked_fill(~allowed_tokens(cfg.grammar, [b[5] for b in batch], rows.shape[-1]), float("-inf"))
        for (neg, _, ids, lps, node_id, matcher), row in zip(batch, rows):
            tree.nodes[node_id].status = "kept"
            cumulative = -neg
            # Only children that could still enter the best K are worth a node or a queue slot.
            candidates = torch.nonzero(row + cumulative > best.bound()).flatten().tolist()
            for tok in candidates:
                lp = row[tok].item()
                total = cumulative + lp
                if total <= best.bound():
                    continue
                child = tree.add(node_id, tok, lp, total, len(ids) + 1, "pruned")
                if tok in eos or (len(ids) + 1 == n and cfg.grammar is None):
                    best.offer(total, ids + [tok], lps + [lp], child.id)
                else:
                    heapq.heappush(frontier, (-total, counter, ids + [tok], lps + [lp], child.id, matcher))
                    counter += 1
    return _result(cfg, best, frontier, tree, eos, n, expanded, model.cfg.vocab_size)


def _settle(batch: list[tuple], n: int, best: _Best, tree: SearchTree) -> list[tuple]:
    """Under a constraint, advance each popped entry's matcher by its last token; an
    entry the grammar has finished, or that is N tokens long and accepted, is offered as
    complete; one at N tokens and not accepted is dropped. Returns those to expand, each
    with its own matcher."""
    out = []
    for neg, counter, ids, lps, node_id, parent in batch:
        m = parent
        if ids:
            m = parent.deep_copy()
            m.consume_token(ids[-1])
        if m.is_stopped() or (len(ids) == n and m.is_accepting()):
            best.offer(-neg, ids, lps, node_id)
        elif len(ids) < n:
            out.append((neg, counter, ids, lps, node_id, m))
        else:
            tree.nodes[node_id].status = "pruned"
    return out


def _finish(grammar, ids: list[int], eos: set[int], n: int) -> str | None:
    """How a sequence ends under a constraint: ``constraint`` when the grammar finished
    it, ``length`` at N tokens in an accepting state, None when it is not complete."""
    m = grammar.matcher()
    if not m.consume_tokens(ids):
        return None
    if m.is_stopped():
        return "constraint"
    return "length" if len(ids) == n and m.is_accepting() else None


def _result(cfg: ExactConfig, best: _Best, frontier: list, tree: SearchTree, eos: set[int], n: int, expanded: int,
            vocab: int) -> ExactResult:
    """The best complete sequences found, each proven or not, their paths marked in the tree."""
    if not best.entries:
        raise LlmgenError(f"no text the constraint allows was found within {n} tokens"
                          + ("" if not frontier else f" and {cfg.max_expansions} expansions") + ": raise -n or --max-expansions")
    # Anything never queued was below the K-th total when it was met, and that only rises.
    open_best = -frontier[0][0] if frontier else -math.inf
    hypotheses, ends, children = [], [], tree.children()
    for total, ids, lps, node in best.entries:
        node = _path_end(tree, children, ids, lps) if node is None else node
        tree.nodes[node].status = "finished"
        ends.append(node)
        reason = _finish(cfg.grammar, ids, eos, n) if cfg.grammar is not None else "eos" if ids[-1] in eos else "length"
        hypotheses.append(Ranked(ids, lps, reason, open_best <= total))
    tree.best_path = tree.path_to(ends[0])
    return ExactResult(hypotheses, expanded, brute_force_log10(vocab, n), tree)


def _seeds(model, prompt_ids: list[int], n: int, cfg: ExactConfig, decode) -> list[tuple[list[int], list[float]]]:
    """Complete sequences to bound the search from the start: the greedy one, and for
    K > 1 a beam search's K hypotheses (length penalty 0, so ranked by log-probability)."""
    from llmgen.decoding.beam import BeamConfig, beam_search
    from llmgen.sampling.tokens import TokenRules

    gen = GenerationConfig(max_new_tokens=n, eos_token_ids=cfg.eos_token_ids, sampling=SamplingConfig(temperature=0),
                           tokens=TokenRules(grammar=cfg.grammar))
    greedy = generate(model, prompt_ids, gen, decode or (lambda ids: ""))[0]
    seeds = [(greedy.token_ids, greedy.logprobs)]
    if cfg.top > 1:
        beam = BeamConfig(width=cfg.top, max_new_tokens=n, length_penalty=0.0, num_return=cfg.top,
                          eos_token_ids=cfg.eos_token_ids, tree_top=0, grammar=cfg.grammar)
        seeds += [(h.token_ids, h.logprobs) for h in beam_search(model, prompt_ids, beam).hypotheses]
    return seeds


def _path_end(tree: SearchTree, children: dict, ids: list[int], lps: list[float]) -> int:
    """The tree node that ends ``ids``, its path added where the search never built it
    (a seed it did not need to find again); ``children`` is kept up to date."""
    parent, total = tree.nodes[0].id, 0.0
    for depth, (tok, lp) in enumerate(zip(ids, lps), 1):
        total += lp
        known = next((c for c in children.get(parent, []) if c.token_id == tok), None)
        if known is None:
            known = tree.add(parent, tok, lp, total, depth, "kept")
            children.setdefault(parent, []).append(known)
        parent = known.id
    return parent


def _next_logprobs(model, prompt_ids, continuations, device) -> torch.Tensor:
    """Next-token log-probabilities after prompt + each continuation, in one right-padded batch."""
    seqs = [prompt_ids + c for c in continuations]
    ids, mask = pad(seqs, left=False)
    logits = model(ids.to(device), attention_mask=mask.to(device)).float()
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    return torch.log_softmax(logits[torch.arange(len(seqs), device=device), last], dim=-1).cpu()
