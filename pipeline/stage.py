"""What every stage script shares: flags, config, the weights lock, data, device and artifacts.

A stage script is the paragraph of DESIGN.md it implements: `prepare_stage`, build the model and
task from `ctx.cfg` and `ctx.data`, `fit`, `save_stage_artifact`. The stage graph (artifacts, parents)
is `pipeline.registry`; the shared flags are `pipeline.cli`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import torch
from rich.console import Console

from pipeline import distributed
from pipeline.artifacts import (
    ArtifactPaths, WeightsLock, WeightsNotLockable, atomic_write_text, is_fresh, load_artifact, make_manifest,
    read_manifest, save_artifact, sha256_file,
)
from pipeline.cli import DEFAULT_DATA, DEFAULT_WEIGHTS, REPO_ROOT, add_run_flags, data_root  # noqa: F401 (re-exported)
from pipeline.config import Config, load_config, stage_config, with_overrides
from pipeline.data.geometry import ChipGeometry, resolve_geometry
from pipeline.data.layout import DatasetLayout, apply_holdout, describe, discover_layout
from pipeline.data.module import StageData
from pipeline.data.pack import pack_dataset
from pipeline.errors import UserError
from pipeline.log import make_console
from pipeline.models import ChipClassifier, create_model, model_from_spec
from pipeline.registry import ARTIFACT_OF_STAGE, STAGE_OF_ARTIFACT, stage_spec
from pipeline.status import write_status
from pipeline.train import FitResult, TrainTask, fit

F = TypeVar("F", bound=Callable[..., object])


def build_parser(stage: str, description: str | None) -> argparse.ArgumentParser:
    """The shared flags (pipeline.cli) plus what this stage's registry entry calls for."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=(description or "").strip().splitlines()[0] if description else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_flags(parser)
    if stage_spec(stage).training:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted training run from its last epoch checkpoint")
    parser.add_argument("--skip-fresh", action="store_true", help="exit without work when the artifact is already up to date (same config, data, parents)")
    parser.add_argument("--status-file", type=Path, default=None, help=argparse.SUPPRESS)  # run_all reads what the stage did
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Profile + --set overrides, with --seed and --holdout-classes folded in so manifests record them."""
    cfg = load_config(args.profile, args.overrides)
    folded: dict[str, Any] = {}
    if args.seed is not None:
        folded["seed"] = args.seed
    if args.holdout_classes:
        folded["data.holdout_classes"] = [c.strip() for c in args.holdout_classes.split(",") if c.strip()]
    return with_overrides(cfg, folded) if folded else cfg


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


@dataclass
class StageContext:
    """Everything a stage needs once flags, config, data and device are resolved."""

    stage: str
    cfg: Config
    layout: DatasetLayout
    data: StageData
    device: torch.device
    console: Console
    weights_dir: Path
    data_root: Path
    skip_fresh: bool = False
    resume: bool = False
    status_file: Path | None = None

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def packed(self):  # type: ignore[no-untyped-def]
        return self.data.packed

    @property
    def geometry(self) -> dict[str, ChipGeometry]:
        return self.data.geometry

    @property
    def stage_cfg(self) -> Any:
        """This stage's config section (TrainConfig, InferConfig, ...)."""
        return self.cfg.section(self.stage)

    @property
    def num_classes(self) -> int:
        return self.layout.classes.num_classes

    @property
    def recorded_config(self) -> dict[str, Any]:
        """The part of the config saved in this stage's manifest and compared for freshness."""
        return stage_config(self.cfg, self.stage)

    def paths(self, artifact: str) -> ArtifactPaths:
        return ArtifactPaths.of(self.weights_dir, artifact)

    def dataset_record(self) -> dict[str, Any]:
        return {"root": str(self.data_root.resolve()), "kind": self.layout.kind, "classes": list(self.layout.classes.names)}

    def class_counts(self, rows: np.ndarray) -> np.ndarray:
        """Training chips per class among `rows` (length = number of classes; zeros for absent classes)."""
        return self.data.class_counts(rows, self.num_classes)

    def report(self, **fields: Any) -> None:
        """Tell run_all what this stage did (see pipeline.status); rank 0 only, nothing when run by hand."""
        if distributed.is_main_process():
            write_status(self.status_file, **fields)

    def skip_if_fresh(self, artifact: str, parents: dict[str, str], fingerprint: str | None = None) -> bool:
        """With --skip-fresh: True (and a line saying so) when `artifact` is up to date."""
        fp = fingerprint or self.packed.train_fingerprint
        if self.skip_fresh and is_fresh(self.weights_dir, artifact, self.recorded_config, fp, parents):
            self.console.print(f"[green]{self.stage}[/]: weights/{artifact} is up to date (same config, data and parents), skipped")
            return True
        return False


