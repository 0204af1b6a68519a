"""The explored tree of continuations and the model work behind it: ``llmgen explore``'s engine.

A session stands at one node of a tree whose root is the prompt. At a node it can say
what comes next (``candidates``: the model's distribution, the distribution after each
stage of the sampler chain, which stage removed each token, the entropy); it can take
a token, go back, extend the path greedily or by sampling, and graft a beam search's
or an exact search's answers onto the tree as branches. Nothing here draws or prints.

Cost. The KV cache holds the current path (``cached``). A step to a child feeds the
one new token, so it costs one forward pass; stepping elsewhere cuts the cache back to
the prefix the two paths share (as speculative decoding forgets a rejected draft, by
setting its length) and feeds only the rest. The nodes used most recently (``KEPT_NODES``)
keep the logits computed after them, their candidates and their sampler chain, so going
back, or returning to a node seen lately, costs no pass at all. An older node's are
recomputed when wanted (one pass): a node's numbers run to several vocabularies of
floats, and a long session must not grow without bound.

Samplers. The chain's stages may keep state (penalties count the text, mirostat moves
its target, XTC draws from a seeded generator), so a node's candidates depend on the
path to it. Each node keeps the chain as it stands there: its parent's chain, deep
copied, having heard the node's token as ``score --sampler`` feeds a given text
(``accept``, after ``judge`` on the parent's logits when a stage draws or the terminal
moves with each token). A node's candidates are the chain's at that point of
decoding: its tokens' sampler probabilities are what ``score --sampler`` gives for the
path, and what ``probs`` shows for the path as a prompt wherever no stage carries
state from step to step. A step copies one chain rather than replaying the path. Changing a setting drops
every chain, and the current node's is rebuilt along its path.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from llmgen import config
from llmgen import orchestrate as orch
from llmgen.errors import LlmgenError
from llmgen.sampling import build_sampler
from llmgen.sampling.stage import stable_order


@dataclass
class Node:
    """One token appended to its parent's path; the root (``token_id`` None) is the prompt.

    ``logprob`` is the token's log-probability given the path before it, under the
    model's own distribution (whatever sampler settings are in effect), and
    ``cumulative`` the whole path's. ``marks`` says which actions went through this
    node (``greedy``, ``sampled``, ``beam``, ``exact``), each with a detail on the node
    where it ended (a seed, a beam's rank and score, whether an optimum is proven)."""

    id: int
    parent: int | None
    token_id: int | None
    logprob: float
    cumulative: float
    depth: int
    ended: bool = False  # its token ends the text (EOS, or end of turn under --chat)
    children: list[int] = field(default_factory=list)
    marks: dict[str, str] = field(default_factory=dict)
    logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,) after this node, while kept


@dataclass
class Candidates:
    """What may come after one node, every token of the vocabulary at once.

    ``raw`` is the model's distribution, ``stages`` each sampler stage's name and the
    distribution right after it, ``final`` the one a token is drawn from (after the
    terminal: greedy's is all on one token). ``removed_by[t]`` names the stage that
    removed token t (None if it can be drawn); ``changed_by[t]`` the stages that moved
    it and kept it. Entropies are in nats. Tensors are ``(vocab,)`` on the CPU."""

    node: int
    order: list[str]  # the stages that ran, terminal last
    raw: torch.Tensor
    stages: list[tuple[str, torch.Tensor]]
    final: torch.Tensor
    removed_by: Sequence[str | None]
    changed_by: dict[int, list[str]]
    entropy: float  # of the model's distribution
    final_entropy: float  # of the distribution a token is drawn from

    @property
    def drawable(self) -> int:
        return int((self.final > 0).sum())

    def top(self, n: int) -> list[int]:
        """The ``n`` most probable tokens under the model, ties by id, without sorting the
        whole vocabulary (a sort of 49,152 probabilities takes ~8 ms on one core)."""
        n = min(n, len(self.raw))
        edge = torch.topk(self.raw, n).values[-1]
        ids = torch.nonzero(self.raw >= edge).flatten()  # the n-th's ties come too
        return [t for _, t in sorted(zip((-p for p in self.raw[ids].tolist()), ids.tolist()))][:n]

    @cached_property
    def ranked(self) -> list[int]:
        """Every token, most probable first (ties by id)."""
        return stable_order(self.raw[None])[0].tolist()

    @cached_property
    def _place(self) -> torch.Tensor:
        """Each token's place in ``ranked``, from 0."""
        order = torch.tensor(self.ranked)
        return torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))

    def rank(self, token: int) -> int:
        """The token's place under the model's distribution, from 1 (ties by id)."""
        return int(self._place[token]) + 1

    def rows(self, tokens: list[int], ranked: bool = False) -> list[Row]:
        """The numbers of ``tokens``' rows, read in one gather per distribution;
        ``ranked``: they are the most probable, in order, so their ranks need no sort."""
        index = torch.tensor(tokens, dtype=torch.long)
        raw, final = self.raw[index].tolist(), self.final[index].tolist()
        stages = list(zip(*(p[index].tolist() for _, p in self.stages))) or [()] * len(tokens)
        ranks = range(1, len(tokens) + 1) if ranked else [self.rank(t) for t in tokens]
        return [Row(t, r, p, after, f, self.removed_by[t])
                for t, r, p, after, f in zip(tokens, ranks, raw, stages, final)]

    def matching(self, texts: list[str], query: str, limit: int) -> list[int]:
        """The ``limit`` most probable tokens whose text holds ``query`` (any case; the
        most probable of all when it is empty): the whole vocabulary is searched."""
        if not query:
            return self.top(limit)
        query = query.casefold()
        hits = [t for t, text in enumerate(texts) if query in text.casefold()]
        probs = self.raw[hits].tolist() if hits else []
        return [t for _, t in sorted(zip((-p for p in probs), hits))][:limit]

    def record(self, token_text, tokens: list[int]) -> list[dict]:
        """``tokens``' rows as JSON (the field names of ``probs --json``), with
        ``stage_probs``: the probability after each stage, by stage name."""
        return [{"token_id": t, "token": token_text(t), "prob": float(self.raw[t]), "final_prob": float(self.final[t]),
                 "stage_probs": {name: float(p[t]) for name, p in self.stages},
                 "removed_by": self.removed_by[t], "changed_by": self.changed_by.get(t, [])} for t in tokens]


