"""Stage artifacts: `weights/<name>.safetensors` + `<name>.json` manifest, written atomically.

Every file goes through `atomic_write` (temporary name, fsync, rename; the umask's mode). A stage
holds its weights folder's `WeightsLock` for its whole run, so two runs never share one folder.

The manifest holds the stage, its resolved config, the model spec, the dataset fingerprint, the
sha256 of each parent artifact, metrics, code version and time. A stage reads its parents through
`load_artifact`, which stops with one line naming the stage to run when a parent is missing,
damaged or made from another dataset.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.registry import ARTIFACT_OF_STAGE, STAGE_OF_ARTIFACT


@dataclass(frozen=True)
class ArtifactPaths:
    """Every file that belongs to one artifact, side by side in the weights dir."""

    weights: Path
    manifest: Path
    metrics_csv: Path
    resume: Path
    split: Path

    @classmethod
    def of(cls, weights_dir: str | Path, name: str) -> "ArtifactPaths":
        base = Path(weights_dir) / name
        return cls(
            weights=base.with_suffix(".safetensors"),
            manifest=base.with_suffix(".json"),
            metrics_csv=Path(f"{base}.metrics.csv"),
            resume=Path(f"{base}.resume.pt"),
            split=Path(f"{base}.split.csv"),
        )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


Content = Union[str, bytes, Callable[[BinaryIO], object]]


def _write_temp(path: Path, content: Content) -> Path:
    """Write `content` completely to a temporary file beside `path` and fsync it; returns its name.

    `content` is text (UTF-8), bytes, or a function that writes into the binary file handle (e.g.
    `lambda fh: torch.save(obj, fh)`). The file is created by `open`, so it gets the mode every new
    file gets (0666 less the umask, 0644 usually) and keeps it through the rename: weights are as
    readable by a teammate as the manifest beside them. A failed write removes the temporary file.
    """
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, content: Content) -> None:
    """The one way this project writes a file: to a temporary name in the same folder, fsync, rename over `path`.

    An interrupted write leaves the previous `path` (or none) and no temporary file behind.
    """
    path = Path(path)
    os.replace(_write_temp(path, content), path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a text (UTF-8)."""
    atomic_write(path, text)


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not sha:
        return __version__
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}"