_LOCK_SCOPES: list[list[WeightsLock]] = []


def holds_weights_lock(main: F) -> F:
    """Decorate a stage's main: the weights-folder lock `prepare_stage` takes is held until main ends.

    Every stage script's main carries it (under `exit_on_user_error`), so the lock is released on
    every way out (return, UserError, crash) and a later stage in the same process can take it again.
    `prepare_stage` called outside such a main (library code, tests) takes no lock.
    """

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        scope: list[WeightsLock] = []
        _LOCK_SCOPES.append(scope)
        try:
            return main(*args, **kwargs)
        finally:
            _LOCK_SCOPES.remove(scope)
            for lock in reversed(scope):
                lock.release()

    return wrapper  # type: ignore[return-value]


def lock_weights(stage: str, weights_dir: Path) -> WeightsLock | None:
    """Hold `weights_dir`'s lock for the rest of the stage's main (rank 0 only under torchrun).

    A second run on the same folder stops here with one line naming the process that holds it.
    """
    if not _LOCK_SCOPES or not distributed.is_main_process():
        return None
    try:
        lock = WeightsLock(weights_dir, stage).acquire()
    except WeightsNotLockable:
        if stage in ARTIFACT_OF_STAGE:
            raise
        # a stage that only reads (infer) may use a folder it cannot write, e.g. a teammate's weights
        print(f"warning: {weights_dir} is not writable, so it is read without the lock", file=sys.stderr, flush=True)
        return None
    _LOCK_SCOPES[-1].append(lock)
    return lock


def prepare_stage(stage: str, args: argparse.Namespace, console: Console | None = None) -> StageContext:
    """Lock the weights folder, resolve config, discover and pack the dataset (cached), pick the device."""
    cfg = resolve_config(args)
    device = distributed.init_from_env(select_device(args.device))
    lock_weights(stage, Path(args.weights))  # before packing: a second run stops at once
    console = console or make_console(quiet=not distributed.is_main_process())
    root = data_root(args)
    layout = discover_layout(root, train_dir=args.train_dir, test_dir=args.test_dir)
    if cfg.data.holdout_classes:
        layout = apply_holdout(layout, [str(c) for c in cfg.data.holdout_classes])
    console.print(describe(layout))
    geometry = {
        "eo": resolve_geometry(cfg.data, "eo", [item.eo_path for item in layout.train]),
        "sar": resolve_geometry(cfg.data, "sar", [item.sar_path for item in layout.train]),
    }
    console.print(
        "chips: " + ", ".join(f"{m.upper()} {g.fit} to {g.packed} px, window {g.window} px" for m, g in geometry.items())
    )
    packed = pack_dataset(
        layout, eo_size=geometry["eo"].packed, sar_size=geometry["sar"].packed, eo_fit=geometry["eo"].fit,
        sar_fit=geometry["sar"].fit, interpolation=cfg.data.interpolation, cache_dir=args.cache_dir,
        skip_bad=args.skip_bad, console=console,
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # chips have one fixed size per modality
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    weights_dir = Path(args.weights)
    if distributed.is_main_process():
        weights_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        stage, cfg, layout, StageData(packed, cfg, geometry, device, source=str(root)), device, console,
        weights_dir, root, skip_fresh=bool(getattr(args, "skip_fresh", False)),
        resume=bool(getattr(args, "resume", False)), status_file=getattr(args, "status_file", None),
    )
    ctx.report(stage=stage, dataset_fingerprint=packed.train_fingerprint)
    return ctx


def _split_settings(cfg: dict[str, Any]) -> str:
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    return f"seed {cfg.get('seed', '?')}, val_fraction {data.get('val_fraction', '?')}"


