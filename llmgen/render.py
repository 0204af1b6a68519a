"""Everything llmgen draws for a person: streamed text, sample lists, score tables.

Rich decides colour from the stream it writes to: a pipe or ``NO_COLOR`` gets plain
text with no control codes, so the same views work in a terminal and in a pipeline.
"""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmgen.errors import OutputClosed


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich would exit 1 here; hand the closed pipe to the CLI, which ends quietly."""
        raise OutputClosed


def stdout_console() -> Console:
    return _Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return _Console(stderr=True, highlight=False, soft_wrap=True)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


class TextStream:
    """Writes a continuation as it is generated: plain writes, flushed per delta."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def prompt(self, text: str) -> None:
        self.console.print(Text(text, style="bold"), end="")

    def __call__(self, _row: int, delta: str) -> None:
        self.console.print(Text(delta), end="")
        self.console.file.flush()

    def end(self) -> None:
        self.console.print()


def sample_header(index: int, seed: int | None, finish_reason: str | None, n_tokens: int) -> Text:
    parts = [f"sample {index + 1}"]
    if seed is not None:
        parts.append(f"seed {seed}")
    parts.append(f"{n_tokens} tokens, {finish_reason}")
    return Text(" · ".join(parts), style="dim")


def run_summary(n_tokens: int, finish_reason: str | None, seed: int | None, seconds: float) -> Text:
    rate = f"{n_tokens / seconds:.1f} tok/s" if seconds > 0 else ""
    seed_part = f"seed {seed}" if seed is not None else "greedy"
    return Text(f"[{n_tokens} tokens · {finish_reason} · {seed_part} · {rate}]", style="dim")


def score_table(tokens: list[str], token_ids: list[int], logprobs: list[float | None], perplexity: float | None) -> Table:
    table = Table(title=f"perplexity {perplexity:.3f}" if perplexity is not None else None, title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    table.add_column("id", justify="right", style="dim")
    table.add_column("logprob", justify="right")
    table.add_column("prob", justify="right")
    for i, (tok, tid, lp) in enumerate(zip(tokens, token_ids, logprobs)):
        if lp is None:
            table.add_row(str(i), repr(tok), str(tid), "—", "(no context)")
        else:
            table.add_row(str(i), repr(tok), str(tid), f"{lp:.4f}", f"{math.exp(lp):.4f}")
    return table
