"""The one way the pipeline makes its rich consoles and its loggers, so logs read well in a terminal and in a file.

In a terminal: rich as usual (live progress bars, tables fitted to the window). When the output is
not a terminal (a log file, a CI console, a pipe): no live progress (callers print one plain line per
epoch instead; see `live_progress`), and a console wide enough that tables keep their natural width
and long lines are not wrapped or cut (rich would otherwise assume 80 columns and shorten table
cells to `epo…`).

Messages (what a stage or the library did, warnings) go through `logging`: `get_logger(__name__)`
returns a logger under `pipeline`, whose one handler `setup_logging` installs on first use: a
RichHandler on a terminal, plain `time LEVEL name: message` lines otherwise; under DDP only rank 0
logs below WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
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


# -- logging ---------------------------------------------------------------------------------
# Library messages (what happened, warnings) go through `logging`; rich tables and progress bars stay
# on a Console. Both write to stdout, so a redirected log keeps them in order.

PACKAGE_LOGGER = "pipeline"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_NAME = "pipeline-stdout"


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stdout` is when a record is written (pytest and redirections swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:  # StreamHandler.__init__ assigns it; stdout is always looked up
        pass


class _MainRankOnly(logging.Filter):
    """Under DDP (torchrun sets RANK) only rank 0 logs below WARNING, so a message appears once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


def _rank() -> int:
    import torch.distributed as dist  # lazy: keep `pipeline.log` importable without initialising torch

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO, force: bool = False) -> logging.Logger:
    """Give the `pipeline` logger one stdout handler: rich on a terminal, plain timestamped lines otherwise.

    Idempotent (the handler is installed once; `force=True` rebuilds it, e.g. after stdout became a
    terminal). Records do not propagate to the root logger, so nothing is printed twice.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    ours = [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]
    if ours and not force:
        return logger
    for handler in ours:
        logger.removeHandler(handler)
    handler: logging.Handler
    if sys.stdout.isatty():
        handler = RichHandler(console=make_console(), show_path=False, markup=False, rich_tracebacks=False)
    else:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT, PLAIN_DATE_FORMAT))
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_MainRankOnly())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass `__name__`), under the `pipeline` logger set up by `setup_logging`."""
    setup_logging()
    if name != PACKAGE_LOGGER and not name.startswith(PACKAGE_LOGGER + "."):
        name = f"{PACKAGE_LOGGER}.{name}"  # stages.* and scripts log through the same handler
    return logging.getLogger(name)