def check_parent_split(ctx: StageContext, parent: str, parent_manifest: dict[str, Any]) -> str:
    """This run's split digest, after checking that `parent` was trained on the same train/validation split.

    A stage that selects epochs on validation chips its parent trained on reports a flattering
    validation score and picks the wrong epoch: a different split (another seed or data.val_fraction)
    stops with one line, before the stage writes anything.
    """
    digest = ctx.data.split_digest()
    if parent_manifest.get("split_sha256") != digest:
        theirs = _split_settings(parent_manifest.get("config") or {})
        ours = _split_settings(ctx.cfg.to_dict())
        differs = f"{theirs} there, {ours} here" if theirs != ours else "same seed and val_fraction, other chips"
        producer = STAGE_OF_ARTIFACT.get(parent, "the stage that wrote it")
        raise UserError(
            f"{parent} was trained on another train/validation split ({differs}): run {ctx.stage} with the "
            f"same --seed and data.val_fraction, or rerun `python -m stages.{producer}` with these"
        )
    return digest


def save_split(ctx: StageContext, artifact: str) -> str:
    """Write the validation split beside the artifact; returns its digest (recorded in the manifest)."""
    if distributed.is_main_process():
        atomic_write_text(ctx.paths(artifact).split, ctx.data.val_table().to_csv(index=False))
    return ctx.data.split_digest()


def new_model(ctx: StageContext, modality: str) -> ChipClassifier:
    """A fresh classifier from the `model` section for chips of `modality` ("eo" or "sar")."""
    m, geometry = ctx.cfg.model, ctx.geometry[modality]
    return create_model(
        m.name, ctx.num_classes, small_input=m.small_input, drop_rate=m.drop_rate, init_weights=m.init_weights,
        input_size=geometry.window, window=geometry.window, intensity=ctx.cfg.data.intensity, norm=ctx.packed.norm[modality],
    )


def load_model(ctx: StageContext, artifact: str) -> tuple[ChipClassifier, dict[str, Any]]:
    """The classifier stored as `artifact` (made from this dataset), on the stage's device, and its manifest."""
    state, manifest = load_artifact(ctx.weights_dir, artifact, ctx.packed.train_fingerprint)
    model = model_from_spec(manifest["model"])
    model.load_state_dict(state)
    return model.to(ctx.device), manifest


def fit_stage(ctx: StageContext, task: TrainTask, train_loader: Iterable, val_loader: Iterable) -> FitResult:
    """`pipeline.train.fit` with this stage's section, artifact paths, device, seed and --resume."""
    return fit(
        task, train_loader, val_loader, ctx.stage_cfg, ctx.num_classes, ctx.paths(ARTIFACT_OF_STAGE[ctx.stage]),
        ctx.device, resume=ctx.resume, seed=ctx.seed, console=ctx.console,
    )


def parent_digest(ctx: StageContext, artifact: str) -> str:
    """sha256 of a parent artifact's weights; UserError naming the stage to run if it is missing."""
    read_manifest(ctx.weights_dir, artifact)
    return sha256_file(ctx.paths(artifact).weights)


def parent_digests(ctx: StageContext) -> dict[str, str]:
    """sha256 of every parent the registry lists for this stage."""
    return {artifact: parent_digest(ctx, artifact) for artifact in stage_spec(ctx.stage).parents}


def save_stage_artifact(
    ctx: StageContext,
    state_dict: dict[str, torch.Tensor],
    model_spec: dict[str, Any],
    parents: dict[str, str],
    metrics: dict[str, Any],
    **extra: Any,
) -> Path | None:
    """Write the stage's artifact (the registry's name for it; rank 0 only) with the manifest the contract asks for."""
    if not distributed.is_main_process():
        return None
    artifact = ARTIFACT_OF_STAGE[ctx.stage]
    manifest = make_manifest(
        ctx.stage, ctx.recorded_config, model_spec, ctx.packed.train_fingerprint, parents, metrics,
        dataset=ctx.dataset_record(), **extra,
    )
    path = save_artifact(ctx.weights_dir, artifact, state_dict, manifest)
    ctx.console.print(f"[green]{ctx.stage}[/]: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path