@dataclass(frozen=True)
class Row:
    """One candidate's numbers, as a table shows them."""

    token: int
    rank: int  # from 1, by the model's probability
    prob: float  # the model's
    stages: tuple[float, ...]  # right after each stage of the chain
    final: float  # the one it is drawn with
    removed_by: str | None


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy in nats of a distribution that may hold zeros."""
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


class Session:
    """The explored tree, the current node, the sampler settings and the model's cache.

    ``prompt`` is the prompt's text as given (for records and titles; ``prompt_ids`` are
    what the model reads). ``settings`` are the sampling flags as the CLI hands them over (None where not
    given); they layer over the model's generation_config as every command's do.
    ``seed`` is the seed of the sampler's random stages; sample i of the session (``s``)
    draws with seed + i, as ``run --num-samples`` does."""

    KEPT_NODES = 256  # ~50 MB of logits at a 49k vocabulary, and their candidates; returning to these is free

    def __init__(self, ckpt, prompt_ids: list[int], settings: dict[str, Any], seed: int | None = None,
                 chat: bool = False, prompt: str = "") -> None:
        self.ckpt, self.model = ckpt, ckpt.model
        self.prompt, self.prompt_ids = prompt, list(prompt_ids)
        self.chat = chat
        self.settings = {k: v for k, v in settings.items() if k != "max_new_tokens"}
        self.seed = orch.draw_seed() if seed is None else seed
        self.gen = self._resolve(self.settings, self.seed)
        self.device = next(self.model.parameters()).device
        self.context = self.model.cfg.context_length
        self.nodes = [Node(0, None, None, 0.0, 0.0, 0)]
        self.current = 0
        self.samples_drawn = 0
        self.forward_passes = 0
        self.cache = self.model.new_cache(1, self.context)
        self.cached: list[int] = []  # the ids whose keys and values the cache holds
        self._chains: dict[int, Any] = {}  # node id -> the sampler chain as it stands after it
        self._explained: dict[int, Candidates] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()  # nodes holding kept numbers, least recent first

    def _resolve(self, settings: dict[str, Any], seed: int):
        return orch.generation(self.ckpt, settings, seed=seed, chat=self.chat)

    # -- the tree

    @property
    def node(self) -> Node:
        return self.nodes[self.current]

    def path(self, node_id: int | None = None) -> list[Node]:
        """The nodes from the root to ``node_id`` (default: the current node)."""
        out, current = [], self.current if node_id is None else node_id
        while current is not None:
            out.append(self.nodes[current])
            current = self.nodes[current].parent
        return out[::-1]

    def tokens(self, node_id: int | None = None) -> list[int]:
        """The token ids of the path to ``node_id``, the prompt not included."""
        return [n.token_id for n in self.path(node_id)[1:]]

    def text(self, node_id: int | None = None) -> str:
        return self.ckpt.decode(self.tokens(node_id))

    def _child(self, parent: Node, token: int) -> Node:
        """``parent``'s child for ``token``, made (with its log-probability from the
        parent's logits) if it is new."""
        for cid in parent.children:
            if self.nodes[cid].token_id == token:
                return self.nodes[cid]
        if parent.ended:
            raise LlmgenError("the text ended here: go back to take another token")
        if len(self.prompt_ids) + parent.depth + 1 > self.context:
            raise LlmgenError(f"the model's context ({self.context} tokens) is full here")
        if not 0 <= token < self.model.cfg.vocab_size:
            raise LlmgenError(f"no token {token}: ids run from 0 to {self.model.cfg.vocab_size - 1}")
        logprob = float(torch.log_softmax(self.logits(parent), -1)[token])
        node = Node(len(self.nodes), parent.id, token, logprob, parent.cumulative + logprob, parent.depth + 1,
                    ended=token in self.gen.stop_token_ids)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    # -- the model

    def logits(self, node: Node) -> torch.Tensor:
        """The next-token logits after ``node`` ``(vocab,)``: kept from before, or from one
        pass over the tokens of its path the cache does not already hold."""
        if node.logits is None:
            self._forward(node)
        self._touch(node)
        return node.logits

    def _touch(self, node: Node) -> None:
        """``node``'s kept numbers were just used: beyond ``KEPT_NODES``, the least recently
        used node's logits, candidates and chain are dropped, to be recomputed if wanted."""
        self._recent[node.id] = None
        self._recent.move_to_end(node.id)
        while len(self._recent) > self.KEPT_NODES:
            old, _ = self._recent.popitem(last=False)
            self.nodes[old].logits = None
            self._explained.pop(old, None)
            self._chains.pop(old, None)

    @torch.inference_mode()
    def _forward(self, node: Node) -> None:
        chain = self.path(node.id)
        ids = self.prompt_ids + [n.token_id for n in chain[1:]]
        keep = 0
        for a, b in zip(self.cached, ids[:-1]):  # at least the last token is fed, for its logits
            if a != b:
                break
            keep += 1
        self.cache.length = keep  # forget the rest of the old path; its slots are overwritten
        logits = self.model(torch.tensor([ids[keep:]], device=self.device), None, self.cache)[0].float()  # (fed, vocab)
        self.forward_passes += 1
        self.cached = ids
        first = len(self.prompt_ids) - 1  # the position whose logits follow the root
        for pos in range(max(keep, first), len(ids)):
            on_path = chain[pos - first]
            if on_path.logits is None:
                on_path.logits = logits[pos - keep].clone()  # a row of its own: a view would keep the whole pass
                self._touch(on_path)

    # -- what comes next

    def candidates(self, node_id: int | None = None) -> Candidates | None:
        """The next-token table at a node (default: the current one); None where the
        text has ended. Computed once per node and settings."""
        node = self.nodes[self.current if node_id is None else node_id]
        if node.ended:
            return None
        if node.id not in self._explained:
            sampler = copy.deepcopy(self._chain(node))  # explaining draws (XTC, the draw): not on the kept chain
            _, (why,) = sampler.explain(self.logits(node)[None], choose=False)
            raw, final = why.raw.cpu(), why.final.cpu()
            self._explained[node.id] = Candidates(
                node.id, why.order, raw, [(name, p.cpu()) for name, p in why.stages], final, why.removed_by,
                why.changed_by, entropy(raw), entropy(final))
        self._touch(node)
        return self._explained[node.id]

    def _fresh_chain(self, sampling: config.SamplingConfig, seed: int | None):
        return build_sampler(sampling, [self.prompt_ids], [None if sampling.greedy else seed], self.model.cfg.vocab_size,
                             self.device, self.gen.stop_token_ids, self.gen.tokens)

    def _hear(self, sampler, parent: Node, token: int) -> None:
        """The chain at ``parent`` hears ``token`` as given, not drawn (as ``score --sampler``).
        Only a chain that draws or moves with each step's distribution needs that step's
        logits run through it; any other hears the token as the text's next."""
        if sampler.judges_by_logits:
            sampler.judge(self.logits(parent)[None], [token])
        sampler.accept([token])

    def _chain(self, node: Node):
        """The chain with the session's settings as it stands after ``node``'s path."""
        path = self.path(node.id)
        start = max((i for i, n in enumerate(path) if n.id in self._chains), default=None)
        if start is None:
            self._chains[0] = self._fresh_chain(self.gen.sampling, self.seed)
            self._touch(path[0])
            start = 0
        for parent, child in zip(path[start:], path[start + 1:]):
            sampler = copy.deepcopy(self._chains[parent.id])
            self._hear(sampler, parent, child.token_id)
            self._chains[child.id] = sampler
            self._touch(child)
        return self._chains[node.id]

    def _replayed(self, sampling: config.SamplingConfig, seed: int | None):
        """A fresh chain for ``sampling``, led along the current path, to decode from."""
        sampler = self._fresh_chain(sampling, seed)
        path = self.path()
        for parent, child in zip(path, path[1:]):
            self._hear(sampler, parent, child.token_id)
        return sampler

    # -- moving

    def take(self, token: int) -> Node:
        """Step to the child for ``token``: one forward pass for a node not seen lately."""
        node = self._child(self.node, token)
        self.current = node.id
        if not node.ended and len(self.prompt_ids) + node.depth <= self.context:
            self.logits(node)
        return node

    def encode(self, text: str) -> list[int]:
        """The tokens ``text`` encodes to on its own (what ``take TEXT`` takes)."""
        ids = self.ckpt.encode(text, special=False)
        if not ids:
            raise LlmgenError(f"{text!r} encodes to no token")
        unknown = self.ckpt.vocabulary.unknown_id()
        if unknown in ids and self.ckpt.token_text(unknown) not in text:
            raise LlmgenError(f"{text!r} holds text the tokenizer has no token for")
        return ids

    def back(self) -> Node:
        """Step to the parent: free, its logits and candidates are kept (see KEPT_NODES)."""
        if self.node.parent is None:
            raise LlmgenError("already at the prompt")
        self.current = self.node.parent
        return self.node

    def goto(self, node_id: int) -> Node:
        if not 0 <= node_id < len(self.nodes):
            raise LlmgenError(f"no node {node_id}")
        self.current = node_id
        if not self.node.ended:
            self.logits(self.node)
        return self.node

    def greedy(self, n: int) -> list[Node]:
        """Extend the path by up to ``n`` tokens, each the most probable under the
        current settings' penalties and bans (what ``run -t 0`` with them picks)."""
        sampling = replace(self.gen.sampling, temperature=0.0, dynatemp_range=0.0)
        return self._decode(self._replayed(sampling, None), n, "greedy", "")

    @property
    def next_seed(self) -> int:
        """The seed the next ``sample`` draws with."""
        return self.seed + self.samples_drawn

    def sample(self, n: int) -> list[Node]:
        """Extend the path by up to ``n`` tokens drawn with the current settings, sample
        i of the session with seed + i: from the prompt, ``run --seed`` that seed's text."""
        seed = self.next_seed
        self.samples_drawn += 1
        return self._decode(self._replayed(self.gen.sampling, seed), n, "sampled", f"seed {seed}")

    def _decode(self, sampler, n: int, mark: str, detail: str) -> list[Node]:
        """Up to ``n`` tokens from ``sampler``'s choices, one forward pass each, stopping
        where the text ends or the context is full; the path's nodes get ``mark``."""
        if n < 1:
            raise LlmgenError(f"{mark}: the number of tokens must be >= 1, got {n}")
        made, node = [], self.node
        while len(made) < n and not node.ended and len(self.prompt_ids) + node.depth < self.context:
            token = int(sampler.choose(self.logits(node)[None])[0])
            sampler.accept([token])
            node = self.take(token)
            node.marks.setdefault(mark, "")
            made.append(node)
        if made:
            made[-1].marks[mark] = detail
        return made

    # -- searches from here

    def beam(self, width: int, n: int, length_penalty: float = 1.0) -> list[Node]:
        """A beam search of ``width`` from the current node, up to ``n`` tokens; every
        hypothesis it returns becomes a branch (``beam``; its end says rank and score).
        Returns the branches' ends, best first. The current node stays."""
        from llmgen.decoding.beam import BeamConfig, beam_search

        cfg = BeamConfig(width=width, max_new_tokens=n, length_penalty=length_penalty, num_return=width,
                         eos_token_ids=self.gen.stop_token_ids, tree_top=0)
        self._check_room()
        result = beam_search(self.model, self.prompt_ids + self.tokens(), cfg)
        ends = []
        for rank, h in enumerate(result.hypotheses, 1):
            end = self._branch(h.token_ids, "beam")
            end.marks["beam"] = f"#{rank} score {h.score:.3f}"
            ends.append(end)
        return ends

    def exact(self, n: int, max_expansions: int = 2000) -> tuple[Node, bool]:
        """The most probable continuation of up to ``n`` tokens from the current node
        (``llmgen exact``), grafted as a branch marked ``exact``; whether it is proven."""
        from llmgen.decoding.exact import ExactConfig, exact_search

        cfg = ExactConfig(max_new_tokens=n, max_expansions=max_expansions, eos_token_ids=self.gen.stop_token_ids)
        self._check_room()
        result = exact_search(self.model, self.prompt_ids + self.tokens(), cfg, self.ckpt.decode)
        end = self._branch(result.token_ids, "exact")
        end.marks["exact"] = f"optimum from depth {self.node.depth}" + ("" if result.proven else f", not proven within {max_expansions}")
        return end, result.proven

    def _check_room(self) -> None:
        if self.node.ended:
            raise LlmgenError("the text ended here: go back to search from another node")
        if len(self.prompt_ids) + self.node.depth >= self.context:
            raise LlmgenError(f"the model's context ({self.context} tokens) is full here")

    def _branch(self, tokens: list[int], mark: str) -> Node:
        """The path of ``tokens`` below the current node, made where new and marked; the
        current node stays. Each new node's log-probability comes from this session's own
        pass over the branch, so every number in the tree is computed one way."""
        node = self.node
        for token in tokens:
            node = self._child(node, token)
            node.marks.setdefault(mark, "")
        return node

    # -- settings

    def set(self, name: str, value: str) -> None:
        """Change one sampler setting (any flag's name, or ``seed``), checked as its flag
        is; the candidates are recomputed for the new chain."""
        settings, seed = dict(self.settings), self.seed
        if name == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise LlmgenError(f"seed takes an int, got {value!r}") from None
            config.check_seed(seed)
            self.samples_drawn = 0
        else:
            key, parsed = config.parse_text(name, value)
            if key == "max_new_tokens":
                raise LlmgenError("max_new_tokens is not a sampler setting: greedy and sample take their own N")
            settings[key] = parsed
        self.gen = self._resolve(settings, seed)  # a text-valued setting that names no token fails here, changing nothing
        self.settings, self.seed = settings, seed
        self._chains.clear()
        self._explained.clear()

    def effective_settings(self) -> dict[str, Any]:
        return {k: v for k, v in config.effective(self.gen).items() if k != "max_new_tokens"}

    # -- export

    def record(self) -> dict:
        """The whole session as JSON: the shared fields for the current path (``prompt``,
        ``text``, ``token_ids``, ``logprobs``, ``finish_reason``), the settings and seed, and
        the tree as nested
        nodes (``token_id``, ``token``, ``logprob``, ``cumulative``, ``marks``,
        ``current``: on the current path, ``children``), children most probable first."""
        on_path = {n.id for n in self.path()}
        token_text = self.ckpt.token_text

        def node(n: Node) -> dict:
            kids = sorted((self.nodes[c] for c in n.children), key=lambda c: -c.cumulative)
            return {"token_id": n.token_id, "token": None if n.token_id is None else token_text(n.token_id),
                    "logprob": n.logprob, "cumulative": n.cumulative, "ended": n.ended, "marks": dict(n.marks),
                    "current": n.id in on_path, "children": [node(c) for c in kids]}

        return {**self._path_record(), "logprobs": [n.logprob for n in self.path()[1:]],
                "finish_reason": self.finish_reason(), "seed": self.seed,
                "settings": self.effective_settings(), "forward_passes": self.forward_passes, "tree": node(self.nodes[0])}

    def finish_reason(self) -> str | None:
        """Why the current path can go no further, as ``run`` words it: ``eos`` (its last
        token ends the text), ``context`` (the model's context is full), else None."""
        if self.node.ended:
            return "eos"
        return "context" if len(self.prompt_ids) + self.node.depth >= self.context else None

    def _path_record(self) -> dict:
        return {"prompt": self.prompt, "prompt_token_ids": self.prompt_ids, "text": self.text(), "token_ids": self.tokens(),
                "cumulative": self.node.cumulative, "ended": self.node.ended}

    def view_record(self, top: int) -> dict:
        """``show`` as JSON: the current path, the chain's stages, the model's entropy,
        and the ``top`` most probable candidates (``Candidates.record``)."""
        cands = self.candidates()
        rows = cands.record(self.ckpt.token_text, cands.top(top)) if cands else []
        return {"event": "show", **self._path_record(), "samplers": cands.order if cands else [],
                "entropy": cands.entropy if cands else None, "candidates": rows}
