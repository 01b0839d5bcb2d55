"""The one way the pipeline makes its rich consoles, so logs read well in a terminal and in a file.

In a terminal: rich as usual (live progress bars, tables fitted to the window). When the output is
not a terminal (a log file, a CI console, a pipe): no live progress (callers print one plain line per
epoch instead; see `live_progress`), and a console wide enough that tables keep their natural width
and long lines are not wrapped or cut (rich would otherwise assume 80 columns and shorten table
cells to `epo…`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.rule import Rule

LOG_WIDTH = 1000  # "no limit" for a log file: a table is sized to its content, never cut
RULE_WIDTH = 80  # a section rule in a log file (a rule always spans the whole width)


def make_console(**kwargs: Any) -> Console:
    """A rich Console (same keyword arguments); wide, and so never truncating, when not a terminal."""
    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs:
        console.width = LOG_WIDTH
    return console


def live_progress(console: Console | None) -> bool:
    """Whether to show a live progress bar on `console`: only on a terminal (a log gets blank lines)."""
    return console is not None and console.is_terminal and not console.quiet


def rule(console: Console, title: str) -> None:
    """A section rule: the terminal's width on a terminal, RULE_WIDTH columns in a log."""
    console.print(Rule(title), width=None if console.is_terminal else min(console.width, RULE_WIDTH))
