"""What every stage script shares: flags, config, data discovery and packing, device, split, loaders.

A stage script is then the paragraph of DESIGN.md it implements: `prepare_stage`, build the model and
task, `fit`, `save_stage_artifact`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import distributed
from pipeline.artifacts import (
    ARTIFACT_OF_STAGE, STAGE_OF_ARTIFACT, ArtifactPaths, WeightsLock, WeightsNotLockable, atomic_write_text,
    is_fresh, make_manifest, read_manifest, save_artifact, sha256_file,
)
from pipeline.config import Config, load_config, stage_config
from pipeline.data.augment import build_augmenter
from pipeline.data.datasets import ChipDataset, PairedChipDataset, stratified_split
from pipeline.data.geometry import ChipGeometry, resolve_geometry
from pipeline.data.layout import DatasetLayout, apply_holdout, describe, discover_layout
from pipeline.data.pack import PackedData, pack_dataset
from pipeline.data.resident import ResidentBatches
from pipeline.data.samplers import make_sampler
from pipeline.errors import UserError
from pipeline.log import make_console
from pipeline.models import ChipClassifier, create_model
from pipeline.status import write_status

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "synthetic"
DEFAULT_WEIGHTS = REPO_ROOT / "weights"

F = TypeVar("F", bound=Callable[..., object])


def build_parser(stage: str, description: str | None, training: bool = True) -> argparse.ArgumentParser:
    """The flags every stage takes (data, weights, profile, overrides, seed, device, resume, ...)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=(description or "").strip().splitlines()[0] if description else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (official, NJUST-style or generic class-folder layout)")
    parser.add_argument("--train-dir", default=None, help="generic layout: name of the training split folder")
    parser.add_argument("--test-dir", default=None, help="name of the test folder (official: SAR_Test/test/Test/SAR_VAL; generic: labelled test split)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="folder of stage artifacts (one run at a time: a stage locks it)")
    parser.add_argument("--profile", default="quick", help="config profile: quick | full | tiny | path/to/profile.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted), repeatable")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides the profile's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--holdout-classes", default=None, help="comma-separated classes left out of training and scored as OOD at test")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where packed arrays are cached (default: $EOSAR_CACHE_DIR, else .cache/packs in the project; never inside --data unless given here)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed in the cache) instead of stopping")
    if training:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted training run from its last epoch checkpoint")
    parser.add_argument("--skip-fresh", action="store_true", help="exit without work when the artifact is already up to date (same config, data, parents)")
    parser.add_argument("--status-file", type=Path, default=None, help=argparse.SUPPRESS)  # run_all reads what the stage did
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Profile + --set overrides, with --seed and --holdout-classes folded in so manifests record them."""
    cfg = load_config(args.profile, args.overrides)
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.holdout_classes:
        cfg["data"]["holdout_classes"] = [c.strip() for c in args.holdout_classes.split(",") if c.strip()]
    return cfg


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
    args: argparse.Namespace
    cfg: Config
    layout: DatasetLayout
    packed: PackedData
    device: torch.device
    console: Console
    weights_dir: Path
    geometry: dict[str, ChipGeometry]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    @property
    def stage_cfg(self) -> Config:
        return self.cfg[self.stage]

    @property
    def num_classes(self) -> int:
        return self.layout.classes.num_classes

    @property
    def recorded_config(self) -> Config:
        """The part of the config saved in this stage's manifest and compared for freshness."""
        return stage_config(self.cfg, self.stage)

    def paths(self, artifact: str) -> ArtifactPaths:
        return ArtifactPaths.of(self.weights_dir, artifact)

    def report(self, **fields: Any) -> None:
        """Tell run_all what this stage did (see pipeline.status); rank 0 only, nothing when run by hand."""
        if distributed.is_main_process():
            write_status(getattr(self.args, "status_file", None), **fields)

    def skip_if_fresh(self, artifact: str, parents: dict[str, str], fingerprint: str | None = None) -> bool:
        """With --skip-fresh: True (and a line saying so) when `artifact` is up to date."""
        fp = fingerprint or self.packed.train_fingerprint
        if self.args.skip_fresh and is_fresh(self.weights_dir, artifact, self.recorded_config, fp, parents):
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
    layout = discover_layout(args.data, train_dir=args.train_dir, test_dir=args.test_dir)
    if cfg["data"]["holdout_classes"]:
        layout = apply_holdout(layout, [str(c) for c in cfg["data"]["holdout_classes"]])
    console.print(describe(layout))
    geometry = {
        "eo": resolve_geometry(cfg["data"], "eo", [item.eo_path for item in layout.train]),
        "sar": resolve_geometry(cfg["data"], "sar", [item.sar_path for item in layout.train]),
    }
    console.print(
        "chips: " + ", ".join(f"{m.upper()} {g.fit} to {g.packed} px, window {g.window} px" for m, g in geometry.items())
    )
    packed = pack_dataset(
        layout,
        eo_size=geometry["eo"].packed,
        sar_size=geometry["sar"].packed,
        eo_fit=geometry["eo"].fit,
        sar_fit=geometry["sar"].fit,
        interpolation=str(cfg["data"]["interpolation"]),
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
        console=console,
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # chips have one fixed size per modality
    torch.manual_seed(int(cfg["seed"]))
    np.random.seed(int(cfg["seed"]) % 2**32)
    weights_dir = Path(args.weights)
    if distributed.is_main_process():
        weights_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage, args, cfg, layout, packed, device, console, weights_dir, geometry)
    ctx.report(stage=stage, dataset_fingerprint=packed.train_fingerprint)
    return ctx


def split_rows(ctx: StageContext) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `train_index` of the stratified train / validation split, the same for every stage."""
    if "split" not in ctx.extra:
        labels = ctx.packed.train_index["class_id"].to_numpy()
        data = ctx.cfg["data"]
        ctx.extra["split"] = stratified_split(labels, float(data["val_fraction"]), ctx.seed, data["val_min_per_class"])
    return ctx.extra["split"]


def train_val_rows(ctx: StageContext, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """The split restricted to rows that have a chip of `modality` ("eo" or "sar")."""
    has = ctx.packed.train_index[f"{modality}_row"].to_numpy() >= 0
    train, val = split_rows(ctx)
    train, val = train[has[train]], val[has[val]]
    if len(train) == 0:
        raise UserError(f"no {modality.upper()} training chips in {ctx.args.data}")
    if len(val) == 0:
        raise UserError(
            f"the validation split has no {modality.upper()} chips: raise data.val_fraction or add data"
        )
    return train, val


def _val_table(ctx: StageContext) -> pd.DataFrame:
    _, val = split_rows(ctx)
    return ctx.packed.train_index.iloc[np.sort(val)][["name", "class_id"]]


def split_digest(ctx: StageContext) -> str:
    """sha256 of the validation split (names and classes): equal digests mean the same split."""
    return hashlib.sha256(_val_table(ctx).to_csv(index=False).encode()).hexdigest()


def _split_settings(cfg: dict[str, Any]) -> str:
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    return f"seed {cfg.get('seed', '?')}, val_fraction {data.get('val_fraction', '?')}"


def check_parent_split(ctx: StageContext, parent: str, parent_manifest: dict[str, Any]) -> str:
    """This run's split digest, after checking that `parent` was trained on the same train/validation split.

    A stage that selects epochs on validation chips its parent trained on reports a flattering
    validation score and picks the wrong epoch: a different split (another seed or data.val_fraction)
    stops with one line, before the stage writes anything.
    """
    digest = split_digest(ctx)
    if parent_manifest.get("split_sha256") != digest:
        theirs = _split_settings(parent_manifest.get("config") or {})
        ours = _split_settings(ctx.cfg)
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
        atomic_write_text(ctx.paths(artifact).split, _val_table(ctx).to_csv(index=False))
    return split_digest(ctx)


def class_counts(ctx: StageContext, rows: np.ndarray) -> np.ndarray:
    """Training chips per class among `rows` (length = number of classes; zeros for absent classes)."""
    labels = ctx.packed.train_index["class_id"].to_numpy()[rows]
    return np.bincount(labels, minlength=ctx.num_classes)


def make_stage_sampler(ctx: StageContext, rows: np.ndarray) -> Sampler:
    """The stage's sampler (weighted / balanced / uniform) over `rows`, sharded across ranks."""
    cfg = ctx.stage_cfg
    labels = ctx.packed.train_index["class_id"].to_numpy()[rows]
    return make_sampler(
        cfg["sampler"]["kind"], labels, float(cfg["sampler"]["power"]),
        num_samples=steps_samples(cfg, len(rows)), seed=ctx.seed,
        rank=distributed.rank(), world_size=distributed.world_size(),
    )


def new_model(ctx: StageContext, modality: str) -> ChipClassifier:
    """A fresh classifier from the `model` section for chips of `modality` ("eo" or "sar")."""
    m = ctx.cfg["model"]
    geometry = ctx.geometry[modality]
    return create_model(
        m["name"], ctx.num_classes, small_input=bool(m["small_input"]), drop_rate=float(m["drop_rate"]),
        init_weights=m["init_weights"], input_size=geometry.window, window=geometry.window,
        intensity=str(ctx.cfg["data"]["intensity"]), norm=ctx.packed.norm[modality],
    )


def chip_dataset(ctx: StageContext, modality: str, rows: np.ndarray, augment: bool) -> ChipDataset:
    """Single-modality chips of training `rows` (positions in train_index), augmented or not."""
    index = ctx.packed.train_index.iloc[rows]
    images = ctx.packed.train_eo if modality == "eo" else ctx.packed.train_sar
    norm = ctx.packed.norm[modality]
    return ChipDataset(
        images, index[f"{modality}_row"].to_numpy(), index["class_id"].to_numpy(),
        norm=(norm["mean"], norm["std"]),
        augment=build_augmenter(ctx.cfg["augment"]) if augment else None, seed=ctx.seed, modality=modality,
        window=ctx.geometry[modality].window,
    )


def paired_dataset(ctx: StageContext, rows: np.ndarray, augment: bool) -> PairedChipDataset:
    """(EO, SAR) pairs of training `rows`; both chips of a pair get the same geometry."""
    index = ctx.packed.train_index.iloc[rows]
    eo, sar = ctx.packed.norm["eo"], ctx.packed.norm["sar"]
    return PairedChipDataset(
        ctx.packed.train_eo, ctx.packed.train_sar, index["eo_row"].to_numpy(), index["sar_row"].to_numpy(),
        index["class_id"].to_numpy(), eo_norm=(eo["mean"], eo["std"]), sar_norm=(sar["mean"], sar["std"]),
        augment=build_augmenter(ctx.cfg["augment"]) if augment else None, seed=ctx.seed,
        windows=(ctx.geometry["eo"].window, ctx.geometry["sar"].window),
    )


def train_batches(ctx: StageContext, rows: np.ndarray, kind: str) -> Iterable[dict[str, torch.Tensor]]:
    """Training batches of `rows` with the stage's sampler; kind: "eo" | "sar" (one chip) or "paired".

    With `data.resident` the packed chips are held on the training device and augmented there in
    batches; otherwise a DataLoader over the augmented dataset.
    """
    sampler = make_stage_sampler(ctx, rows)
    batch_size = int(ctx.stage_cfg["batch_size"])
    if not ctx.cfg["data"]["resident"]:
        dataset = paired_dataset(ctx, rows, augment=True) if kind == "paired" else chip_dataset(ctx, kind, rows, augment=True)
        return make_loader(dataset, batch_size, ctx, sampler)
    index = ctx.packed.train_index.iloc[rows]
    arrays = {}
    for modality in ("eo", "sar") if kind == "paired" else (kind,):
        norm = ctx.packed.norm[modality]
        images = ctx.packed.train_eo if modality == "eo" else ctx.packed.train_sar
        key = modality if kind == "paired" else "image"
        arrays[key] = (images, index[f"{modality}_row"].to_numpy(), (norm["mean"], norm["std"]), modality,
                       ctx.geometry[modality].window)
    augment = build_augmenter(ctx.cfg["augment"])
    return ResidentBatches(arrays, index["class_id"].to_numpy(), sampler, batch_size, ctx.device, augment, ctx.seed)


def make_loader(
    dataset: Dataset, batch_size: int, ctx: StageContext, sampler: Sampler | None = None, train: bool = True
) -> DataLoader:
    """A DataLoader with the config's workers, pinned memory on CUDA, whole batches when training."""
    workers = int(ctx.cfg["data"]["num_workers"])
    if sampler is None and not train and distributed.is_distributed():
        sampler = distributed.ShardSampler(len(dataset))  # each rank scores its share; fit gathers them
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=train and len(dataset) > batch_size,
        persistent_workers=False,
    )


