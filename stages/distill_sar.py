"""Stage 2: distill the frozen EO teacher into a SAR student on paired chips.

Loss = supervised focal/CE on SAR labels + kd_weight * T^2 * KL(teacher_T || student_T) + feature_weight
* alignment of the student's projected embedding to the teacher's. Both chips of a pair get the same
geometric augmentation. Writes weights/sar_student.* with the teacher's sha256 in its manifest.
On a SAR-only dataset the student trains on labels alone. `distill_sar.adversarial` trains on attacked
SAR chips (pipeline.robust.training); `distill_sar.freeze_layers` keeps early pretrained layers fixed.
"""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.errors import UserError, exit_on_user_error
from pipeline.losses import DistillationLoss, build_classification_loss
from pipeline.models import freeze_early_layers, model_from_spec, model_spec
from pipeline.robust.training import AdversarialSettings, with_adversarial
from pipeline.stage import (
    build_parser,
    check_parent_split,
    chip_dataset,
    class_counts,
    holds_weights_lock,
    make_loader,
    new_model,
    paired_dataset,
    parent_digest,
    prepare_stage,
    save_split,
    save_stage_artifact,
    train_batches,
    train_val_rows,
)
from pipeline.artifacts import load_artifact
from pipeline.tasks import ClassifierTask, DistillTask
from pipeline.train import fit

STAGE = "distill_sar"
ARTIFACT = "sar_student"
TEACHER = "eo_teacher"


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    args = build_parser(STAGE, __doc__).parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    cfg = ctx.stage_cfg
    adversarial = AdversarialSettings.from_config(cfg.get("adversarial"))  # a bad setting stops before training
    freeze = int(cfg.get("freeze_layers") or 0)
    if freeze and not ctx.cfg["model"]["init_weights"]:
        raise UserError("distill_sar.freeze_layers keeps pretrained layers fixed: set model.init_weights, or freeze_layers 0")
    with_teacher = ctx.layout.has_eo
    parents = {TEACHER: parent_digest(ctx, TEACHER)} if with_teacher else {}
    if ctx.skip_if_fresh(ARTIFACT, parents):
        return 0

    train_rows, val_rows = train_val_rows(ctx, modality="sar")
    if with_teacher:
        teacher_state, teacher_manifest = load_artifact(ctx.weights_dir, TEACHER, ctx.packed.train_fingerprint)
        check_parent_split(ctx, TEACHER, teacher_manifest)  # before save_split overwrites anything
    split_sha = save_split(ctx, ARTIFACT)
    student = new_model(ctx, "sar")
    if freeze:
        frozen = freeze_early_layers(student, freeze)
        ctx.console.print(f"{STAGE}: froze the first {freeze} convolution(s) of the student ({len(frozen)} tensors)")
    supervised = build_classification_loss(cfg["loss"], class_counts(ctx, train_rows))

    if with_teacher:
        teacher = model_from_spec(teacher_manifest["model"])
        teacher.load_state_dict(teacher_state)
        teacher.to(ctx.device)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        criterion = DistillationLoss(
            supervised, cfg["distill"], student_dim=student.embed_dim, teacher_dim=teacher.embed_dim
        )
        task = DistillTask(student, teacher, criterion)
        train_loader = train_batches(ctx, train_rows, "paired")
        val_ds = paired_dataset(ctx, val_rows, augment=False)
        ctx.console.print(f"{STAGE}: distilling {TEACHER} into a SAR student (T={cfg['distill']['temperature']}, kd_weight={cfg['distill']['kd_weight']}, feature_weight={cfg['distill']['feature_weight']})")
    else:
        ctx.console.print(f"{STAGE}: SAR-only dataset: no teacher; training the SAR model on labels alone")
        task = ClassifierTask(student, supervised)
        train_loader = train_batches(ctx, train_rows, "sar")
        val_ds = chip_dataset(ctx, "sar", val_rows, augment=False)

    if adversarial.active:
        sar_norm = ctx.packed.norm["sar"]
        task = with_adversarial(task, adversarial, (sar_norm["mean"], sar_norm["std"]))
        ctx.console.print(f"{STAGE}: adversarial training: {adversarial.describe()}")
    result = fit(
        task, train_loader,
        make_loader(val_ds, cfg["batch_size"], ctx, train=False), cfg, ctx.num_classes,
        ctx.paths(ARTIFACT), ctx.device, resume=args.resume, seed=ctx.seed, console=ctx.console,
    )
    if with_teacher:
        after = teacher.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in before):
            raise RuntimeError("the frozen EO teacher changed during distillation")
    save_stage_artifact(
        ctx, ARTIFACT, result.best_state,
        model_spec(student, ctx.geometry["sar"].packed, ctx.packed.norm["sar"]),
        parents=parents, metrics={**result.best_metrics, "best_epoch": result.best_epoch},
        split_sha256=split_sha, modality="sar", distilled=with_teacher,
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