def make_manifest(
    stage: str,
    config: dict[str, Any],
    model_spec: dict[str, Any],
    dataset_fingerprint: str,
    parents: dict[str, str],
    metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a new artifact; `parents` maps parent artifact name -> its sha256."""
    return {
        "stage": stage,
        "artifact": ARTIFACT_OF_STAGE.get(stage, stage),
        "config": config,
        "model": model_spec,
        "dataset_fingerprint": dataset_fingerprint,
        "parents": parents,
        "metrics": metrics,
        "code_version": code_version(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def save_artifact(
    weights_dir: str | Path, name: str, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> Path:
    """Write `<name>.safetensors` and `<name>.json` atomically; the previous pair becomes `<name>.prev.*`."""
    paths = ArtifactPaths.of(weights_dir, name)
    paths.weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # safetensors' save_file creates its file with mode 0600; serialise to bytes and write them ourselves
    blob = save_safetensors(tensors)
    tmp_weights = _write_temp(paths.weights, blob)
    manifest = dict(manifest, weights_sha256=hashlib.sha256(blob).hexdigest())
    del blob
    try:
        tmp_manifest = _write_temp(paths.manifest, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        raise
    if paths.weights.exists() and paths.manifest.exists():
        os.replace(paths.weights, paths.weights.with_suffix(".prev.safetensors"))
        os.replace(paths.manifest, paths.manifest.with_suffix(".prev.json"))
    os.replace(tmp_weights, paths.weights)
    os.replace(tmp_manifest, paths.manifest)
    return paths.weights


def _producer_hint(name: str) -> str:
    stage = STAGE_OF_ARTIFACT.get(name)
    return f"run `python -m stages.{stage}` first" if stage else "run the stage that writes it first"


def read_manifest(weights_dir: str | Path, name: str) -> dict[str, Any]:
    """The manifest of artifact `name`; UserError naming the producing stage if it is missing."""
    paths = ArtifactPaths.of(weights_dir, name)
    if not paths.manifest.is_file() or not paths.weights.is_file():
        raise UserError(f"artifact {paths.weights.with_suffix('')} not found: {_producer_hint(name)}")
    try:
        return json.loads(paths.manifest.read_text())
    except json.JSONDecodeError:
        raise UserError(f"manifest {paths.manifest} is damaged: {_producer_hint(name)} again") from None


def load_artifact(
    weights_dir: str | Path, name: str, dataset_fingerprint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and manifest of a parent artifact, checked against its sha256 and the dataset."""
    manifest = read_manifest(weights_dir, name)
    paths = ArtifactPaths.of(weights_dir, name)
    if sha256_file(paths.weights) != manifest.get("weights_sha256"):
        raise UserError(
            f"artifact {paths.weights} does not match its manifest (damaged or half-written): "
            f"{_producer_hint(name)} again"
        )
    if dataset_fingerprint is not None and manifest.get("dataset_fingerprint") != dataset_fingerprint:
        raise UserError(
            f"artifact {name} was made from another dataset (or other pack settings / held-out classes): "
            f"{_producer_hint(name)} on this data"
        )
    return load_file(str(paths.weights)), manifest


def is_fresh(
    weights_dir: str | Path,
    name: str,
    config: dict[str, Any],
    dataset_fingerprint: str,
    parents: dict[str, str],
) -> bool:
    """True when artifact `name` exists, is intact, and was made from this config, data and parents."""
    paths = ArtifactPaths.of(weights_dir, name)
    if not (paths.manifest.is_file() and paths.weights.is_file()):
        return False
    try:
        manifest = json.loads(paths.manifest.read_text())
    except json.JSONDecodeError:
        return False
    same_inputs = (
        json.dumps(manifest.get("config"), sort_keys=True) == json.dumps(config, sort_keys=True)
        and manifest.get("dataset_fingerprint") == dataset_fingerprint
        and manifest.get("parents") == parents
    )
    return same_inputs and sha256_file(paths.weights) == manifest.get("weights_sha256")


LOCK_FILE = ".lock"
LOCK_OWNER_FILE = ".lock.owner.json"


class WeightsNotLockable(UserError):
    """The lock file cannot be created (e.g. a read-only folder of a teammate's weights)."""


class WeightsLock:
    """An exclusive lock on one weights folder, held by a stage for its whole run (readers too).

    Two runs writing the same `weights/` would replace each other's artifacts, and a stage reading its
    parent while another run replaces it reads a mix of both, so every stage holds this lock from
    `prepare_stage` until its main returns. It is an flock on `<weights>/.lock` (the `filelock`
    package): the kernel drops it when the holding process ends, so a run killed with `kill -9`
    never leaves a lock that blocks the next one. Who holds it (pid, host, stage, command, since) is
    written beside it in `.lock.owner.json`, so a second run can say whom it waits for; it does not
    wait but stops with one line. Both files are removed when the lock is released.
    """

    def __init__(self, weights_dir: str | Path, stage: str) -> None:
        self.weights_dir = Path(weights_dir)
        self.stage = stage
        self.path = self.weights_dir / LOCK_FILE
        self.owner_path = self.weights_dir / LOCK_OWNER_FILE
        self._lock = FileLock(self.path, timeout=0)

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> "WeightsLock":
        """Take the lock at once or stop with a UserError naming the process that holds it."""
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise UserError(
                f"weights folder {self.weights_dir} is in use by {self.holder()}: wait until it ends, "
                f"or give this run another --weights folder"
            ) from None
        except OSError as err:
            raise WeightsNotLockable(
                f"cannot lock weights folder {self.weights_dir} ({err.strerror or err}): a stage that writes "
                f"artifacts needs a folder it can write, give it another --weights"
            ) from None
        command = shlex.join(getattr(sys, "orig_argv", None) or sys.argv)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "stage": self.stage,
            "command": command,
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            atomic_write(self.owner_path, json.dumps(owner, indent=2) + "\n")
        except BaseException:
            self._lock.release()
            raise
        return self

    def holder(self) -> str:
        """Who holds the lock, from the owner file: 'stage S (pid P on H since T: command)'."""
        try:
            owner = json.loads(self.owner_path.read_text())
            text = f"stage {owner['stage']} (pid {owner['pid']} on {owner['host']} since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process (it has not yet written {self.owner_path.name})"
        command = " ".join(str(owner.get("command", "")).split())  # one line, whatever the command held
        if len(command) > 160:
            command = command[:157] + "..."
        return f"{text}: {command})" if command else f"{text})"

    def release(self) -> None:
        """Remove the owner and lock files (while still holding the lock), then release it. Idempotent."""
        if not self._lock.is_locked:
            return
        try:
            # Unlinking a held flock file is safe: a process that opened the old file and gets the lock
            # after us sees it has no name any more and retries on a new one (filelock checks st_nlink).
            self.owner_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
        finally:
            self._lock.release(force=True)

    def __enter__(self) -> "WeightsLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
