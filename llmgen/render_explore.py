"""What ``llmgen explore`` draws: the candidates table, the path so far, the explored
tree, and the tree exported as JSON, SVG or HTML. Shared by the app and ``--script``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from llmgen.errors import LlmgenError
from llmgen.render import (make_console, prob_text, prompt_label, token_color, token_label, tree_label, tree_stats,
                           widest_that_fits)

MARK_LABELS = {"greedy": "greedy", "sampled": "sampled", "beam": "beam", "exact": "★ exact"}
LEGEND = ("▶ the current node · bold: the current path · ★ an exact search's optimum · greedy, sampled, beam: "
          "how a branch was made · ■ the text ended · p: next-token probability · Σ: logprob so far")


def tree_legend() -> Text:
    return Text(LEGEND, style="dim")


def candidate_headers(cands) -> list[str]:
    """The table's columns: rank, token, id, the model's p, p right after each stage
    of the chain, the p a token is drawn with, and the stage that removed it."""
    return ["#", "token", "id", "model p", *[f"{name}" for name, _ in cands.stages], "final p", "removed by"]


def candidate_row(row, token_text, explored: bool = False) -> list:
    """One candidate's cells (``explored``: the tree already has this branch, marked •)."""
    label = Text(token_label(token_text(row.token)) + (" •" if explored else ""), style="dim" if row.removed_by else "")
    after = [prob_text(p) if p > 0 else "—" for p in row.stages]
    return [str(row.rank), label, str(row.token), prob_text(row.prob), *after,
            prob_text(row.final) if row.final > 0 else "—", row.removed_by or ""]


def candidates_summary(cands, seed: int | None = None) -> Text:
    stages = " → ".join(cands.order)
    return Text(f"entropy {cands.entropy:.3f} nats (model), {cands.final_entropy:.3f} after the sampler · "
                f"{cands.drawable} of {len(cands.raw)} tokens can be drawn · samplers: {stages}"
                + (f" · seed {seed}" if seed is not None else ""), style="dim")


def candidates_table(cands, tokens: list[int], token_text, explored: set[int] = frozenset(), title: str = "",
                     width: int | None = None) -> Table:
    """``show``'s table: ``tokens``' rows (``candidates_summary`` goes below it). As
    ``width`` narrows, the frame goes, then the id column."""
    rows = cands.rows(tokens)

    def layout(framed: bool, ids: bool) -> Table:
        table = Table(title=title or None, title_justify="left")
        if not framed:
            table.box, table.padding, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, (0, 1), False, False
        headers = candidate_headers(cands)
        for i, header in enumerate(headers):
            if i == 2 and not ids:
                continue
            last = i == len(headers) - 1  # "removed by" may wrap: a stage's name is never cut
            table.add_column(header, justify="left" if i == 1 or last else "right", no_wrap=not last)
        for row in rows:
            cells = candidate_row(row, token_text, row.token in explored)
            table.add_row(*(cells if ids else cells[:2] + cells[3:]))
        return table

    return widest_that_fits(width, [lambda: layout(True, True), lambda: layout(False, True), lambda: layout(False, False)])


def path_text(session) -> Text:
    """The prompt (dim), then each token of the path coloured by its probability, and
    the path's log-probability."""
    decode = session.ckpt.decode
    shown = decode(session.prompt_ids)
    text = Text(shown, style="dim")
    ids = list(session.prompt_ids)
    for node in session.path()[1:]:  # each token's piece: what it adds to the decoded text
        ids.append(node.token_id)
        now = decode(ids)
        piece = now[len(shown):] if now.startswith(shown) else session.ckpt.token_text(node.token_id)
        if node.ended and not piece:
            piece = session.ckpt.token_text(node.token_id)
        text.append(piece, style=token_color("prob", node.logprob, 0.0))
        shown = now
    n = session.node.depth
    text.append(f"\nΣ={session.node.cumulative:.3f} · {n} token{'s' * (n != 1)}", style="dim")
    if session.node.ended:
        text.append(" · ■ the text ended", style="dim")
    return text


def explore_tree(session, wrap: bool = True) -> Tree:
    """Every branch explored so far, drawn as the beam tree is (most probable first),
    the current path bold and the current node marked ▶. ``wrap=False`` keeps each
    node on one line, however long, for a pane that scrolls sideways."""
    on_path = {n.id for n in session.path()}
    token_text = session.ckpt.token_text
    root_style = "bold reverse" if session.current == 0 else "bold"
    tree = Tree(Text.assemble(("▶ " if session.current == 0 else "", root_style), ("explored ", "dim"),
                              (prompt_label(session.prompt), root_style)), guide_style="dim")

    def label(node):
        style = ("bold reverse" if node.id == session.current else "bold") if node.id in on_path else ""
        exact = "exact" in node.marks
        token = Text(("▶ " if node.id == session.current else "") + ("★ " if exact else ""), style=style)
        token.append(token_label(token_text(node.token_id)), style=style + (" green" if exact and not style else ""))
        stats = tree_stats(node.logprob, node.cumulative, "" if node.id in on_path else "dim")
        for mark, detail in node.marks.items():
            if mark != "exact" or detail:
                stats.append(f"  {MARK_LABELS[mark] if mark != 'exact' else 'exact'}{' ' + detail if detail else ''}",
                             style="green" if mark == "exact" else "cyan")
        if node.ended:
            stats.append("  ■ end", style="cyan")
        return tree_label(token, stats) if wrap else Text.assemble(token, "  ", stats, no_wrap=True, overflow="ignore")

    def add(branch: Tree, node) -> None:
        for child in children(session, node):
            add(branch.add(label(child)), child)

    add(tree, session.nodes[0])
    return tree


def children(session, node) -> list:
    """A node's children in the order the tree draws them: most probable path first."""
    return sorted((session.nodes[c] for c in node.children), key=lambda c: -c.cumulative)


def tree_line(session, node_id: int) -> int:
    """The line on which ``explore_tree`` draws node ``node_id`` (the root's is 0)."""
    line, stack = 0, [session.nodes[0]]
    while stack:
        node = stack.pop()
        if node.id == node_id:
            return line
        line += 1
        stack.extend(reversed(children(session, node)))
    raise ValueError(f"no node {node_id}")


def export(session, path: str) -> None:
    """Write the session to ``path``: ``.json`` its record, ``.svg`` or ``.html`` the
    tree and the path as Rich draws them (``Console.export_svg``/``export_html``)."""
    kind = Path(path).suffix.lower()
    if kind == ".json":
        data = json.dumps(session.record(), ensure_ascii=False, indent=1) + "\n"
    else:
        console = make_console(record=True, width=100, file=io.StringIO(), color_system="truecolor")
        console.print(Group(explore_tree(session), tree_legend(), Text(""), path_text(session)))
        data = console.export_svg(title="llmgen explore") if kind == ".svg" else console.export_html()
    try:
        Path(path).write_text(data, encoding="utf-8")
    except OSError as e:
        raise LlmgenError(f"{path}: cannot write the export ({e.strerror})") from None
