"""What a decoder returns: the chosen tokens, and enough of the search to draw it.

Log-probabilities are always under the model's unmodified distribution (softmax of the
raw logits), whatever penalty, temperature or filter chose the token, so numbers from
different strategies can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class Step:
    """One decode step of one sequence: what was chosen and the best alternatives."""

    token_id: int
    logprob: float
    alternatives: tuple[Candidate, ...] = ()


@dataclass
class Sample:
    """One generated continuation. ``finish_reason`` is ``eos``, ``stop``, ``length``
    (``max_new_tokens`` reached) or ``context`` (the model's context ran out first)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    seed: int | None = None
    steps: list[Step] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)  # nats, of the model's distribution at each step
    speculation: Speculation | None = None  # how speculative decoding went, when it was used
    constraint_kept: list[float] = field(default_factory=list)  # per step, log of the mass a constraint kept (empty without one)

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)

    def constraint_record(self) -> dict:
        """``constraint_mass`` for a record when a constraint ran, else {}."""
        return {"constraint_mass": constraint_mass(self.constraint_kept)} if self.constraint_kept else {}


def constraint_mass(kept: list[float]) -> dict:
    """The JSON field ``constraint_mass`` from each step's log of the probability a
    constraint kept: per step the model's probability of the tokens it removed, and the
    log-probability that cost in all (the sum of the logs)."""
    return {"removed": [-math.expm1(k) for k in kept], "logprob_lost": sum(kept)}


@dataclass
class Round:
    """One verification round of speculative decoding: a draft, and the model's one pass over it.

    ``q[i]`` is the probability the drafter gave ``draft[i]`` (1 for a looked-up token);
    ``p[i]`` the model's, under the sampler's final distribution, for each drafted token
    it judged: a rejection, or the end of the text, leaves the rest unjudged, so ``p`` may
    be shorter. The first ``accepted`` drafted tokens were kept; then the model chose
    ``token_id`` itself, with probability ``token_p``: in place of a rejected draft
    (``resampled``), or as the bonus after an accepted one. It is None when the text
    ended among the drafted tokens.
    """

    draft: list[int]
    q: list[float]
    p: list[float] = field(default_factory=list)
    accepted: int = 0
    token_id: int | None = None
    token_p: float | None = None
    resampled: bool = False


@dataclass
class Speculation:
    """Speculative decoding's account of one sample: how it drafted and each round.
    Every round is one pass of the model, so tokens per round is the speed-up in passes."""

    method: str  # "draft-model" or "prompt-lookup"
    draft_tokens: int  # the most tokens a round drafts (--draft-tokens)
    rounds: list[Round] = field(default_factory=list)

    @property
    def drafted(self) -> int:
        return sum(len(r.draft) for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafted tokens over all drafted (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None


@dataclass
class Timings:
    """Where one generate call's time went, as llama.cpp reports it: the prompt's
    prefill, the wait for the first token, and the rest of the generation."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, every row's prompt
    first_token_seconds: float = 0.0  # from the call to the first chosen token
    generated_tokens: int = 0
    generation_seconds: float = 0.0  # after the first token to the end

    def record(self) -> dict:
        def rate(n: int, seconds: float) -> float | None:
            return round(n / seconds, 2) if seconds > 0 else None

        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "prompt_tokens_per_second": rate(self.prompt_tokens, self.prompt_seconds),
            "first_token_seconds": round(self.first_token_seconds, 4),
            "generated_tokens": self.generated_tokens,
            "generation_seconds": round(self.generation_seconds, 4),
            # after the first token, as llama.cpp's eval rate: the first is in first_token_seconds
            "tokens_per_second": rate(self.generated_tokens - 1, self.generation_seconds),
        }


@dataclass
class TreeNode:
    """A node of a search tree: one token appended to its parent's sequence.

    ``status``: ``root`` (the prompt), ``kept`` (survived the step), ``pruned`` (considered
    and dropped), ``finished`` (a complete hypothesis: EOS or the length limit).
    ``cumulative`` is the sequence's log-probability; ``score`` the length-normalised score
    of a finished hypothesis.
    """

    id: int
    parent: int | None
    token_id: int | None
    logprob: float
    cumulative: float
    step: int
    status: str
    score: float | None = None


@dataclass
class SearchTree:
    nodes: list[TreeNode] = field(default_factory=list)
    best_path: list[int] = field(default_factory=list)  # node ids from root to the winner

    def add(self, parent: int | None, token_id: int | None, logprob: float, cumulative: float, step: int, status: str) -> TreeNode:
        node = TreeNode(len(self.nodes), parent, token_id, logprob, cumulative, step, status)
        self.nodes.append(node)
        return node

    def children(self) -> dict[int | None, list[TreeNode]]:
        out: dict[int | None, list[TreeNode]] = {}
        for node in self.nodes:
            out.setdefault(node.parent, []).append(node)
        return out

    def path_to(self, node_id: int) -> list[int]:
        path = []
        current: int | None = node_id
        while current is not None:
            path.append(current)
            current = self.nodes[current].parent
        return path[::-1]

    def dropped_at(self, token_ids: list[int]) -> int | None:
        """The first step t at which ``token_ids[:t]`` was not among the search's survivors
        (kept, or finished), or None when every prefix survived. On a beam search's tree
        this is where a sequence fell out of the beam: the step a search error happened,
        if the sequence is the optimum."""
        children = self.children()
        current = next(n.id for n in self.nodes if n.parent is None)
        for step, tok in enumerate(token_ids, 1):
            kept = next((c for c in children.get(current, []) if c.token_id == tok and c.status in ("kept", "finished")), None)
            if kept is None:
                return step
            current = kept.id
        return None


@dataclass
class PrefixNode:
    """Samples merged by shared prefix: how many of them passed through this token."""

    token_ids: list[int]  # one token, or a chain of tokens no sample branched off from
    count: int
    logprob: float  # log-probability of this chain given its parent
    children: list[PrefixNode] = field(default_factory=list)
    ends: int = 0  # samples that ended here


def prefix_tree(samples: list[Sample]) -> PrefixNode:
    """Merge continuations into a tree, then fold single-child chains with equal counts."""
    root = PrefixNode([], len(samples), 0.0)
    for sample in samples:
        node = root
        for tok, lp in zip(sample.token_ids, sample.logprobs):
            child = next((c for c in node.children if c.token_ids == [tok]), None)
            if child is None:
                child = PrefixNode([tok], 0, lp)
                node.children.append(child)
            child.count += 1
            node = child
        node.ends += 1
    _fold(root)
    return root


def _fold(node: PrefixNode) -> None:
    for child in node.children:
        while len(child.children) == 1 and child.children[0].count == child.count and child.ends == 0:
            only = child.children[0]
            child.token_ids += only.token_ids
            child.logprob += only.logprob
            child.children, child.ends = only.children, only.ends
        _fold(child)
    node.children.sort(key=lambda c: (-c.count, c.token_ids))
