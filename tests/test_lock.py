"""One run at a time per weights folder: the lock every stage holds, its owner line, a killed holder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import distributed, stage as stage_mod
from pipeline.artifacts import LOCK_FILE, LOCK_OWNER_FILE, WeightsLock
from pipeline.data.synth import generate
from pipeline.errors import UserError
from stages import distill_sar, finetune_head, infer, pretrain_eo

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from pipeline.artifacts import WeightsLock
lock = WeightsLock(sys.argv[1], "pretrain_eo").acquire()  # kept referenced: a collected lock is released
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def holding(weights: Path):
    """A separate process (as a second `run_all` would be) holding `weights` as stage pretrain_eo."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(weights)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """One holder for the tests that only knock on its door (starting python + torch costs seconds)."""
    weights = tmp_path_factory.mktemp("held") / "weights"
    with holding(weights) as proc:
        yield weights, proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockdata")
    generate(root, "tiny", seed=5)
    return root


def stage_argv(data: Path, weights: Path, tmp_path: Path) -> list[str]:
    return ["--data", str(data), "--profile", "tiny", "--weights", str(weights), "--cache-dir", str(tmp_path / "cache")]


def test_a_second_holder_is_refused_with_the_owner(holder):
    weights, proc = holder
    owner = json.loads((weights / LOCK_OWNER_FILE).read_text())
    assert owner["pid"] == proc.pid and owner["stage"] == "pretrain_eo" and owner["host"] == socket.gethostname()
    assert "-c" in owner["command"]
    with pytest.raises(UserError) as err:
        WeightsLock(weights, "distill_sar").acquire()
    message = str(err.value)
    assert "\n" not in message
    assert f"weights folder {weights} is in use by stage pretrain_eo (pid {proc.pid} on {socket.gethostname()}" in message
    assert "another --weights" in message


@pytest.mark.parametrize("stage", [pretrain_eo, distill_sar, finetune_head, infer], ids=lambda m: m.__name__.split(".")[-1])
def test_every_stage_stops_on_a_held_weights_folder(holder, data, tmp_path, capsys, stage):
    weights, proc = holder
    before = sorted(p.name for p in weights.iterdir())
    extra = ["--submissions", str(tmp_path / "subs")] if stage is infer else []
    with pytest.raises(SystemExit) as exc:
        stage.main(stage_argv(data, weights, tmp_path) + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: weights folder") and f"pid {proc.pid}" in err[0]
    assert sorted(p.name for p in weights.iterdir()) == before  # nothing written, the holder's files left alone
    assert not (tmp_path / "subs").exists() and not (tmp_path / "cache").exists()  # stopped before any work
    assert proc.poll() is None


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    weights = tmp_path / "weights"
    with holding(weights) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert (weights / LOCK_FILE).exists() and (weights / LOCK_OWNER_FILE).exists()  # left behind by kill -9
    start = time.monotonic()
    lock = WeightsLock(weights, "distill_sar").acquire()
    assert time.monotonic() - start < 5
    owner = json.loads((weights / LOCK_OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["stage"] == "distill_sar"
    lock.release()
    assert not (weights / LOCK_FILE).exists() and not (weights / LOCK_OWNER_FILE).exists()


def test_a_stage_releases_the_lock_when_it_ends_or_fails(data, tmp_path, capsys):
    weights = tmp_path / "weights"
    with pytest.raises(SystemExit) as exc:  # fails inside the stage, after taking the lock: no eo_teacher
        distill_sar.main(stage_argv(data, weights, tmp_path))
    assert exc.value.code == 2 and "stages.pretrain_eo" in capsys.readouterr().err
    assert [p.name for p in weights.iterdir()] == []  # lock and owner files removed
    with WeightsLock(weights, "finetune_head"):  # free again, in this process and ...
        pass
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from pipeline.artifacts import WeightsLock; WeightsLock(sys.argv[1], 'infer').acquire()"
    assert subprocess.run([sys.executable, "-c", code, str(weights)], env=env).returncode == 0  # ... in another


def test_only_the_main_process_locks_and_only_inside_a_stage_main(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    assert stage_mod.lock_weights("pretrain_eo", weights) is None  # outside a stage's main: library use

    @stage_mod.holds_weights_lock
    def main() -> bool:
        lock = stage_mod.lock_weights("pretrain_eo", weights)
        return lock is not None and lock.is_locked and (weights / LOCK_FILE).exists()

    assert main() is True
    assert not (weights / LOCK_FILE).exists()
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)  # a torchrun rank other than 0
    weights.rmdir()
    assert main() is False and not weights.exists()


def test_a_folder_that_cannot_be_locked(tmp_path, monkeypatch, capsys):
    """Writers stop with one line; infer reads a folder it cannot write (a teammate's weights) without the lock."""
    import filelock

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)  # as root, chmod cannot show it
    weights = tmp_path / "weights"

    @stage_mod.holds_weights_lock
    def main(stage: str):
        return stage_mod.lock_weights(stage, weights)

    with pytest.raises(UserError, match=r"cannot lock weights folder .*Permission denied.*another --weights"):
        main("finetune_head")
    assert main("infer") is None
    assert "is not writable, so it is read without the lock" in capsys.readouterr().err
