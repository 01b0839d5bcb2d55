"""The training loop: learning, metrics CSV, resume equality, divergence guard, EMA, DDP (gloo)."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline import distributed, train
from pipeline.artifacts import ArtifactPaths
from pipeline.config import DistillConfig, TrainConfig, validate_config
from pipeline.errors import UserError
from pipeline.losses import DistillationLoss, FocalLoss
from pipeline.models import create_model
from pipeline.tasks import ClassifierTask, DistillTask, EmbeddingDataset, HeadTask
from pipeline.train import TrainingDiverged, WarmupEma, fit, lr_scheduler

NUM_CLASSES = 3
SIZE = 16
CPU = torch.device("cpu")


class BandDataset(Dataset):
    """Class c = a bright horizontal band at rows 5c..5c+4 plus noise: separable, tiny."""

    def __init__(self, n: int, seed: int, paired: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.images = torch.randn(n, 1, SIZE, SIZE, generator=g) * 0.7
        for c in range(NUM_CLASSES):
            self.images[self.labels == c, :, 5 * c : 5 * c + 5, :] += 1.5
        self.paired = paired
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.paired:
            return {"sar": self.images[i], "eo": self.images[i].flip(-1), "has_eo": torch.tensor(i % 4 != 0), "label": self.labels[i]}
        return {"image": self.images[i], "label": self.labels[i]}


def _cfg(**changes) -> TrainConfig:
    cfg = {
        "epochs": 2,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.01,
        "warmup_epochs": 0.5,
        "ema": 0.0,
        "clip_grad": 5.0,
        "steps_per_epoch": None,
        "loss": {"kind": "ce"},
    }
    cfg.update(changes)
    return TrainConfig.model_validate(cfg)


def _model(seed: int = 0, name: str = "test_resnet"):
    """A tiny timm ResNet (batch norm, deep stem) with head dropout, so buffers and RNG both matter."""
    torch.manual_seed(seed)
    return create_model(name, NUM_CLASSES, small_input=False, drop_rate=0.1)


def _loaders(n_train: int = 48, n_val: int = 24, paired: bool = False, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    train = BandDataset(n_train, seed=1, paired=paired)
    val = BandDataset(n_val, seed=2, paired=paired)
    return (
        DataLoader(train, batch_size=batch_size, sampler=RandomSampler(train), drop_last=True),
        DataLoader(val, batch_size=32),
    )


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _fit(task, tmp_path: Path, cfg: dict | None = None, resume: bool = False, console: Console | None = None, **loader_kw):
    train, val = _loaders(**loader_kw)
    return fit(
        task, train, val, cfg or _cfg(), NUM_CLASSES, ArtifactPaths.of(tmp_path, "art"), CPU,
        resume=resume, seed=0, console=console or _quiet(),
    )


class FaultyTask:
    """Wraps a task; at loss call number `at` it raises `error` or (error None) returns a NaN loss."""

    def __init__(self, task, at: int, error: BaseException | None = None) -> None:
        self.task, self.at, self.error, self.calls = task, at, error, 0

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def loss(self, batch, module=None):
        self.calls += 1
        loss, parts = self.task.loss(batch, module)
        if self.calls == self.at:
            if self.error is not None:
                raise self.error
            loss = loss * float("nan")
        return loss, parts


def _balanced_accuracy_untrained(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(b["image"]).argmax(1) for b in loader])
        labels = torch.cat([b["label"] for b in loader])
    return float(np.mean([(preds[labels == c] == c).float().mean() for c in range(NUM_CLASSES)]))


def test_fit_learns_a_separable_problem_and_writes_metrics(tmp_path, capsys) -> None:
    model = _model(name="test_efficientnet_gn")  # group norm: no running statistics to lag after 9 steps
    before = _balanced_accuracy_untrained(model, _loaders()[1])
    console = _quiet()
    result = _fit(ClassifierTask(model, FocalLoss(gamma=2.0)), tmp_path, _cfg(epochs=3, lr=0.01), console=console, batch_size=12)
    assert result.best_metrics["balanced_accuracy"] >= 0.9 > before
    assert result.best_epoch == result.best_metrics["epoch"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    # the task holds the best state on return
    assert all(torch.equal(v, result.best_state[k]) for k, v in model.state_dict().items())

    rows = list(csv.DictReader(open(tmp_path / "art.metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for name in ("train_loss", "lr", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
                 "val_recall_0", "val_recall_2", "images_per_s", "epoch_seconds", "batch_size"):
        assert name in rows[0], name
    assert int(rows[0]["batch_size"]) == 12 != _cfg().batch_size  # the loader's batch, not the config's (bench.train reads it)
    assert int(rows[0]["processes"]) == 1
    assert float(rows[1]["val_balanced_accuracy"]) == pytest.approx(result.history[1]["val_balanced_accuracy"])
    assert "training summary" in console.file.getvalue()  # tables stay on the console
    assert re.search(r"INFO pipeline\.train: epoch +3/3 ", capsys.readouterr().out)  # epoch lines are log records


def old_lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The hand-written schedule timm's CosineLRScheduler replaced: the reference curve."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _scheduled_factors(warmup: int, total: int, base_lr: float = 0.1) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler, offset = lr_scheduler(optimizer, warmup, total)
    factors = []
    for step in range(total):
        scheduler.step_update(step + offset)
        factors.append(optimizer.param_groups[0]["lr"] / base_lr)
    return factors


@pytest.mark.parametrize("warmup,total", [(4, 20), (1, 9), (0, 10), (5, 5), (2, 6)])
def test_timm_schedule_follows_the_old_warmup_cosine_curve(warmup: int, total: int) -> None:
    new = _scheduled_factors(warmup, total)
    old = [old_lr_factor(s, warmup, total) for s in range(total + 1)]
    assert new[0] == pytest.approx(old[0], abs=1e-12)  # step 0: lr / warmup (the full lr without warm-up)
    assert new[:warmup] == pytest.approx(old[:warmup], abs=1e-12)  # warm-up identical, up to its end
    if warmup:
        assert new[warmup - 1] == pytest.approx(1.0)  # the end of warm-up is the peak
    for step in range(warmup, total):  # then the old cosine, at most one step later, never 0
        assert old[step + 1] - 1e-12 <= new[step] <= old[step] + 1e-12, step
    assert new[-1] > 0 and new[-1] == pytest.approx(old[total - 1], abs=0.15 if total < 10 else 0.02)
    assert all(a >= b for a, b in zip(new[warmup:], new[warmup + 1:]))
    if warmup == 0:
        assert new == pytest.approx(old[:total], abs=1e-12)  # without warm-up the curves are identical


def test_fractional_warmup_epochs_in_a_real_fit(tmp_path, monkeypatch) -> None:
    """warmup_epochs=0.5 of 3 steps: 2 warm-up updates; the lr each update ran at, seen by the optimizer."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )
    try:
        result = _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=2, warmup_epochs=0.5))
    finally:
        handle.remove()
    old = [0.003 * old_lr_factor(s, 2, 6) for s in range(7)]
    assert seen[:2] == pytest.approx([0.0015, 0.003])
    assert all(old[s + 1] - 1e-12 <= seen[s] <= old[s] + 1e-12 for s in range(2, 6))
    assert [row["lr"] for row in result.history] == pytest.approx([seen[2], seen[5]])


