"""Speculative decoding drawn for a person (``run --show-speculation``) and as a JSON field.

Every round is one pass of the model: its drafted tokens, each with the model's p and
the draft's q, whether it was kept, and the token the model then chose itself (in place
of a rejected draft, or as a bonus after an accepted one).
"""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from llmgen.render import prob_text, token_label, widest_that_fits

METHODS = {"draft-model": "draft model", "prompt-lookup": "prompt lookup"}
# (word, symbol, style) for each fate of a token in a round
FATES = {
    "kept": ("kept", "✓", "green"),
    "rejected": ("rejected", "✗", "red"),
    "unjudged": ("unjudged", "·", "dim"),
    "resampled": ("resampled", "↺", "bold yellow"),
    "bonus": ("bonus", "+", "cyan"),
    "no draft": ("no draft", "=", "dim"),
}


def _fates(r) -> list[str]:
    """What happened to each drafted token of round ``r``."""
    return ["kept" if i < r.accepted else "rejected" if i < len(r.p) else "unjudged" for i in range(len(r.draft))]


def _chosen_fate(r) -> str:
    return "resampled" if r.resampled else "bonus" if r.draft else "no draft"


def speculation_caption(spec, generated: int) -> str:
    """The totals: rounds (passes of the model), drafted tokens kept, tokens per pass."""
    rate = f" ({spec.acceptance_rate:.0%})" if spec.drafted else ""
    per_pass = generated / len(spec.rounds) if spec.rounds else 0.0
    return (f"{len(spec.rounds)} rounds (passes of the model) · {spec.accepted} of {spec.drafted} drafted tokens kept{rate}"
            f" · {per_pass:.2f} tokens per pass")


def speculation_table(spec, token_text, generated: int, width: int | None = None) -> Table:
    """One row per drafted token (p, q, kept or not) and one for the token the model chose
    itself, round by round. As ``width`` narrows the borders go, then the fates become
    symbols, explained in the caption; tokens and numbers are never cut."""
    title = f"speculative decoding: {METHODS[spec.method]}, up to {spec.draft_tokens} drafted per round"

    def layout(framed: bool, words: bool) -> Table:
        legend = "" if words else "\n" + " ".join(f"{s} {w}" for w, s, _ in FATES.values())
        table = Table(title=title, title_justify="left", caption=speculation_caption(spec, generated) + legend,
                      caption_justify="left")
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, (0, 1), False, False
        table.add_column("round", justify="right", style="dim", no_wrap=True)
        table.add_column("token", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True)
        table.add_column("q", justify="right", no_wrap=True)
        table.add_column("", no_wrap=True)
        for n, r in enumerate(spec.rounds, 1):
            label = str(n)
            for i, (token, fate) in enumerate(zip(r.draft, _fates(r))):
                p = prob_text(r.p[i]) if i < len(r.p) else "—"
                table.add_row(label, token_label(token_text(token)), p, prob_text(r.q[i]), _fate(fate, words))
                label = ""
            if r.token_id is not None:
                fate = _chosen_fate(r)
                table.add_row(label, "→ " + token_label(token_text(r.token_id)), prob_text(r.token_p), "", _fate(fate, words))
        return table

    return widest_that_fits(width, [lambda: layout(True, True), lambda: layout(False, True), lambda: layout(False, False)])


def _fate(fate: str, words: bool) -> Text:
    word, symbol, style = FATES[fate]
    return Text(f"{symbol} {word}" if words else symbol, style=style)


def speculation_summary(samples) -> Text:
    """The dim line after a speculative run: drafted tokens kept and tokens per pass."""
    rounds = sum(len(s.speculation.rounds) for s in samples)
    drafted = sum(s.speculation.drafted for s in samples)
    accepted = sum(s.speculation.accepted for s in samples)
    tokens = sum(len(s.token_ids) for s in samples)
    rate = f" ({accepted / drafted:.0%})" if drafted else ""
    return Text(f"[speculation: {accepted} of {drafted} drafted tokens kept{rate} · "
                f"{tokens / max(rounds, 1):.2f} tokens per pass of the model]", style="dim")


def speculation_record(spec, token_text, generated: int) -> dict:
    """A record's ``speculation``: the totals, and each round with its drafted tokens
    (``accepted``: true, false, or null when the round ended before judging it) and the
    token the model chose itself (null when the text ended among the drafted tokens)."""
    rate = spec.acceptance_rate
    return {
        "method": spec.method,
        "draft_tokens": spec.draft_tokens,
        "drafted": spec.drafted,
        "accepted": spec.accepted,
        "acceptance_rate": None if rate is None else round(rate, 4),
        "tokens_per_round": round(generated / len(spec.rounds), 4) if spec.rounds else None,
        "rounds": [
            {
                "draft": [
                    {"token_id": t, "token": token_text(t), "q": r.q[i], "p": r.p[i] if i < len(r.p) else None,
                     "accepted": {"kept": True, "rejected": False, "unjudged": None}[fate]}
                    for i, (t, fate) in enumerate(zip(r.draft, _fates(r)))
                ],
                "accepted": r.accepted,
                "token_id": r.token_id,
                "token": None if r.token_id is None else token_text(r.token_id),
                "p": r.token_p,
                "resampled": r.resampled,
            }
            for r in spec.rounds
        ],
    }
