"""Stage 1: pretrain the EO teacher (timm backbone, 1 channel) with focal loss and a weighted sampler.

Writes weights/eo_teacher.{safetensors,json}. On a SAR-only dataset there is no EO to learn from:
the stage says so and writes nothing (distill_sar then trains on labels alone).
"""

from __future__ import annotations

from pipeline import distributed
from pipeline.errors import exit_on_user_error
from pipeline.losses import build_classification_loss
from pipeline.models import model_spec
from pipeline.stage import (
    build_parser,
    chip_dataset,
    class_counts,
    holds_weights_lock,
    make_loader,
    new_model,
    prepare_stage,
    save_split,
    save_stage_artifact,
    train_batches,
    train_val_rows,
)
from pipeline.tasks import ClassifierTask
from pipeline.train import fit

STAGE = "pretrain_eo"
ARTIFACT = "eo_teacher"


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    args = build_parser(STAGE, __doc__).parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    if not ctx.layout.has_eo:
        ctx.console.print(
            f"{STAGE}: this dataset has no EO chips (SAR-only layout), so there is no EO teacher to pretrain; "
            "nothing written. distill_sar will train the SAR model on labels alone."
        )
        ctx.report(skipped="no EO chips")
        return 0
    if ctx.skip_if_fresh(ARTIFACT, parents={}):
        return 0

    train_rows, val_rows = train_val_rows(ctx, modality="eo")
    split_sha = save_split(ctx, ARTIFACT)
    cfg = ctx.stage_cfg
    model = new_model(ctx, "eo")
    loss = build_classification_loss(cfg["loss"], class_counts(ctx, train_rows))
    train_loader = train_batches(ctx, train_rows, "eo")
    val_loader = make_loader(chip_dataset(ctx, "eo", val_rows, augment=False), cfg["batch_size"], ctx, train=False)

    result = fit(
        ClassifierTask(model, loss), train_loader, val_loader, cfg, ctx.num_classes,
        ctx.paths(ARTIFACT), ctx.device, resume=args.resume, seed=ctx.seed, console=ctx.console,
    )
    save_stage_artifact(
        ctx, ARTIFACT, result.best_state,
        model_spec(model, ctx.geometry["eo"].packed, ctx.packed.norm["eo"]),
        parents={}, metrics={**result.best_metrics, "best_epoch": result.best_epoch},
        split_sha256=split_sha, modality="eo",
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
