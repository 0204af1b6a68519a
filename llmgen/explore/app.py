"""``llmgen explore``'s full-screen app (Textual). It draws and dispatches; the session does
the work, off the UI thread, in one Textual worker at a time.

Imported only by ``llmgen explore`` without ``--script``, so no other command pays for
Textual (or needs it installed).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static

from llmgen import render_explore
from llmgen.errors import LlmgenError
from llmgen.explore import script

ROWS = 50  # candidate rows in the table (each costs ~0.1 ms to add); a filter searches the whole vocabulary
SETTING_KEYS = {"t": "temperature", "k": "top_k", "p": "top_p", "m": "min_p", "r": "repetition_penalty"}

HELP = """keys
  ↑ ↓ PgUp PgDn   move in the candidates table
  Enter           take the selected token (one forward pass; a node seen lately costs none)
  Backspace       go back one token (free)
  /               filter the table by token text (whole vocabulary); Esc clears it
  g               extend greedily by N tokens (asks N)
  s               sample N tokens with the current settings; sample i draws with seed + i
  b               beam search from here (asks WIDTH N); its beams become branches
  x               exact search from here (asks N); marks the optimum ★
  t k p m r       set temperature, top-k, top-p, min-p, repetition penalty
  :               any action: take 'TEXT', take id N, back N, greedy N, sample N,
                  beam W N, exact N, set NAME VALUE (any setting, or seed), export PATH
  e               export the tree: .json, .svg or .html
  ?               this help          q   quit

