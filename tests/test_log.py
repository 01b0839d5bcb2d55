"""pipeline.log's logging: plain timestamped lines when stdout is not a terminal, rich on one, rank 0 only."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from rich.logging import RichHandler

from pipeline.log import get_logger, setup_logging


@pytest.fixture(autouse=True)
def _plain_handler_after():
    yield
    setup_logging(force=True)  # whatever a test did to stdout, later tests get the plain handler again


def test_not_a_terminal_gives_plain_timestamped_lines_on_stdout(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    setup_logging(force=True)
    get_logger("pipeline.some_module").info("packed %d chips", 3)
    get_logger("stages.infer").warning("something odd")
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO pipeline\.some_module: packed 3 chips", out[0])
    assert out[1].endswith("WARNING pipeline.stages.infer: something odd")  # stage loggers share the handler
    ours = lambda: [h for h in logging.getLogger("pipeline").handlers if h.get_name() == "pipeline-stdout"]
    assert len(ours()) == 1  # set up once, however often it is called
    setup_logging()
    assert len(ours()) == 1


def test_other_ranks_log_warnings_only(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in the second process
    log = get_logger("pipeline.train")
    log.info("epoch 1/2 ...")
    log.warning("left out 2 unreadable images")
    out = capsys.readouterr().out
    assert "epoch 1/2" not in out and "left out 2 unreadable images" in out
    monkeypatch.setenv("RANK", "0")
    log.info("epoch 2/2 ...")
    assert "epoch 2/2" in capsys.readouterr().out


def test_a_terminal_gets_the_rich_handler(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    logger = setup_logging(force=True)
    assert [type(h) for h in logger.handlers if h.get_name() == "pipeline-stdout"] == [RichHandler]
    get_logger("pipeline.models").info("init_weights: loaded the tensors")
    assert "init_weights: loaded the tensors" in terminal.getvalue()
