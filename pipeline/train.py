"""The one training loop every stage uses.

A stage describes what it trains as a `TrainTask` (see pipeline.tasks) and calls `fit`, which owns
everything else: AdamW/SGD with no weight decay on norms and biases (`timm.optim.create_optimizer_v2`),
cosine schedule with linear warm-up stepped per update (`timm.scheduler.CosineLRScheduler`), optional
weight EMA (`timm.utils.ModelEmaV3`), gradient clipping, bf16 autocast on CUDA, per-epoch reseeding,
validation with balanced accuracy as the model-selection metric, a metrics CSV, an atomic resume
checkpoint every epoch, DDP when torchrun started the process, and a stop with `TrainingDiverged` on a
non-finite loss or gradient norm.

Training losses are summed on the device and read back (and, under DDP, all-reduced) once every
`SYNC_EVERY_STEPS` updates and at the end of the epoch, not every step: the divergence check happens
there too, and names the first bad step, which the device recorded.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import distributed
from pipeline.artifacts import ArtifactPaths, atomic_write, atomic_write_text
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.log import get_logger, live_progress, make_console
from pipeline.metrics import classification_metrics

CHECKPOINT_FORMAT = 2  # 2: timm optimizer groups (no-decay group first) and EMA; 1-files are refused clearly
SYNC_EVERY_STEPS = 50  # read the summed losses back (and check them) this often: one GPU sync per 50 steps

log = get_logger(__name__)


class TrainingDiverged(UserError):
    """The loss (or gradient norm) became non-finite; the last good checkpoint is kept."""


class TrainTask(Protocol):
    """What `fit` trains (implementations: pipeline.tasks).

    `module` owns every trainable parameter; in a distributed run `fit` wraps it in DDP and passes the
    wrapper to `loss`, which must compute its trainable forward through that module so gradients are
    synchronised. `saved_module` is the module whose state is EMA'd and saved as the best state
    (`state_dict`; it may leave out training-only parts such as a feature projection; the resume
    checkpoint keeps `module` whole). `loss` returns the loss and its named parts as detached 0-d
    tensors on the device (no `float()`: that would synchronise every step).
    """

    @property
    def module(self) -> nn.Module: ...

    @property
    def saved_module(self) -> nn.Module: ...

    def train_mode(self) -> None: ...

    def loss(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]: ...

    def logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


@dataclass
class FitResult:
    best_state: dict[str, Tensor]
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class WarmupEma(ModelEmaV3):
    """timm's EMA (floats lerped, integer buffers copied) with this pipeline's decay warm-up.

    Kept from the hand-written EMA it replaces: decay min(decay, (1+n)/(10+n)) after n updates, so short
    runs are not dominated by the initial weights. timm's own warm-up (1 - (1+n/gamma)^-power) is a
    different curve, and ModelEmaV3 without warm-up copies the first update then jumps to `decay`.
    """

    def get_decay(self, step: int | None = None) -> float:
        return self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> tuple[CosineLRScheduler, int]:
    """timm's cosine schedule in updates (t_in_epochs=False), and the offset from an update's index to its t.

    Update s runs at the scheduler's value for t = s + offset (call `step_update(s + offset)` before it).
    With warm-up the offset is 1: the first update already gets lr/warmup_steps (not 0), the warm-up
    ends at the full lr on update warmup_steps - 1, and the cosine spans the remaining updates without
    ever reaching 0. Without warm-up t = s: full lr on update 0, half-cosine over total_steps.
    """
    offset = 1 if warmup_steps > 0 else 0
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps + offset),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return scheduler, offset


def _steps_per_epoch(cfg: TrainConfig, train_loader: Iterable) -> int:
    if cfg.steps_per_epoch is not None:
        steps = cfg.steps_per_epoch
    else:
        try:
            steps = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            raise UserError("the training loader has no length: set steps_per_epoch in the stage config") from None
    steps = distributed.all_reduce_min(steps)
    if steps < 1:
        raise UserError("the training loader is empty: no training chips (check the data folder and holdout_classes)")
    return steps


def _config_hash(stage_cfg: TrainConfig, num_classes: int, seed: int, steps_per_epoch: int, batch_size: int | None = None) -> str:
    """What a resume state must match: config, classes, seed, steps and the loader's batch (min_steps_per_epoch may lower it)."""
    blob = json.dumps(
        {"stage": stage_cfg.model_dump(mode="json"), "num_classes": num_classes, "seed": seed, "steps_per_epoch": steps_per_epoch,
         "batch_size": batch_size},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _seed_epoch(seed: int, epoch: int) -> None:
    """Reseed every RNG from (seed, epoch, rank), so a resumed run replays the same epochs."""
    value = int(np.random.SeedSequence([seed, epoch, distributed.rank()]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _batch_len(batch: dict[str, Any]) -> int:
    return next((len(v) for v in batch.values() if isinstance(v, Tensor) and v.ndim > 0), 0)


def _set_epoch(train_loader: Any, epoch: int) -> None:
    for owner in (getattr(train_loader, "sampler", None), getattr(train_loader, "dataset", None)):
        if owner is not None and callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)


def _cycle(loader: Iterable, steps: int) -> Iterator[Any]:
    """`steps` batches from `loader`, starting a new pass when one runs out."""
    iterator = iter(loader)
    for _ in range(steps):
        try:
            yield next(iterator)
        except StopIteration:
            iterator = iter(loader)
            try:
                yield next(iterator)
            except StopIteration:
                raise UserError("the training loader yielded no batches") from None


class _StepStats:
    """Per-epoch sums of the loss and its parts, and the first non-finite step, kept on the device.

    `add` never synchronises; `read` copies the sums (summed over processes) and the first bad step
    (smallest over processes) to the host: two small all-reduces under DDP, called every
    SYNC_EVERY_STEPS updates and at the end of the epoch.
    """

    NONE = float("inf")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.count = 0
        # first step with a non-finite loss, and with a non-finite gradient norm (inf: none)
        self.first_bad = torch.full((2,), self.NONE, dtype=torch.float64, device=device)

    def add(self, step: int, loss: Tensor, parts: dict[str, Tensor], grad_norm: Tensor | None) -> None:
        names = ["loss", *(k for k in parts if k != "loss")]
        values = torch.stack([loss.detach().reshape(()), *(parts[k].detach().reshape(()) for k in names[1:])]).double()
        if self.sums is None:
            self.names, self.sums = names, torch.zeros_like(values)
        elif names != self.names:
            raise ValueError(f"the task's loss parts changed from {self.names} to {names} within an epoch")
        self.sums += values
        self.count += 1
        grad_ok = torch.isfinite(grad_norm) if grad_norm is not None else torch.ones((), dtype=torch.bool, device=self.device)
        finite = torch.stack([torch.isfinite(values).all(), grad_ok])
        here = torch.full_like(self.first_bad, float(step))
        self.first_bad = torch.minimum(self.first_bad, torch.where(finite, self.NONE, here))

    def read(self) -> tuple[dict[str, float], tuple[int | None, int | None]]:
        """Means over steps and processes, and the first step (or None) with a non-finite loss / gradient norm."""
        assert self.sums is not None and self.count > 0
        sums = distributed.all_reduce_sum(self.sums) / (self.count * distributed.world_size())
        first_bad = distributed.all_reduce_min_(self.first_bad.clone())
        means = dict(zip(self.names, sums.tolist()))
        bad = tuple(None if v == self.NONE else int(v) for v in first_bad.tolist())
        return means, bad  # type: ignore[return-value]


def _cpu_clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _load_resume(path: Path, expected_hash: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/IO failure means the same thing to the user
        raise UserError(f"resume state {path} is damaged ({type(err).__name__}): delete it or run without --resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"resume state {path} is from another version: delete it or run without --resume")
    if state.get("config_hash") != expected_hash:
        raise UserError(
            f"resume state {path} was written with another config (stage settings, seed, classes or steps per "
            f"epoch differ): restore them, or run without --resume to start over"
        )
    return state


def _validate(
    task: TrainTask, val_loader: Iterable, device: torch.device, num_classes: int, autocast: Any
) -> dict[str, Any]:
    task.module.eval()
    labels_seen, predictions = [], []
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in val_loader:
            with autocast():
                logits, labels = task.logits(_to_device(batch, device))
            logits = logits.float()
            known = labels >= 0  # no boolean indexing here: it would synchronise every batch
            nll = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
            nll_sum += torch.where(known, nll, 0.0).sum().double()
            labels_seen.append(labels)  # stays on the device: one copy to the host after the loop
            predictions.append(logits.argmax(dim=1))
    local_true = torch.cat(labels_seen).cpu().numpy() if labels_seen else np.zeros(0, np.int64)
    local_pred = torch.cat(predictions).cpu().numpy() if predictions else np.zeros(0, np.int64)
    local_pred = local_pred[local_true >= 0]
    local_true = local_true[local_true >= 0]
    y_true, y_pred = distributed.all_gather_arrays(local_true, local_pred)
    if y_true.size == 0:
        raise UserError("the validation split is empty: raise data.val_fraction or add training chips")
    metrics = classification_metrics(y_true, y_pred, num_classes)
    metrics["loss"] = float(distributed.all_reduce_sum(nll_sum.reshape(1)).item()) / y_true.size
    return metrics


def is_better_epoch(metrics: dict[str, Any], best: dict[str, Any], tie: float = 1e-9) -> bool:
    """Higher validation balanced accuracy wins; a tie (common on small splits) goes to the lower validation NLL."""
    gain = metrics["balanced_accuracy"] - best["balanced_accuracy"]
    return gain > tie or (abs(gain) <= tie and metrics["loss"] < best["loss"])


def _epoch_row(
    epoch: int, train: dict[str, float], metrics: dict[str, Any], lr: float, images_per_s: float, seconds: float,
    batch_size: int | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch}
    row.update({f"train_{k}": v for k, v in train.items()})
    row.update(
        {
            "lr": lr,
            "val_loss": metrics["loss"],
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "val_balanced_accuracy_se": metrics["balanced_accuracy_se"],
            "val_macro_f1": metrics["macro_f1"],
        }
    )
    row.update({f"val_recall_{c}": r for c, r in enumerate(metrics["per_class_recall"])})
    # images_per_s counts every process; batch_size is one process's batch
    row.update({"images_per_s": images_per_s, "epoch_seconds": seconds, "batch_size": batch_size,
                "processes": distributed.world_size()})
    return row


def _summary_table(history: list[dict[str, Any]], best_epoch: int) -> Table:
    table = Table(title="training summary", title_justify="left")
    part_keys = [k for k in history[0] if k.startswith("train_")]
    for name in ["epoch", *[k[6:] for k in part_keys], "val acc", "val bal acc", "val macro-F1", "lr", "img/s", "s"]:
        table.add_column(name, justify="right")
    for row in history:
        mark = " *" if row["epoch"] == best_epoch else ""
        table.add_row(
            f"{row['epoch']}{mark}",
            *[f"{row.get(k, float('nan')):.4f}" for k in part_keys],
            f"{row['val_accuracy']:.4f}",
            f"{row['val_balanced_accuracy']:.4f} ± {row['val_balanced_accuracy_se']:.4f}",
            f"{row['val_macro_f1']:.4f}",
            f"{row['lr']:.2e}",
            f"{row['images_per_s']:.0f}",
            f"{row['epoch_seconds']:.1f}",
        )
    return table


class _Trainer:
    """State of one `fit` call; see `fit`."""

    def __init__(
        self,
        task: TrainTask,
        train_loader: Iterable,
        stage_cfg: TrainConfig,
        num_classes: int,
        paths: ArtifactPaths,
        device: torch.device,
        seed: int,
        console: Console | None,
    ) -> None:
        self.task = task
        self.cfg = stage_cfg  # validated by the schema at load
        steps_per_epoch = _steps_per_epoch(self.cfg, train_loader)
        self.num_classes = num_classes
        self.paths = paths
        self.device = device
        self.seed = seed
        self.is_main = distributed.is_main_process()
        self.console = (console or make_console()) if self.is_main else None
        self.steps = steps_per_epoch
        self.total_steps = self.cfg.epochs * steps_per_epoch
        self.warmup_steps = min(self.total_steps, round(self.cfg.warmup_epochs * steps_per_epoch))
        self.config_hash = _config_hash(stage_cfg, num_classes, seed, steps_per_epoch, getattr(train_loader, "batch_size", None))
        task.module.to(device)
        self.net: nn.Module = task.module
        if distributed.is_distributed():  # before the EMA copy: DDP broadcasts rank 0's weights
            device_ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(task.module, device_ids=device_ids)
        self.params = [p for p in task.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the task has no trainable parameters")
        # groups: no weight decay on 1-D tensors (norm scales, biases) nor on the model's no_weight_decay()
        self.optimizer = create_optimizer_v2(
            task.module, opt=self.cfg.optimizer, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, momentum=0.9
        )
        self.scheduler, self.schedule_offset = lr_scheduler(self.optimizer, self.warmup_steps, self.total_steps)
        self.ema = WarmupEma(task.saved_module, decay=self.cfg.ema) if self.cfg.ema > 0 else None
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, Tensor] | None = None
        self.best_epoch = 0
        self.best_metrics: dict[str, Any] = {}
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext
        )

    # -- persistence -------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a resume checkpoint: weights, optimizer moments, EMA weights and bookkeeping.

        The schedule and the EMA decay are functions of `global_step`, so nothing else is needed.
        """
        self.task.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_state = state["best_state"]
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = dict(state["best_metrics"])

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.config_hash,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "module": self.task.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "history": self.history,
        }

    # -- one epoch ---------------------------------------------------------------------------
    def set_lr(self) -> float:
        """Set the learning rate of the next update (number `global_step`) and return it."""
        self.scheduler.step_update(self.global_step + self.schedule_offset)
        return float(self.optimizer.param_groups[0]["lr"])

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        kept = (
            f"the last good checkpoint {self.paths.resume} (after epoch {self.epoch}) is kept"
            if self.epoch > 0
            else "no epoch had finished, so no checkpoint was written"
        )
        return TrainingDiverged(
            f"training diverged: non-finite {what} at epoch {self.epoch + 1} step {step}; {kept}; "
            f"lower lr or raise warmup_epochs/clip_grad and run again"
        )

    def check(self, stats: _StepStats) -> dict[str, float]:
        """Synchronise: the mean loss parts so far; raises TrainingDiverged at the first non-finite step."""
        means, (bad_loss, bad_grad) = stats.read()
        if bad_loss is not None and (bad_grad is None or bad_loss <= bad_grad):
            raise self.diverged("loss", bad_loss)
        if bad_grad is not None:
            raise self.diverged("gradient norm", bad_grad)
        return means

    def train_epoch(self, train_loader: Iterable) -> tuple[dict[str, float], float, float]:
        """Mean loss parts, the lr of the last step, images/s."""
        _set_epoch(train_loader, self.epoch)
        _seed_epoch(self.seed, self.epoch)
        start_epoch = getattr(self.task, "start_epoch", None)
        if start_epoch is not None:  # tasks with a schedule of their own (adversarial ramp)
            start_epoch(self.epoch)
        self.task.train_mode()
        stats = _StepStats(self.device)
        images, shown, means = 0, "", {}
        lr = self.set_lr()
        progress = self._progress()
        bar = progress.add_task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=self.steps, stats="")
        start = time.perf_counter()
        with progress:
            for step, batch in enumerate(_cycle(train_loader, self.steps), start=1):
                batch = _to_device(batch, self.device)
                with self.autocast():
                    loss, parts = self.task.loss(batch, self.net)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = None
                if self.cfg.clip_grad > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
                stats.add(step, loss, parts, grad_norm)
                self.optimizer.step()
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.task.saved_module, step=self.global_step)
                images += _batch_len(batch) * distributed.world_size()
                last_lr, lr = lr, self.set_lr()
                if step % SYNC_EVERY_STEPS == 0 or step == self.steps:  # the only host syncs of the epoch
                    means = self.check(stats)
                    shown = f"loss {means['loss']:.4f}  "
                elapsed = time.perf_counter() - start
                progress.update(bar, advance=1, stats=f"{shown}lr {last_lr:.2e}  {images / max(elapsed, 1e-9):.0f} img/s")
        elapsed = time.perf_counter() - start
        return means, last_lr, images / max(elapsed, 1e-9)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=True,
            disable=not live_progress(self.console),  # not a terminal: `report` prints one line per epoch
        )

    def validate(self, val_loader: Iterable) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Metrics of the EMA weights when EMA is on (else the live ones), and that state on CPU.

        Every rank first takes rank 0's copy of that state: DDP keeps parameters equal, but each rank's
        batch-norm statistics follow its own batches, and the gathered metrics must be those of the
        state rank 0 saves.
        """
        distributed.broadcast_((self.task.state_dict() if self.ema is None else self.ema.module.state_dict()).values())
        if self.ema is None:
            return _validate(self.task, val_loader, self.device, self.num_classes, self.autocast), _cpu_clone(
                self.task.state_dict()
            )
        # swap the EMA weights into the task rather than validating ema.module: `task.logits` owns the forward
        ema_state = self.ema.module.state_dict()
        live = {k: v.detach().clone() for k, v in self.task.state_dict().items()}
        self.task.load_state_dict(ema_state)
        try:
            metrics = _validate(self.task, val_loader, self.device, self.num_classes, self.autocast)
        finally:
            self.task.load_state_dict(live)
        return metrics, _cpu_clone(ema_state)

    def report(self, row: dict[str, Any], is_best: bool) -> None:
        """One log line per epoch (rank 0 only, by the log filter)."""
        parts = "  ".join(f"{k[6:]} {v:.4f}" for k, v in row.items() if k.startswith("train_"))
        log.info(
            f"epoch {row['epoch']:>3}/{self.cfg.epochs}  {parts}  val acc {row['val_accuracy']:.4f}  "
            f"bal acc {row['val_balanced_accuracy']:.4f} ± {row['val_balanced_accuracy_se']:.4f}  macro-F1 {row['val_macro_f1']:.4f}  "
            f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['epoch_seconds']:.1f} s"
            + ("  best" if is_best else "")
        )

    def run(self, train_loader: Iterable, val_loader: Iterable) -> FitResult:
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            train_stats, lr, images_per_s = self.train_epoch(train_loader)
            metrics, state = self.validate(val_loader)
            self.epoch += 1
            row = _epoch_row(self.epoch, train_stats, metrics, lr, images_per_s, time.perf_counter() - start,
                             getattr(train_loader, "batch_size", None))
            self.history.append(row)
            is_best = self.best_state is None or is_better_epoch(metrics, self.best_metrics)
            if is_best:
                self.best_state, self.best_epoch = state, self.epoch
                self.best_metrics = {"epoch": self.epoch, **metrics}
            if self.is_main:
                _write_metrics_csv(self.paths.metrics_csv, self.history)
                _atomic_torch_save(self.checkpoint(), self.paths.resume)
            self.report(row, is_best)
        distributed.barrier()
        if self.console is not None and self.history:
            self.console.print(_summary_table(self.history, self.best_epoch))
        assert self.best_state is not None
        self.task.load_state_dict({k: v.to(self.device) for k, v in self.best_state.items()})
        return FitResult(self.best_state, self.best_epoch, self.best_metrics, self.history)


def fit(
    task: TrainTask,
    train_loader: Iterable,
    val_loader: Iterable,
    stage_cfg: TrainConfig,
    num_classes: int,
    paths: ArtifactPaths,
    device: torch.device,
    resume: bool = False,
    seed: int = 0,
    console: Console | None = None,
) -> FitResult:
    """Train `task`, validate every epoch, keep the best epoch by balanced accuracy.

    Writes `paths.metrics_csv` and `paths.resume` after every epoch (rank 0 only); `resume=True`
    continues from `paths.resume` (a missing file starts from scratch) and ends bit-identical to an
    uninterrupted run on CPU. On return the task holds the best state. The caller writes the artifact.
    """
    trainer = _Trainer(task, train_loader, stage_cfg, num_classes, paths, device, seed, console)
    if resume:
        state = _load_resume(Path(paths.resume), trainer.config_hash)
        if state is None:
            log.info(f"no resume state at {paths.resume}: starting from epoch 1")
        else:
            trainer.restore(state)
            log.info(f"resuming from {paths.resume} after epoch {trainer.epoch}")
    return trainer.run(train_loader, val_loader)