def test_weight_ema_warms_up_and_copies_integers() -> None:
    module = torch.nn.BatchNorm1d(3)  # float weights and running stats, an integer num_batches_tracked
    ema = WarmupEma(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(2.0)
        module.num_batches_tracked.fill_(5)
    ema.update(module, step=1)  # decay min(0.9, 2/11)
    torch.testing.assert_close(ema.module.weight, torch.full((3,), 1 + (2 - 1) * (1 - 2 / 11)))
    assert ema.module.num_batches_tracked == 5
    assert ema.get_decay(1000) == 0.9
    assert torch.equal(module.weight, torch.full((3,), 2.0))  # the live weights are left alone


def test_no_weight_decay_on_norms_and_biases(tmp_path) -> None:
    model = _model()
    _fit(ClassifierTask(model, FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=1, weight_decay=0.05))
    groups = torch.load(tmp_path / "art.resume.pt", weights_only=True)["optimizer"]["param_groups"]
    one_d = sum(p.ndim == 1 for p in model.parameters())  # biases and norm scales
    assert {g["weight_decay"]: len(g["params"]) for g in groups} == {0.0: one_d, 0.05: len(list(model.parameters())) - one_d}


def test_resume_after_interruption_is_bit_identical(tmp_path, capsys) -> None:
    cfg = _cfg(ema=0.8)
    straight = _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path / "a", cfg)

    # 3 steps per epoch: stop inside epoch 2 as a Ctrl-C would
    interrupted = FaultyTask(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=5, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, tmp_path / "b", cfg)
    assert len(list(csv.DictReader(open(tmp_path / "b" / "art.metrics.csv")))) == 1

    capsys.readouterr()
    resumed = _fit(ClassifierTask(_model(seed=123), FocalLoss(gamma=0.0)), tmp_path / "b", cfg, resume=True)
    assert "resuming from" in capsys.readouterr().out
    assert resumed.best_epoch == straight.best_epoch
    assert straight.best_state.keys() == resumed.best_state.keys()
    for key, value in straight.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")} for r in rows]
    assert drop_timing(resumed.history) == drop_timing(straight.history)
    assert len(list(csv.DictReader(open(tmp_path / "b" / "art.metrics.csv")))) == 2