columns: the model's p, then p right after each stage of the sampler chain, the p a token
is drawn with, and the stage that removed it. • marks a token already explored here.
tree: ▶ current node · bold: current path · ★ exact optimum · greedy/sampled/beam: how made"""


class Ask(ModalScreen[str | None]):
    """A one-line question (N, a setting, a path); Enter answers (an empty answer takes
    the default shown), Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, question: str, default: str = "") -> None:
        super().__init__()
        self.question, self.default = question, default

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Static(self.question + (f" [{self.default}]" if self.default else ""), markup=False)
            yield Input(placeholder=self.default, id="answer")

    @on(Input.Submitted)
    def answered(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or self.default or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,enter", "close", "close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


class ExploreApp(App):
    """Three panes: the candidates at the current node (left), the path so far (top), the
    explored tree (right); a status line says what the last action did."""

    TITLE = "llmgen explore"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #path { height: auto; max-height: 8; padding: 0 1; border-bottom: solid $primary; }
    #left { width: 2fr; }
    #candidates { height: 1fr; }
    #tree-pane { width: 1fr; border-left: solid $primary; overflow-x: auto; }
    #tree { width: auto; }
    #filter { display: none; }
    #filter.shown { display: block; }
    #summary { height: auto; padding: 0 1; }
    #status { height: 1; padding: 0 1; background: $boost; }
    #ask { width: 60; height: auto; border: round $primary; padding: 0 1; background: $surface; }
    Ask, Help { align: center middle; }
    #help { width: auto; max-width: 100%; height: auto; border: round $primary; padding: 0 1; background: $surface; }
    """
    BINDINGS = [
        Binding("backspace", "back", "back"),
        Binding("g", "greedy", "greedy"),
        Binding("s", "sample", "sample"),
        Binding("b", "beam", "beam"),
        Binding("x", "exact", "exact"),
        Binding("t", "setting('t')", "temp", show=False),
        Binding("k", "setting('k')", "top-k", show=False),
        Binding("p", "setting('p')", "top-p", show=False),
        Binding("m", "setting('m')", "min-p", show=False),
        Binding("r", "setting('r')", "rep. penalty", show=False),
        Binding("colon", "command", "action"),
        Binding("slash", "filter", "filter"),
        Binding("e", "export", "export"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.busy = False
        self.model_thread = ThreadPoolExecutor(1, "llmgen-model", initializer=torch.set_num_threads,
                                               initargs=(torch.get_num_threads(),))
        self.status = ""
        self.query_text = ""
        self._columns: list[str] = []
        self.table_node: int | None = None  # the node the table shows (tests and the bench read it)

    def compose(self) -> ComposeResult:
        yield Static(id="path")
        with Horizontal():
            with Vertical(id="left"):
                yield Input(placeholder="filter by token text (Esc clears)", id="filter")
                yield DataTable(id="candidates", cursor_type="row", zebra_stripes=True)
                yield Static(id="summary")
            with VerticalScroll(id="tree-pane"):
                yield Static(id="tree")
        yield Static(id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.run_model("reading the prompt", lambda s: "? for help · Enter takes a token · Backspace goes back")

    # -- model work, one job at a time, off the UI thread

    def run_model(self, label: str, job) -> None:
        """Run ``job(session)`` off the UI thread, then redraw with the line it returns. A
        key pressed while a job runs is refused with a bell: two jobs would share one KV
        cache."""
        if self.busy:
            self.bell()
            return
        self.busy = True
        # Said only if the job is slow: a repaint while the model runs competes with it
        # for the interpreter and the cores.
        self._working = self.set_timer(0.25, lambda: self.show_status(f"{label}…"))
        self._work(job)

    @work(group="model")
    async def _work(self, job) -> None:
        """A Textual worker that hands the job to the one model thread and waits. Every job
        runs on that same thread, set to the CLI's torch thread count: OpenMP keeps a
        team of threads per calling thread, so a fresh thread a step would build a new
        team each time (and run with its default count)."""
        message = await asyncio.get_running_loop().run_in_executor(self.model_thread, self._job, job)
        self._working.stop()
        self.busy = False
        self.redraw(message)

    def _job(self, job) -> str:
        try:
            message = job(self.session)
            self.session.candidates()  # computed here, so the redraw does no model work
        except LlmgenError as e:
            message = f"error: {e}"
        return message

    def on_unmount(self) -> None:
        self.model_thread.shutdown(wait=False)

    # -- drawing

    def show_status(self, message: str) -> None:
        self.status = message
        self.query_one("#status", Static).update(message)

    def redraw(self, message: str | None = None) -> None:
        session = self.session
        if message is not None:
            self.show_status(message)
        self.query_one("#path", Static).update(render_explore.path_text(session))
        self.query_one("#tree", Static).update(render_explore.explore_tree(session, wrap=False))
        self.fill_table()
        self.call_after_refresh(self.follow_current)

    def follow_current(self) -> None:
        """Scroll the tree so that the current node is in view."""
        pane = self.query_one("#tree-pane", VerticalScroll)
        line = render_explore.tree_line(self.session, self.session.current)
        indent = 4 * self.session.node.depth
        pane.scroll_to(x=max(0, indent - pane.size.width // 3), y=max(0, line - pane.size.height // 2), animate=False)

    def fill_table(self) -> None:
        """The candidates at the current node, filtered by the query; columns change only
        when the chain's stages do."""
        session, table = self.session, self.query_one(DataTable)
        summary = self.query_one("#summary", Static)
        self.table_node = session.current
        try:
            cands = session.candidates()  # the worker computed them: no model work here
        except LlmgenError as e:  # the settings leave no token here: the job said so too
            table.clear()
            summary.update(f"error: {e}")
            return
        if cands is None:
            table.clear()
            summary.update("■ the text ended here: Backspace goes back" if session.node.ended else "")
            return
        headers = render_explore.candidate_headers(cands)
        if headers != self._columns:
            table.clear(columns=True)
            table.add_columns(*headers)
            self._columns = headers
        else:
            table.clear()
        texts = session.ckpt.vocabulary.texts() if self.query_text else []
        explored = {session.nodes[c].token_id for c in session.node.children}
        token_text = session.ckpt.token_text
        for row in cands.rows(cands.matching(texts, self.query_text, ROWS), ranked=not self.query_text):
            table.add_row(*render_explore.candidate_row(row, token_text, row.token in explored), key=str(row.token))
        summary.update(render_explore.candidates_summary(cands, session.seed))

    # -- keys

    @on(DataTable.RowSelected)
    def take_selected(self, event: DataTable.RowSelected) -> None:
        token = int(event.row_key.value)
        self.run_model("taking a token", lambda s: script.apply(s, script.Action("take", ("id", token), f"take id {token}")))

    def action_back(self) -> None:
        self.run_line("back")

    def ask_then(self, question: str, default: str, action: str) -> None:
        """Ask, then run the action ``action`` followed by the answer (``greedy`` + ``5``)."""
        def answered(value: str | None) -> None:
            if value is not None:
                self.run_line(f"{action} {value}")

        self.push_screen(Ask(question, default), answered)

    def action_greedy(self) -> None:
        self.ask_then("extend greedily by how many tokens?", "5", "greedy")

    def action_sample(self) -> None:
        self.ask_then(f"sample how many tokens? (seed {self.session.next_seed})", "5", "sample")

    def action_beam(self) -> None:
        self.ask_then("beam search from here: WIDTH N", "2 5", "beam")

    def action_exact(self) -> None:
        self.ask_then("exact search from here: up to N tokens", "5", "exact")

    def action_setting(self, key: str) -> None:
        name = SETTING_KEYS[key]
        now = getattr(self.session.gen.sampling, name)
        self.ask_then(f"{name} (now {now})", str(now), f"set {name}")

    def action_command(self) -> None:
        self.ask_then("action (take 'TEXT', back, greedy N, sample N, beam W N, exact N, set NAME VALUE, export PATH)",
                      "", "")

    def action_export(self) -> None:
        self.ask_then("export to (.json, .svg or .html)", "explore.json", "export")

    def action_help(self) -> None:
        self.push_screen(Help())

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def filtered(self, event: Input.Changed) -> None:
        self.query_text = event.value
        if not self.busy:  # else the redraw after the job filters: the session is the job's until then
            self.fill_table()

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        self.query_one(DataTable).focus()

    def on_key(self, event) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            self.query_one(DataTable).focus()
            event.stop()

    def run_line(self, line: str) -> None:
        """Actions as written (``:``, or a question's answer; several between ``;``):
        all checked first, then run in order in one job."""
        try:
            actions = script.parse(line, "action")
        except LlmgenError as e:
            self.show_status(f"error: {e}")
            return
        self.run_model(actions[0].name, lambda s: "; ".join(self._act(s, a) for a in actions))

    def _act(self, session, action: script.Action) -> str:
        if action.name in ("show", "tree"):
            return "shown"
        if action.name == "export":
            render_explore.export(session, action.args[0])
            return f"wrote {action.args[0]}"
        return script.apply(session, action)
