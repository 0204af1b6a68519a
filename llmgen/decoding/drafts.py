"""Where speculative decoding's drafts come from: a smaller model, or the text itself.

A drafter proposes up to k tokens to follow a sequence, each with the distribution q it
was drawn from; the verifier (``speculative.py``) needs q to keep the output distributed
exactly as the model's. A drafter keeps whatever state it needs between rounds and
catches up with the tokens accepted since: it is handed the whole sequence every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmgen.config import GenerationConfig
from llmgen.sampling import build_sampler

# The draft model's chain draws from its own stream: were it the verifier's, a draft
# would be correlated with the numbers that judge it.
DRAFT_SALT = 0x44524654  # "DRFT"


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    q: torch.Tensor  # (len(tokens), vocab): the distribution each token was drawn from


@dataclass(frozen=True)
class Speculate:
    """How to speculate: at most ``draft_tokens`` drafted tokens per round, by
    ``draft_model`` (same vocabulary as the model), or else by looking up the text's last
    ``prompt_lookup`` tokens earlier in it."""

    draft_tokens: int
    draft_model: torch.nn.Module | None = None
    prompt_lookup: int = 0

    def __post_init__(self) -> None:
        if self.draft_tokens < 1 or (self.draft_model is None) == (self.prompt_lookup < 1):
            raise ValueError("speculate with draft_tokens >= 1, and either a draft model or a prompt-lookup size >= 1")

    @property
    def method(self) -> str:
        return "draft-model" if self.draft_model is not None else "prompt-lookup"

    def drafter(self, prompt_ids: list[int], gen: GenerationConfig, seed: int | None, vocab_size: int, device):
        """A fresh drafter for one sample (``seed`` None when greedy)."""
        if self.draft_model is None:
            return PromptLookup(self.prompt_lookup, vocab_size, device)
        return ModelDrafter(self.draft_model, prompt_ids, gen, seed, device)


def lookup(sequence: list[int], n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens, trying n = ``n`` down to 1; [] when none recurs. Text that
    repeats itself (code, quoted passages, lists, a summary of its prompt) is guessed
    right for free, as transformers' ``prompt_lookup_num_tokens`` and vLLM's ngram do."""
    length = len(sequence)
    for size in range(min(n, length - 1), 0, -1):
        tail = sequence[length - size :]
        for start in range(length - size - 1, -1, -1):  # most recent first; each leaves a token to follow it
            if sequence[start + size - 1] == tail[-1] and sequence[start : start + size] == tail:
                return sequence[start + size : start + size + k]
    return []


class PromptLookup:
    """Drafts by ``lookup``: no second model, and a deterministic draft, so q is a point mass."""

    def __init__(self, n: int, vocab_size: int, device) -> None:
        self.n, self.vocab_size, self.device = n, vocab_size, device

    def draft(self, sequence: list[int], k: int) -> Draft:
        tokens = lookup(sequence, self.n, k)
        q = torch.nn.functional.one_hot(torch.tensor(tokens, dtype=torch.long), self.vocab_size).float()
        return Draft(tokens, q.reshape(len(tokens), self.vocab_size).to(self.device))


class ModelDrafter:
    """A smaller model that shares the model's vocabulary, choosing with the run's own
    sampler settings, so q is the distribution the run would draw from were the draft
    model the model.

    Its KV cache and its sampler chain hold the accepted sequence between rounds. A
    round advances both through the draft, then takes the draft back (the cache by its
    length, the chain by ``Sampler.restore``); the next round feeds the tokens accepted
    since in one pass, and the chain hears each of them as a scored token (``judge``),
    so penalties, n-gram bans and mirostat's mu follow the accepted text, as the model's
    chain does."""

    def __init__(self, model: torch.nn.Module, prompt_ids: list[int], gen: GenerationConfig, seed: int | None, device) -> None:
        self.model, self.device = model, device
        self.context = model.cfg.context_length
        draft_seed = None if seed is None else seed ^ DRAFT_SALT
        self.sampler = build_sampler(gen.sampling, [prompt_ids], [draft_seed], model.cfg.vocab_size, device,
                                     gen.stop_token_ids, gen.tokens)
        self.cache = model.new_cache(1, self.context)
        self.fed = 0  # tokens of the sequence in the cache
        self.heard = len(prompt_ids)  # tokens of the sequence the chain has accepted
        self.next_logits: torch.Tensor | None = None  # (1, vocab): the draft's logits for token ``fed``

    def draft(self, sequence: list[int], k: int) -> Draft:
        k = min(k, self.context - len(sequence) + 1)  # a draft of k feeds the sequence and k - 1 drafted tokens
        if k < 1:
            return Draft([], torch.zeros(0, self.model.cfg.vocab_size, device=self.device))
        logits = self._catch_up(sequence)
        saved = self.sampler.save()
        tokens, qs = [], []
        for i in range(k):
            token, q = self.sampler.propose(logits)
            self.sampler.accept(token)
            tokens.append(int(token[0]))
            qs.append(q[0])
            if self.sampler.complete(0):  # a constraint has finished the text: nothing can follow
                break
            if i + 1 < k:
                logits = self.model(token[:, None], None, self.cache)[:, -1].float()
        self.cache.length = self.fed
        self.sampler.restore(saved)
        return Draft(tokens, torch.stack(qs))

    def _catch_up(self, sequence: list[int]) -> torch.Tensor:
        """Feed the tokens accepted since the last round; let the chain hear them; return
        the logits for the token after the sequence, ``(1, vocab)``."""
        if self.fed == len(sequence):
            return self.next_logits
        new = torch.tensor([sequence[self.fed :]], device=self.device)
        out = self.model(new, None, self.cache)[0].float()  # row j: logits for token fed + j + 1
        ahead, first = (out, self.fed + 1) if self.next_logits is None else (torch.cat([self.next_logits, out]), self.fed)
        for s in range(self.heard, len(sequence)):  # ahead[s - first]: the logits token s was chosen from
            self.sampler.judge(ahead[s - first][None], [sequence[s]])
            self.sampler.accept([sequence[s]])
        self.fed = self.heard = len(sequence)
        self.next_logits = out[-1:]
        return self.next_logits
