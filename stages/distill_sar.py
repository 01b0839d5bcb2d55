"""Stage 2: distill the frozen EO teacher into a SAR student on paired chips.

Loss = supervised focal/CE on SAR labels + kd_weight * T^2 * KL(teacher_T || student_T), gated per pair by
the teacher (`distill.gate`: none | correct | confidence), + feature_weight * alignment of the student's
projected embedding to the teacher's (centred and standardised with `distill.feature_norm`). Both chips of a pair get the same
geometric augmentation. Writes weights/sar_student.* with the teacher's sha256 in its manifest.
On a SAR-only dataset, or when no term reads the teacher (kd_weight and feature_weight 0, the default), the student
trains on SAR labels alone. Options: LogitNorm (distill_sar.loss.logit_norm),
outlier exposure with virtual anomalies of each batch (distill_sar.outlier_exposure.weight > 0),
adversarial training on attacked SAR chips (distill_sar.adversarial, pipeline.robust.training) and
freezing early pretrained layers (distill_sar.freeze_layers).
"""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.errors import UserError, exit_on_user_error
from pipeline.losses import DistillationLoss, OutlierExposure, build_classification_loss
from pipeline.models import freeze_early_layers, model_spec
from pipeline.robust.training import AdversarialSettings, with_adversarial
from pipeline.stage import (
    build_parser, check_parent_split, fit_stage, holds_weights_lock, load_model, new_model, parent_digest, prepare_stage,
    save_split, save_stage_artifact,
)
from pipeline.tasks import ClassifierTask, DistillTask

STAGE = "distill_sar"
TEACHER = "eo_teacher"


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    ctx = prepare_stage(STAGE, build_parser(STAGE, __doc__).parse_args(argv))
    cfg, data = ctx.stage_cfg, ctx.data
    adversarial = AdversarialSettings.from_config(cfg.adversarial.model_dump(by_alias=True))  # joint rules, before training
    if cfg.freeze_layers and not ctx.cfg.model.init_weights:
        raise UserError("distill_sar.freeze_layers keeps pretrained layers fixed: set model.init_weights, or freeze_layers 0")
    with_teacher = ctx.layout.has_eo and cfg.distill.uses_teacher
    parents = {TEACHER: parent_digest(ctx, TEACHER)} if with_teacher else {}
    if ctx.skip_if_fresh("sar_student", parents):
        return 0

    train_rows, val_rows = data.train_val_rows("sar")
    if with_teacher:
        teacher, teacher_manifest = load_model(ctx, TEACHER)
        check_parent_split(ctx, TEACHER, teacher_manifest)  # before save_split overwrites anything
    split_sha = save_split(ctx, "sar_student")
    student = new_model(ctx, "sar")
    if cfg.freeze_layers:
        frozen = freeze_early_layers(student, cfg.freeze_layers)
        ctx.console.print(f"{STAGE}: froze the first {cfg.freeze_layers} convolution(s) of the student ({len(frozen)} tensors)")
    supervised = build_classification_loss(cfg.loss, ctx.class_counts(train_rows))
    exposure = OutlierExposure.from_config(cfg.outlier_exposure, seed=ctx.seed + distributed.rank())

    if with_teacher:
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        criterion = DistillationLoss(supervised, cfg.distill, student_dim=student.embed_dim, teacher_dim=teacher.embed_dim)
        task = DistillTask(student, teacher, criterion, outlier_exposure=exposure)
        train_loader = data.train_batches(train_rows, "paired", cfg)
        val_ds = data.paired_dataset(val_rows, augment=False)
        d = cfg.distill
        ctx.console.print(f"{STAGE}: distilling {TEACHER} into a SAR student (T={d.temperature}, kd_weight={d.kd_weight}, "
                          f"gate={d.gate}, feature_weight={d.feature_weight}, feature_norm={d.feature_norm})")
    else:
        why = "SAR-only dataset" if not ctx.layout.has_eo else "kd_weight and feature_weight are 0"
        ctx.console.print(f"{STAGE}: {why}: no teacher; training the SAR model on labels alone")
        task = ClassifierTask(student, supervised, outlier_exposure=exposure)
        train_loader = data.train_batches(train_rows, "sar", cfg)
        val_ds = data.chip_dataset("sar", val_rows, augment=False)

    if adversarial.active:
        task = with_adversarial(task, adversarial, data.norm("sar"))
        ctx.console.print(f"{STAGE}: adversarial training: {adversarial.describe()}")
    result = fit_stage(ctx, task, train_loader, data.loader(val_ds, cfg.batch_size, train=False))
    if with_teacher:
        after = teacher.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in before):
            raise RuntimeError("the frozen EO teacher changed during distillation")
    save_stage_artifact(
        ctx, result.best_state, model_spec(student, ctx.geometry["sar"].packed, ctx.packed.norm["sar"]),
        parents=parents, metrics={**result.best_metrics, "best_epoch": result.best_epoch},
        split_sha256=split_sha, modality="sar", distilled=with_teacher,
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
