"""Speculative decoding: a drafter proposes k tokens, and one pass of the model judges them all.

A decode step reads every weight of the model to produce one token; at batch 1 on a CPU
that reading is most of the time, so a pass over k + 1 tokens costs little more than a
pass over one. A round feeds the newest token and a draft of k (``drafts.py``), gets
the model's logits at all k + 1 positions, and goes through them in order: the
sampler chain's ``verify`` keeps each drafted token or chooses another in its place
(greedy keeps the argmax; sampling applies speculative sampling's acceptance rule), and
the round ends at the first token that is not the draft's. When all k are kept, the
last position gives one more token, chosen as plain decoding would. A round thus yields
1 to k + 1 tokens for one pass, and the text is the model's own: greedy's tokens are
plain greedy's, and samples are distributed as plain sampling's.

Each token is accepted by the chain before the next position is judged, so the stages
with history see the text plain decoding would show them; and each is recorded as plain
decoding records it, so the text ends exactly where plain decoding's ends (EOS, a stop
string, the length limit), whatever was drafted beyond. The KV cache then forgets what
the pass wrote for tokens not kept, by setting its length back.

It decodes one sequence: ``num_samples`` samples run one after another, sample i with
seed + i as in plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmgen.cache import check_rows
from llmgen.config import GenerationConfig
from llmgen.decoding.drafts import Draft, Speculate
from llmgen.decoding.greedy_sample import Clock, OnToken, Row, alternatives, entropies, last_steps, need_seed, note_constraint, record_token
from llmgen.decoding.trace import Round, Sample, Speculation, Timings
from llmgen.sampling import build_sampler
from llmgen.text import ContinuationText


@torch.inference_mode()
def generate_speculative(
    model: torch.nn.Module,
    prompt_ids: list[int],
    gen: GenerationConfig,
    decode: Callable[[list[int]], str],
    spec: Speculate,
    on_token: OnToken | None = None,
    trace_top: int = 0,
    timings: Timings | None = None,
) -> list[Sample]:
    """As ``greedy_sample.generate``, drafting as ``spec`` says; each sample carries its
    ``speculation`` (every round: the draft, p, q, what was kept and what replaced it).
    ``timings``' prompt figures are the first sample's prefill."""
    check_rows(model, 1, len(prompt_ids), gen.max_new_tokens)
    device = next(model.parameters()).device
    limit = last_steps([Row(prompt_ids, None, gen.max_new_tokens)], model.cfg.context_length)[0]
    clock = Clock(timings, device)
    samples = []
    for row in range(gen.num_samples):
        seed = None if gen.sampling.greedy else need_seed(gen) + row
        one = _OneSample(model, prompt_ids, gen, decode, seed, limit, row, on_token, clock)
        samples.append(one.run(spec, trace_top))
    clock.done(samples)
    return samples


class _OneSample:
    """One continuation: its sampler chain, its text so far, and how each token is recorded."""

    def __init__(self, model, prompt_ids: list[int], gen: GenerationConfig, decode, seed: int | None,
                 limit: tuple[int, str], row: int, on_token: OnToken | None, clock: Clock) -> None:
        self.model, self.prompt_ids, self.gen, self.row, self.on_token, self.clock = model, prompt_ids, gen, row, on_token, clock
        self.device = next(model.parameters()).device
        self.limit, self.reason = limit
        self.sampler = build_sampler(gen.sampling, [prompt_ids], [seed], model.cfg.vocab_size, self.device,
                                     gen.stop_token_ids, gen.tokens)
        self.sample = Sample(seed=seed)
        self.text = ContinuationText(decode, gen.stop)
        self.stop_ids = set(gen.stop_token_ids)
        self.sequence = list(prompt_ids)

    def run(self, spec: Speculate, trace_top: int) -> Sample:
        drafter = spec.drafter(self.prompt_ids, self.gen, self.sample.seed, self.model.cfg.vocab_size, self.device)
        self.sample.speculation = Speculation(spec.method, spec.draft_tokens)
        cache = self._prefill()
        while self.sample.finish_reason is None:
            room = self.limit - len(self.sample.token_ids) - 1  # a round yields up to k + 1 tokens
            draft = drafter.draft(self.sequence, min(spec.draft_tokens, room))
            fed = torch.tensor([self.sequence[-1:] + draft.tokens], device=self.device)
            logits = self.model(fed, None, cache)[0].float()  # (1 + drafted, vocab)
            self.sample.speculation.rounds.append(self._judge(logits, draft, trace_top))
            cache.length = len(self.sequence) - 1  # forget the drafted tokens not kept
        self.sample.text = self.text.text
        return self.sample

    def _prefill(self):
        """A cache holding the prompt but its last token, which the first round feeds
        with its draft (so the first token is drafted too)."""
        cache = self.model.new_cache(1, len(self.prompt_ids) + self.limit)
        if len(self.prompt_ids) > 1:
            self.model(torch.tensor([self.prompt_ids[:-1]], device=self.device), None, cache)
        if self.row == 0:
            self.clock.prefilled([Row(self.prompt_ids, self.sample.seed, self.gen.max_new_tokens)])
        return cache

    def _judge(self, logits: torch.Tensor, draft: Draft, trace_top: int) -> Round:
        """The round over one pass's logits: position i judges ``draft.tokens[i]``; the
        position after the last drafted token chooses a bonus token."""
        logprobs = torch.log_softmax(logits, dim=-1)
        entropy = entropies(logprobs).tolist()
        top = logprobs.topk(min(trace_top, logprobs.shape[-1])) if trace_top else None
        n = len(draft.tokens)
        result = Round(draft.tokens, draft.q[list(range(n)), draft.tokens].tolist())
        for i in range(n + 1):
            if i < n:
                chosen, (kept,), p = self.sampler.verify(logits[i : i + 1], draft.tokens[i : i + 1], draft.q[i : i + 1])
                result.p.append(float(p[0, draft.tokens[i]]))
            else:
                (chosen, p), kept = self.sampler.propose(logits[i : i + 1]), False
            note_constraint(self.sampler, [self.sample])
            token = int(chosen[0])
            self.sampler.accept([token])
            self._record(token, float(logprobs[i, token]), entropy[i], alternatives(top, i))
            if kept:
                result.accepted += 1
            else:
                result.token_id, result.token_p, result.resampled = token, float(p[0, token]), i < n
            if not kept or self.sample.finish_reason is not None:
                break
        return result

    def _record(self, token: int, logprob: float, entropy: float, alts) -> None:
        """One token of the text, recorded and streamed as plain decoding does."""
        self.clock.chose()
        self.sequence.append(token)
        self.sample.entropies.append(entropy)
        at_limit = self.reason if len(self.sample.token_ids) + 1 == self.limit else None
        delta = record_token(self.sample, self.text, token, logprob, alts, self.stop_ids, at_limit, self.sampler.complete(0))
        if self.on_token is not None:
            self.on_token(self.row, token, logprob, entropy, delta)
