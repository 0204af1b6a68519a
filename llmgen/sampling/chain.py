"""The sampler: one ordered chain of stages, built in one place, that every decoder calls.

``build_sampler`` turns a ``SamplingConfig`` into stages in the documented order,
leaving out every stage whose setting is neutral (so the default chain is just the
draw). Greedy decoding keeps the stages that change what the model prefers and ends
in ``Greedy``; sampling keeps them all and ends in a seeded ``Draw`` (or ``Mirostat``).

A decode loop only ever calls ``choose`` (or ``explain``, which chooses too and says
what each stage did), ``accept`` and ``keep``; scoring a given text calls ``judge``
(how probable the chain makes the text's token, and which stage removed it) and ``accept``.
Speculative decoding adds three: a drafter calls ``propose`` (a token and the q it was
drawn from) and takes its draft back with ``save``/``restore``; the verifier calls
``verify`` (keep the drafted token, or choose another, so the token is distributed as
``choose``'s). Because the verifier goes through a draft one position at a time,
accepting each token before judging the next, every stage with history (penalties,
DRY, n-gram bans, min-new-tokens, mirostat's mu) sees exactly the text it would see
without speculation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmgen.config import SamplingConfig
from llmgen.errors import BrokenLogits, LlmgenError
from llmgen.sampling.constraints import BadWords, LogitBias, MinNewTokens, NoRepeatNGram
from llmgen.sampling.dry import DRY
from llmgen.sampling.grammar import Constrain
from llmgen.sampling.penalties import Penalties
from llmgen.sampling.stage import Rows, Stage, Terminal
from llmgen.sampling.temperature import Temperature
from llmgen.sampling.terminal import Draw, Greedy, Mirostat
from llmgen.sampling.tokens import TokenRules
from llmgen.sampling.truncation import XTC, Epsilon, Eta, MinP, TopK, TopNSigma, TopP, Typical

# Constraints on which tokens may come next: they always run first, in this order.
# The grammar goes before them all, so that every stage sees only what it allows.
CONSTRAINTS: tuple[str, ...] = ("constraint", "logit-bias", "no-repeat-ngram", "bad-words", "min-new-tokens")


@dataclass(frozen=True)
class Context:
    """What a stage may need besides its settings."""

    cfg: SamplingConfig
    rows: Rows
    vocab_size: int
    eos: tuple[int, ...]
    tokens: TokenRules


def _penalties(c: Context) -> Stage | None:
    cfg = c.cfg
    if (cfg.repetition_penalty == 1.0 and not cfg.presence_penalty and not cfg.frequency_penalty) or cfg.repeat_last_n == 0:
        return None
    return Penalties(c.rows, c.vocab_size, cfg.repetition_penalty, cfg.frequency_penalty, cfg.presence_penalty, cfg.repeat_last_n)


def _dry(c: Context) -> Stage | None:
    cfg = c.cfg
    if cfg.dry_multiplier == 0 or cfg.dry_penalty_last_n == 0:
        return None
    return DRY(c.rows, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length, cfg.dry_penalty_last_n, c.tokens.dry_breakers)


def _temperature(c: Context) -> Stage | None:
    cfg = c.cfg
    if cfg.dynatemp_range == 0 and cfg.temperature in (0.0, 1.0):  # neutral, or greedy (no warpers)
        return None
    return Temperature(cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent)


# name -> the stage for this config, or None when its setting leaves it off.
FACTORIES: dict[str, Callable[[Context], Stage | None]] = {
    "constraint": lambda c: Constrain(c.rows, c.tokens.grammar) if c.tokens.grammar else None,
    "logit-bias": lambda c: LogitBias(c.tokens.logit_bias, c.vocab_size, c.rows.device) if c.tokens.logit_bias else None,
    "no-repeat-ngram": lambda c: NoRepeatNGram(c.rows, c.cfg.no_repeat_ngram_size) if c.cfg.no_repeat_ngram_size else None,
    "bad-words": lambda c: BadWords(c.rows, list(c.tokens.bad_words), c.eos) if c.tokens.bad_words else None,
    "min-new-tokens": lambda c: MinNewTokens(c.rows, c.cfg.min_new_tokens, c.eos) if c.cfg.min_new_tokens and c.eos else None,
    "penalties": _penalties,
    "dry": _dry,
    "temperature": _temperature,
    "top-n-sigma": lambda c: TopNSigma(c.cfg.top_n_sigma) if c.cfg.top_n_sigma > 0 else None,
    "top-k": lambda c: TopK(c.cfg.top_k) if c.cfg.top_k > 0 else None,
    "top-p": lambda c: TopP(c.cfg.top_p) if c.cfg.top_p < 1.0 else None,
    "min-p": lambda c: MinP(c.cfg.min_p) if c.cfg.min_p > 0.0 else None,
    "xtc": lambda c: XTC(c.rows, c.cfg.xtc_probability, c.cfg.xtc_threshold) if c.cfg.xtc_probability > 0 else None,
    "typical": lambda c: Typical(c.cfg.typical_p) if c.cfg.typical_p < 1.0 else None,
    "epsilon": lambda c: Epsilon(c.cfg.epsilon_cutoff) if c.cfg.epsilon_cutoff > 0 else None,
    "eta": lambda c: Eta(c.cfg.eta_cutoff) if c.cfg.eta_cutoff > 0 else None,
}


@dataclass
class Explanation:
    """What the chain did to one row's distribution, for showing to a person.

    ``raw`` is the model's distribution, ``tempered`` the one after the last stage that
    reshapes rather than removes (penalties, temperature), ``final`` the one the token
    is chosen from. ``removed_by[t]`` names the first stage that removed token t (None if
    it survived); ``changed_by[t]`` the stages that moved its logit and kept it.
    ``stages`` holds each stage's name and the distribution right after it (its logits
    renormalised), in chain order: how the probabilities move from ``raw`` to ``final``.
    """

    order: list[str]
    raw: torch.Tensor
    tempered: torch.Tensor
    final: torch.Tensor
    removed_by: Sequence[str | None]
    changed_by: dict[int, list[str]] = field(default_factory=dict)
    stages: list[tuple[str, torch.Tensor]] = field(default_factory=list)


class RemovedBy(Sequence):
    """``removed_by[t]``: the name of the stage that removed token t, or None. Held as one
    stage number per token and named when asked: a vocabulary-long list of names took
    milliseconds a step to build, for the few rows a view shows."""

    def __init__(self, order: list[str], removed_at: torch.Tensor) -> None:
        self.order, self.removed_at = order, removed_at  # (vocab,): 0 kept, i the i-th of ``order``

    def __len__(self) -> int:
        return len(self.removed_at)

    def __getitem__(self, token):
        if isinstance(token, slice):
            return [self[t] for t in range(len(self))[token]]
        at = int(self.removed_at[token])
        return self.order[at - 1] if at else None


@dataclass(frozen=True)
class SavedState:
    """A sampler's state at one moment (``Sampler.save``): each row's history length and
    what each stage and the terminal saved."""

    lengths: list[int]
    stages: list[object]
    terminal: object


class Sampler:
    """The stages in order, the terminal that picks, and the rows they share."""

    def __init__(self, rows: Rows, stages: list[Stage], terminal: Terminal) -> None:
        self.rows, self.stages, self.terminal = rows, stages, terminal
        # Truncation always leaves a token; only the constraints can ban every one.
        self.can_ban_all = any(s.name in CONSTRAINTS for s in stages)
        self.grammar: Constrain | None = next((s for s in stages if isinstance(s, Constrain)), None)

    @property
    def judges_by_logits(self) -> bool:
        """Whether a given token changes the chain beyond ``accept``: a stage draws in
        ``apply`` (XTC) or the terminal moves with each token's probability (mirostat),
        so a text fed to it must go through ``judge`` with each step's logits. Otherwise
        ``accept`` alone leaves the chain exactly where ``judge`` then ``accept`` would."""
        return self.terminal.observes or any(stage.draws for stage in self.stages)

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.stages] + [self.terminal.name]

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        _check_model(logits)
        for stage in self.stages:
            logits = stage.apply(logits)
        self._check_not_empty(logits)
        return logits

    def _check_not_empty(self, logits: torch.Tensor) -> None:
        if not torch.isfinite(logits).any(-1).all():
            if self.can_ban_all:
                raise LlmgenError("every token is banned at this step (by the constraint, --logit-bias, --bad-words, --min-new-tokens "
                                  "or --no-repeat-ngram-size)")
            raise LlmgenError(f"the sampler stages removed every token at this step ({', '.join(self.order)})")
        if torch.isnan(logits).any() or (logits == float("inf")).any():  # the settings' ranges are meant to prevent it
            raise LlmgenError(f"the sampler settings overflowed the logits ({', '.join(self.order)}); use less extreme values")

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The renormalised distribution each row's token is chosen from, ``(rows, vocab)``."""
        return self.terminal.distribution(self.process(logits.float()))

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row, ``(rows,)``; call ``accept`` with it before the next step."""
        return self.terminal.choose(self.process(logits.float()))

    def explain(self, logits: torch.Tensor, choose: bool = True) -> tuple[torch.Tensor | None, list[Explanation]]:
        """``choose``, recording what every stage did to each row on the way (one pass,
        so random stages draw exactly as they would without it). With ``choose=False``
        nothing is drawn and the token is None: only the account (the stages still run,
        so a random stage still draws its step's number)."""
        _check_model(logits)
        after = [logits.float()]
        for stage in self.stages:
            after.append(stage.apply(after[-1]))
        self._check_not_empty(after[-1])
        final = self.terminal.distribution(after[-1])
        chosen = self.terminal.choose(after[-1]) if choose else None
        return chosen, [self._explain_row(after, final, row) for row in range(logits.shape[0])]

    def _explain_row(self, after: list[torch.Tensor], final: torch.Tensor, row: int) -> Explanation:
        removed_at = torch.zeros(after[0].shape[-1], dtype=torch.long, device=final.device)  # 0: kept; i: stage i
        changed: dict[int, list[str]] = {}
        reshaped = 0  # index in ``after`` of the last reshaping stage's output
        for i, stage in enumerate(self.stages, 1):
            before, now = after[i - 1][row], after[i][row]
            removed_at.masked_fill_(torch.isfinite(before) & ~torch.isfinite(now), i)  # a removed token stays removed
            if not stage.truncates:
                reshaped = i
                if stage.name != "temperature":
                    for tok in torch.nonzero(torch.isfinite(now) & (now != before)).flatten().tolist():
                        changed.setdefault(tok, []).append(stage.name)
        removed_at.masked_fill_((final[row] == 0) & torch.isfinite(after[-1][row]), len(self.stages) + 1)
        return Explanation(
            self.order,
            torch.softmax(after[0][row], -1),
            torch.softmax(after[reshaped][row], -1),
            final[row],
            RemovedBy(self.order, removed_at.cpu()),
            changed,
            [(stage.name, torch.softmax(after[i][row], -1)) for i, stage in enumerate(self.stages, 1)],
        )

    def judge(self, logits: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[str | None]]:
        """For a text scored rather than generated: each row's probability of its given
        token under the final distribution, and the first stage that removed it (None
        if it survived). The stages run exactly as in ``choose``, so random ones draw
        the same numbers, but nothing is drawn: the terminal hears the given token as
        if it had chosen it. Call ``accept`` with the tokens before the next step."""
        _check_model(logits)
        index = torch.tensor(tokens, device=logits.device)[:, None]
        x = logits.float()
        removed: list[str | None] = [None] * len(tokens)
        for stage in self.stages:
            before = torch.isfinite(x.gather(-1, index))[:, 0]
            x = stage.apply(x)
            gone = before & ~torch.isfinite(x.gather(-1, index))[:, 0]
            for row in torch.nonzero(gone).flatten().tolist():
                removed[row] = stage.name
        self._check_not_empty(x)
        final = self.terminal.distribution(x)
        probs = final.gather(-1, index)[:, 0].tolist()
        for row, p in enumerate(probs):
            if p == 0 and removed[row] is None and bool(torch.isfinite(x[row, tokens[row]])):
                removed[row] = self.terminal.name
        self.terminal.observe(final, tokens)
        return probs, removed

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``choose``, and the distribution each row's token was drawn from, ``(rows, vocab)``:
        what a drafter hands the verifier as q. Call ``accept`` with the tokens."""
        x = self.process(logits.float())
        final = self.terminal.distribution(x)  # before choosing: mirostat's choice moves mu
        return self.terminal.choose(x), final

    def verify(self, logits: torch.Tensor, drafted: list[int], q: torch.Tensor) -> tuple[torch.Tensor, list[bool], torch.Tensor]:
        """Speculative decoding's step: each row's token given the drafted one (drawn from
        ``q``, ``(rows, vocab)``), by the terminal's rule (``Terminal.verify``); whether it
        is the drafted token; and the final distribution p it was judged by. The stages
        run as in ``choose``. Call ``accept`` with the tokens before the next position."""
        final = self.distribution(logits)
        tokens, kept = self.terminal.verify(final, drafted, q.to(final.device))
        return tokens, kept, final

    def save(self) -> SavedState:
        """The state that ``accept`` and the terminal's choices change, to ``restore`` later."""
        return SavedState([len(h) for h in self.rows.history], [s.save() for s in self.stages], self.terminal.save())

    def restore(self, saved: SavedState) -> None:
        """Take back every token accepted since ``saved`` (same rows, none dropped since).
        Random generators draw on: a restored draft must not replay its numbers."""
        self.rows.truncate(saved.lengths)
        for stage, state in zip(self.stages, saved.stages):
            stage.restore(state)
        self.terminal.restore(saved.terminal)

    def constraint_kept(self) -> list[float] | None:
        """Per row, the log of the probability the constraint kept at the last step
        (under the model's own distribution); None when there is no constraint."""
        return None if self.grammar is None else list(self.grammar.kept)

    def complete(self, row: int) -> bool:
        """Whether the constraint has finished this row's text (after ``accept``)."""
        return self.grammar is not None and self.grammar.complete(row)

    def accept(self, tokens: torch.Tensor | list[int]) -> None:
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        self.rows.append(tokens)
        for stage in self.stages:
            stage.accept(tokens)

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on, in this order (the decode loop dropped the others)."""
        self.rows.keep(rows)
        for stage in self.stages:
            stage.keep(rows)
        self.terminal.keep(rows)


def _check_model(logits: torch.Tensor) -> None:
    """NaN or +inf from the model itself (-inf is a token it rules out): no sampler setting
    can make sense of it, and torch's draw would fail with a message about probabilities."""
    if torch.isnan(logits).any() or (logits == float("inf")).any():
        raise BrokenLogits()


def build_sampler(
    cfg: SamplingConfig,
    prompts: list[list[int]],
    seeds: list[int | None],
    vocab_size: int,
    device: torch.device | str = "cpu",
    eos: tuple[int, ...] = (),
    tokens: TokenRules | None = None,
) -> Sampler:
    """The chain for ``cfg`` over these rows (prompt ids and seed each; seeds may be None
    when greedy). ``eos`` are the ids ``min_new_tokens`` holds back; ``tokens`` the ids
    behind the text-valued settings (``sampling.tokens.resolve_tokens``).

    Order: the constraints, then ``cfg.order``. Greedy keeps only the stages that are
    not warpers (and top-k, when k = 1 is what makes it greedy) and ends in ``Greedy``;
    mirostat drops the truncation stages and ends in ``Mirostat`` (as llama.cpp does);
    otherwise the chain ends in a seeded ``Draw``.
    """
    if tokens is None:
        if cfg.logit_bias or cfg.bad_words or cfg.dry_multiplier > 0 or cfg.constraint:
            raise ValueError("this config names tokens by text: resolve them first (sampling.tokens.resolve_tokens)")
        tokens = TokenRules()
    rows = Rows(prompts, seeds, device)
    context = Context(cfg, rows, vocab_size, tuple(eos), tokens)
    stages = [s for s in (FACTORIES[name](context) for name in CONSTRAINTS + cfg.order) if s is not None]
    if cfg.greedy:
        # Top-k 1 is greedy too; its stage stays (it keeps the argmax, so nothing changes),
        # so that a scored text's token is "removed by top-k", the flag that was given.
        kept = [s for s in stages if not s.warper or (s.name == "top-k" and cfg.top_k == 1)]
        return Sampler(rows, kept, Greedy())
    if cfg.mirostat:
        kept = [s for s in stages if not s.truncates]
        return Sampler(rows, kept, Mirostat(rows, cfg.mirostat, cfg.mirostat_tau, cfg.mirostat_eta, vocab_size))
    return Sampler(rows, stages, Draw(rows))