def test_resume_from_another_config_or_damaged_file_is_a_user_error(tmp_path) -> None:
    _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=1))
    with pytest.raises(UserError, match="another config"):
        _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=1, lr=0.01), resume=True)
    (tmp_path / "art.resume.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=1), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path) -> None:
    task = FaultyTask(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=5)  # epoch 2, step 2
    with pytest.raises(TrainingDiverged, match=r"epoch 2 step 2.*last good checkpoint .*art.resume.pt \(after epoch 1\) is kept"):
        _fit(task, tmp_path, _cfg(epochs=3))
    state = torch.load(tmp_path / "art.resume.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["best_state"].values() if v.is_floating_point())
    assert len(list(csv.DictReader(open(tmp_path / "art.metrics.csv")))) == 1

    first = FaultyTask(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=1)
    with pytest.raises(TrainingDiverged, match="epoch 1 step 1; no epoch had finished"):
        _fit(first, tmp_path / "fresh", _cfg(epochs=1))
    assert not (tmp_path / "fresh" / "art.resume.pt").exists()


def test_losses_are_read_back_every_n_steps_and_the_first_bad_step_is_named(tmp_path, monkeypatch) -> None:
    """No host sync per step: the sums are read at steps N, 2N, ... and the epoch's end; a NaN at step 3
    stops the run at the step-4 read (not at the end of the 9-step epoch) and names step 3."""
    reads: list[int] = []
    real_read = train._StepStats.read

    def counting_read(self):
        reads.append(self.count)
        return real_read(self)

    monkeypatch.setattr(train._StepStats, "read", counting_read)
    monkeypatch.setattr(train, "SYNC_EVERY_STEPS", 4)
    _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path / "ok", _cfg(epochs=1, steps_per_epoch=9))
    assert reads == [4, 8, 9]

    task = FaultyTask(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=3)
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1 step 3;"):
        _fit(task, tmp_path / "nan", _cfg(epochs=1, steps_per_epoch=9))
    assert task.calls == 4


def test_non_finite_gradient_norm_is_named(tmp_path) -> None:
    class InfGradient(FaultyTask):
        hook = None

        def loss(self, batch, module=None):
            if self.hook is not None:
                self.hook.remove()
            loss, parts = super().loss(batch, module)
            if self.calls == 2:  # a finite loss whose backward gives an infinite gradient
                self.hook = self.task.model.classifier.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
            return loss, parts

    with pytest.raises(TrainingDiverged, match="non-finite gradient norm at epoch 1 step 2;"):
        _fit(InfGradient(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=-1), tmp_path, _cfg(epochs=1))


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_ema_on_validates_and_keeps_the_averaged_weights(tmp_path, ema: float) -> None:
    result = _fit(ClassifierTask(_model(), FocalLoss(gamma=0.0)), tmp_path, _cfg(epochs=1, ema=ema))
    state = torch.load(tmp_path / "art.resume.pt", weights_only=True)
    live = {k.removeprefix("model."): v for k, v in state["module"].items()}
    same_as_live = all(torch.equal(v, live[k]) for k, v in result.best_state.items())
    if ema:
        assert not same_as_live
        assert all(torch.equal(v, state["ema"][k]) for k, v in result.best_state.items())
    else:
        assert same_as_live and state["ema"] is None


def test_set_epoch_steps_per_epoch_and_bad_config(tmp_path) -> None:
    counting = FaultyTask(ClassifierTask(_model(), FocalLoss(gamma=0.0)), at=-1)
    train, val = _loaders()
    fit(counting, train, val, _cfg(epochs=2, steps_per_epoch=5), NUM_CLASSES, ArtifactPaths.of(tmp_path, "art"),
        CPU, console=_quiet())
    assert counting.calls == 10  # the 3-batch loader is cycled to 5 steps per epoch
    assert train.dataset.epochs_seen == [0, 1]
    with pytest.raises(UserError, match="pretrain_eo.optimizer"):  # bad settings stop at load, with their key
        validate_config({"pretrain_eo": {"optimizer": "adam"}})


def test_distill_task_trains_student_and_projection(tmp_path) -> None:
    teacher, student = _model(seed=5), _model(seed=6)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = DistillationLoss(
        FocalLoss(gamma=2.0), DistillConfig.model_validate({"temperature": 4.0, "kd_weight": 1.0, "feature_weight": 0.5, "feature_loss": "cosine"}),
        student.embed_dim, teacher.embed_dim,
    )
    projection_before = criterion.alignment.projection.weight.detach().clone()
    result = _fit(DistillTask(student, teacher, criterion), tmp_path, _cfg(epochs=1), paired=True)
    assert {"train_loss", "train_sup", "train_kd", "train_feat"} <= set(result.history[0])
    assert set(result.best_state) == set(student.state_dict())
    assert not torch.equal(criterion.alignment.projection.weight, projection_before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_distill_task_skips_the_teacher_when_no_term_reads_it() -> None:
    teacher, student = _model(seed=5), _model(seed=6)
    calls = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    teacher.embed = lambda x, _embed=teacher.embed: calls.append(1) or _embed(x)
    batch = {"sar": torch.randn(4, 1, 24, 24), "eo": torch.randn(4, 1, 24, 24), "label": torch.tensor([0, 1, 2, 0]),
             "has_eo": torch.ones(4, dtype=torch.bool)}
    for kd, feat, reads in ((0.0, 0.0, False), (1.0, 0.0, True), (0.0, 0.5, True)):
        cfg = DistillConfig.model_validate({"kd_weight": kd, "feature_weight": feat})
        criterion = DistillationLoss(FocalLoss(gamma=2.0), cfg, student.embed_dim, teacher.embed_dim)
        calls.clear()
        total, parts = DistillTask(student, teacher, criterion).loss(batch)
        assert criterion.uses_teacher is reads and bool(calls) is reads
        assert torch.isfinite(total) and ("kd" in parts) is (kd > 0) and ("feat" in parts) is (feat > 0)


def test_head_task_on_embeddings_leaves_the_backbone_alone(tmp_path) -> None:
    model = _model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % NUM_CLASSES
    signal = (torch.arange(model.embed_dim)[None, :] % NUM_CLASSES == labels[:, None]).float()
    emb = 0.5 * torch.randn(60, model.embed_dim, generator=g) + signal
    train = DataLoader(EmbeddingDataset(emb[:45], labels[:45]), batch_size=15, shuffle=True)
    val = DataLoader(EmbeddingDataset(emb[45:], labels[45:]), batch_size=15)
    result = fit(HeadTask(model, FocalLoss(gamma=0.0)), train, val, _cfg(epochs=2, lr=0.05), NUM_CLASSES,
                 ArtifactPaths.of(tmp_path, "head"), CPU, console=_quiet())
    assert result.best_metrics["balanced_accuracy"] > 0.9
    assert all(torch.equal(result.best_state[k], v) for k, v in frozen.items())


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def loaders(paired: bool) -> tuple[DataLoader, DataLoader]:
            train_ds, val_ds = BandDataset(48, seed=1, paired=paired), BandDataset(24, seed=2, paired=paired)
            train = DataLoader(train_ds, batch_size=8, sampler=distributed.ShardSampler(len(train_ds)), drop_last=True)
            return train, DataLoader(val_ds, batch_size=8, sampler=distributed.ShardSampler(len(val_ds)))

        # ranks start from different weights on purpose: DDP must broadcast rank 0's before the EMA copy
        result = fit(ClassifierTask(_model(seed=rank), FocalLoss(gamma=0.0)), *loaders(False), _cfg(epochs=1, ema=0.5),
                     NUM_CLASSES, ArtifactPaths.of(out_dir, "ddp"), CPU, console=_quiet())
        torch.save(result.best_state, os.path.join(out_dir, f"state{rank}.pt"))

        student, teacher = _model(seed=10 + rank), _model(seed=20)
        criterion = DistillationLoss(
        FocalLoss(gamma=0.0), DistillConfig.model_validate({"temperature": 2.0, "kd_weight": 1.0, "feature_weight": 1.0}),
                                     student.embed_dim, teacher.embed_dim)
        fit(DistillTask(student, teacher, criterion), *loaders(True), _cfg(epochs=1), NUM_CLASSES,
            ArtifactPaths.of(out_dir, "distill"), CPU, console=_quiet())
        torch.save(criterion.alignment.state_dict(), os.path.join(out_dir, f"projection{rank}.pt"))

        y_true, _ = distributed.all_gather_arrays(np.array([rank] * (rank + 1)), np.zeros(rank + 1))
        np.save(os.path.join(out_dir, f"gathered{rank}.npy"), y_true)
    finally:
        distributed.cleanup()


def test_two_process_gloo_run_keeps_replicas_in_sync(tmp_path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in ("state", "projection"):
        s0 = torch.load(tmp_path / f"{name}0.pt", weights_only=True)
        s1 = torch.load(tmp_path / f"{name}1.pt", weights_only=True)
        for key, value in s0.items():
            if value.is_floating_point() and "running_" not in key:  # BN statistics stay per rank
                assert torch.equal(value, s1[key]), f"{name} {key}"
    assert np.array_equal(np.load(tmp_path / "gathered1.npy"), [0, 1, 1])
    assert len(list(csv.DictReader(open(tmp_path / "ddp.metrics.csv")))) == 1
    assert len(list(csv.DictReader(open(tmp_path / "distill.metrics.csv")))) == 1


def test_log_not_a_terminal_one_line_per_epoch_and_whole_tables(tmp_path, capsys) -> None:
    """Issue 9 item 10: stdout to a file or CI: no progress-bar blank lines, tables never cut at 80 columns."""
    teacher, student = _model(seed=5), _model(seed=6)
    criterion = DistillationLoss(
        FocalLoss(gamma=2.0), DistillConfig.model_validate({"temperature": 4.0, "kd_weight": 1.0, "feature_weight": 0.5, "feature_loss": "cosine"}),
        student.embed_dim, teacher.embed_dim,
    )
    train, val = _loaders(paired=True)
    capsys.readouterr()
    result = fit(DistillTask(student, teacher, criterion), train, val, _cfg(epochs=2), NUM_CLASSES,
                 ArtifactPaths.of(tmp_path, "log"), CPU, seed=0)  # console=None: the default console on stdout
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.strip() for line in lines), "blank lines in the log"
    epoch_lines = [line for line in lines if re.search(r"INFO pipeline\.train: epoch +\d+/2 ", line)]
    assert [re.search(r"epoch +(\d+/2)", line).group(1) for line in epoch_lines] == ["1/2", "2/2"]  # one per epoch
    for row in result.history:  # each whole on its own line: not wrapped, not cut
        line = epoch_lines[row["epoch"] - 1]
        assert f"lr {row['lr']:.2e}" in line and f"bal acc {row['val_balanced_accuracy']:.4f}" in line
    assert "…" not in "\n".join(lines), "a table cell was cut"
    table_rows = [line for line in lines if line.startswith("│")]
    assert len(table_rows) == 2
    for row, line in zip(result.history, table_rows):
        cells = [c.strip() for c in line.strip("│").split("│")]
        assert cells[0].rstrip(" *") == str(row["epoch"])
        assert f"{row['train_kd']:.4f}" in cells and f"{row['lr']:.2e}" in cells
        assert f"{row['val_macro_f1']:.4f}" in cells and f"{row['epoch_seconds']:.1f}" in cells


def test_fit_tells_a_scheduled_task_each_epoch_it_starts(tmp_path) -> None:
    class Scheduled(ClassifierTask):
        def start_epoch(self, epoch: int) -> None:
            self.started = [*getattr(self, "started", []), epoch]

    task = Scheduled(_model(), FocalLoss(gamma=0.0))
    _fit(task, tmp_path, _cfg(epochs=3))
    assert task.started == [0, 1, 2]
