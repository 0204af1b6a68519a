"""Beam search: keep the K most probable partial sequences, extend each by every token,
keep the K best of the results. Width 1 is greedy.

It follows transformers' beam search step for step, so results can be checked against it:

- each step scores all K x V continuations and looks at the best 2K of them;
- a continuation that ends (EOS, or the length limit) becomes a finished hypothesis only
  if it ranks among the best K, scored ``sum of log-probs / generated_length ** alpha``
  (the length counts the EOS token);
- the K best continuations that did not end become the next beams; the KV cache rows are
  reordered to follow them, so no prefix is ever recomputed;
- the search stops when no running beam can still beat the worst of K finished
  hypotheses (``early_stopping=False``), as soon as K are finished (``True``), or at the
  length limit.

Every considered continuation is recorded in a ``SearchTree`` for ``--show-tree``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmgen.cache import check_rows
from llmgen.config import require
from llmgen.decoding.greedy_sample import check_prompt_fits
from llmgen.decoding.trace import SearchTree
from llmgen.sampling.constraints import banned_by_ngrams
from llmgen.sampling.grammar import Matchers

NEG = -1.0e9  # transformers' "impossible" score; keeps ties and arithmetic identical to it


@dataclass(frozen=True)
class BeamConfig:
    width: int = 4
    max_new_tokens: int = 20
    length_penalty: float = 1.0
    num_return: int = 1
    no_repeat_ngram_size: int = 0
    early_stopping: bool = False
    eos_token_ids: tuple[int, ...] = ()
    tree_top: int = 3  # candidates per node recorded for the tree, beyond the ones that survive
    grammar: Any = None  # constraint.Grammar: only the tokens it allows are extended

    def __post_init__(self) -> None:
        require(self.width >= 1, f"--width must be >= 1, got {self.width}")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(1 <= self.num_return <= self.width, f"--num-return must be between 1 and --width ({self.width}), got {self.num_return}")
        # length**penalty must stay a float for any length a context holds (transformers uses 0 to 2)
        require(math.isfinite(self.length_penalty) and abs(self.length_penalty) <= 10,
                f"--length-penalty must be between -10 and 10, got {self.length_penalty}")
        require(self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, got {self.no_repeat_ngram_size}")
        require(self.tree_top >= 0, f"--tree-top must be >= 0, got {self.tree_top}")


@dataclass
class Hypothesis:
    token_ids: list[int]
    logprobs: list[float]
    score: float
    finish_reason: str
    node: int  # its node in the search tree

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)


@dataclass
class BeamResult:
    hypotheses: list[Hypothesis]  # best first, ``num_return`` of them
    tree: SearchTree = field(default_factory=SearchTree)
    steps: int = 0


@dataclass
class _Beam:
    token_ids: list[int]
    logprobs: list[float]
    score: float  # cumulative log-probability
    node: int


@torch.inference_mode()
def beam_search(model: torch.nn.Module, prompt_ids: list[int], cfg: BeamConfig) -> BeamResult:
    context = model.cfg.context_length
    check_prompt_fits(len(prompt_ids), context)
    max_new = min(cfg.max_new_tokens, context - len(prompt_ids))
    K, device = cfg.width, next(model.parameters()).device
    check_rows(model, K, len(prompt_ids), max_new)
    eos = set(cfg.eos_token_ids)
    keep = max(2, 1 + len(eos)) * K

    tree = SearchTree()
    root = tree.add(None, None, 0.0, 0.0, 0, "root")
    # K identical rows, all but the first "impossible", exactly as transformers starts.
    beams = [_Beam([], [], 0.0 if i == 0 else NEG, root.id) for i in range(K)]
    finished: list[Hypothesis] = []
    can_improve = True

    # The prompt is prefilled once, then its cache row and logits are copied to all K rows.
    cache = model.new_cache(1, len(prompt_ids) + max_new)
    logits = model(torch.tensor([prompt_ids], device=device), None, cache)[:, -1].float().repeat(K, 1)
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))
    matchers = Matchers(cfg.grammar, K) if cfg.grammar is not None else None
    step = 0
    for step in range(max_new):
        logprobs = torch.log_softmax(logits, dim=-1)
        allowed = matchers.allowed(logprobs.shape[-1], device) if matchers else None
        totals, candidates = _top_candidates(logprobs, beams, prompt_ids, cfg.no_repeat_ngram_size, keep, allowed)
        last_step = step + 1 == max_new
        completes = [bool(matchers) and (tok in eos or matchers.finishes(row, tok)) for _, row, tok, _ in candidates]
        ends = [tok in eos or last_step or done for (_, _, tok, _), done in zip(candidates, completes)]

        # Finished hypotheses: ending candidates among the best K, if they can still matter.
        accepting = can_improve and not (len(finished) == K and cfg.early_stopping)
        nodes, finished = _add_candidates(tree, beams, logprobs, candidates, ends, finished, accepting, step + 1, cfg, eos, completes)

        # Next running beams: the best K candidates that did not end.
        running = [c for c, ended in zip(candidates, ends) if not ended][:K]
        new_beams, parents, next_tokens = _next_beams(beams, running, nodes, K)
        _record_alternatives(tree, beams, logprobs, totals, cfg.tree_top, step, nodes)
        beams = new_beams

        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        generated = step + 1
        horizon = max_new if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else generated
        best_running = max(b.score for b in beams) / (horizon**cfg.length_penalty)
        worst_finished = min(h.score for h in finished) if len(finished) == K else NEG
        can_improve = can_improve and best_running > worst_finished
        if last_step or not can_improve or (len(finished) == K and cfg.early_stopping):
            break
        cache.follow(parents)
        if matchers:
            matchers.follow(parents, next_tokens)
        logits = model(torch.tensor(next_tokens, device=device)[:, None], None, cache)[:, -1].float()

    best = finished[: cfg.num_return]
    if best:
        tree.best_path = tree.path_to(best[0].node)
    return BeamResult(best, tree, step + 1)


def _top_candidates(logprobs, beams: list[_Beam], prompt_ids: list[int], no_repeat: int, keep: int, allowed=None):
    """Every beam's continuations scored by cumulative log-probability (n-gram repeats
    banned, and tokens a constraint does not ``allow``), and the best ``keep`` of all
    K x V as (rank, row, token, total), leaving out the banned."""
    scores = logprobs.clone() if allowed is None else logprobs.masked_fill(~allowed, float("-inf"))
    if no_repeat:
        for row, beam in enumerate(beams):
            banned = banned_by_ngrams(prompt_ids + beam.token_ids, no_repeat)
            if banned:
                scores[row, list(banned)] = float("-inf")
    totals = scores + torch.tensor([b.score for b in beams], device=scores.device)[:, None]  # (K, V)
    top_scores, top_flat = totals.reshape(-1).topk(keep)
    vocab = totals.shape[-1]
    candidates = [
        (rank, flat // vocab, flat % vocab, total) for rank, (flat, total) in enumerate(zip(top_flat.tolist(), top_scores.tolist()))
        if total > float("-inf")
    ]
    return totals, candidates


def _add_candidates(tree, beams, logprobs, candidates, ends, finished, accepting: bool, generated: int, cfg, eos, completes):
    """Record every real candidate in the tree; an ending one among the best K becomes a
    finished hypothesis (while ``accepting``), scored sum(logprobs) / length**alpha
    (``completes``: it ends because a constraint finished it). Returns the candidates'
    tree nodes by rank, and the best K finished hypotheses."""
    K, nodes = cfg.width, {}
    for (rank, row, tok, total), ended, done in zip(candidates, ends, completes):
        beam = beams[row]
        if beam.score <= NEG / 2:
            continue  # a placeholder row: never a real sequence
        node = tree.add(beam.node, tok, logprobs[row, tok].item(), total, generated, "pruned")
        nodes[rank] = node
        if ended and rank < K and accepting:
            score = total / (generated**cfg.length_penalty)
            reason = "constraint" if done else "eos" if tok in eos else "length"
            hyp = Hypothesis(beam.token_ids + [tok], beam.logprobs + [node.logprob], score, reason, node.id)
            finished = sorted(finished + [hyp], key=lambda h: -h.score)[:K]
    for hyp in finished:
        tree.nodes[hyp.node].status = "finished"
        tree.nodes[hyp.node].score = hyp.score
    return nodes, finished


def _next_beams(beams, running, nodes, K: int):
    """The K beams that go on (padded with impossible rows when fewer did not end), the
    row each continues, and the token each feeds the model next."""
    running = running + [(None, 0, 0, NEG)] * (K - len(running))
    new_beams, parents, next_tokens = [], [], []
    for rank, row, tok, total in running:
        parent = beams[row]
        if rank is None or rank not in nodes:
            new_beams.append(_Beam(parent.token_ids, parent.logprobs, NEG, parent.node))
        else:
            node = nodes[rank]
            node.status = "kept"
            new_beams.append(_Beam(parent.token_ids + [tok], parent.logprobs + [node.logprob], total, node.id))
        parents.append(row)
        next_tokens.append(tok)
    return new_beams, parents, next_tokens


def _record_alternatives(tree, beams, logprobs, totals, top, step, nodes) -> None:
    """Add each live beam's best ``top`` tokens that the global top-2K did not already record."""
    if top <= 0:
        return
    recorded = {(tree.nodes[n.parent].id, n.token_id) for n in nodes.values()}
    values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    for row, beam in enumerate(beams):
        if beam.score <= NEG / 2:
            continue
        for lp, tok in zip(values[row].tolist(), indices[row].tolist()):
            if (beam.node, tok) not in recorded and totals[row, tok] > float("-inf"):  # not one a constraint removed
                tree.add(beam.node, tok, lp, totals[row, tok].item(), step + 1, "pruned")