def steps_samples(stage_cfg: Config, n_train: int) -> int:
    """Samples drawn per epoch: steps_per_epoch x batch_size, or one pass over the training rows."""
    steps = stage_cfg.get("steps_per_epoch")
    if steps:
        return int(steps) * int(stage_cfg["batch_size"])
    return n_train


def parent_digest(ctx: StageContext, artifact: str) -> str:
    """sha256 of a parent artifact's weights; UserError naming the stage to run if it is missing."""
    read_manifest(ctx.weights_dir, artifact)
    return sha256_file(ctx.paths(artifact).weights)


def save_stage_artifact(
    ctx: StageContext,
    artifact: str,
    state_dict: dict[str, torch.Tensor],
    model_spec: dict[str, Any],
    parents: dict[str, str],
    metrics: dict[str, Any],
    **extra: Any,
) -> Path | None:
    """Write the stage's artifact (rank 0 only) with the manifest the contract asks for."""
    if not distributed.is_main_process():
        return None
    manifest = make_manifest(
        ctx.stage,
        ctx.recorded_config,
        model_spec,
        ctx.packed.train_fingerprint,
        parents,
        metrics,
        dataset={"root": str(Path(ctx.args.data).resolve()), "kind": ctx.layout.kind, "classes": list(ctx.layout.classes.names)},
        **extra,
    )
    path = save_artifact(ctx.weights_dir, artifact, state_dict, manifest)
    ctx.console.print(f"[green]{ctx.stage}[/]: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path
