"""Stage 1: pretrain the EO teacher (timm backbone, 1 channel) with focal loss and a weighted sampler.

Writes weights/eo_teacher.{safetensors,json}. On a SAR-only dataset there is no EO to learn from:
the stage says so and writes nothing (distill_sar then trains on labels alone).
"""

from __future__ import annotations

from pipeline import distributed
from pipeline.errors import exit_on_user_error
from pipeline.losses import build_classification_loss
from pipeline.models import model_spec
from pipeline.stage import build_parser, fit_stage, holds_weights_lock, new_model, prepare_stage, save_split, save_stage_artifact
from pipeline.tasks import ClassifierTask

STAGE = "pretrain_eo"


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    ctx = prepare_stage(STAGE, build_parser(STAGE, __doc__).parse_args(argv))
    if not ctx.layout.has_eo:
        ctx.console.print(
            f"{STAGE}: this dataset has no EO chips (SAR-only layout), so there is no EO teacher to pretrain; "
            "nothing written. distill_sar will train the SAR model on labels alone."
        )
        ctx.report(skipped="no EO chips")
        return 0
    if not ctx.cfg.distill_sar.distill.uses_teacher:
        ctx.console.print(
            f"{STAGE}: distill_sar.distill.kd_weight and feature_weight are 0, so no term reads an EO teacher; "
            "nothing trained. distill_sar will train the SAR model on labels alone."
        )
        ctx.report(skipped="EO teacher unused")
        return 0
    if ctx.skip_if_fresh("eo_teacher", parents={}):
        return 0

    cfg, data = ctx.stage_cfg, ctx.data
    train_rows, val_rows = data.train_val_rows("eo")
    split_sha = save_split(ctx, "eo_teacher")
    model = new_model(ctx, "eo")
    loss = build_classification_loss(cfg.loss, ctx.class_counts(train_rows))
    result = fit_stage(
        ctx, ClassifierTask(model, loss), data.train_batches(train_rows, "eo", cfg),
        data.loader(data.chip_dataset("eo", val_rows, augment=False), cfg.batch_size, train=False),
    )
    save_stage_artifact(
        ctx, result.best_state, model_spec(model, ctx.geometry["eo"].packed, ctx.packed.norm["eo"]),
        parents={}, metrics={**result.best_metrics, "best_epoch": result.best_epoch}, split_sha256=split_sha, modality="eo",
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
