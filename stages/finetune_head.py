"""Stage 3: fine-tune only the classification head of the SAR student with a class-balanced sampler.

The backbone is frozen (no gradient, batch-norm statistics untouched). Fast path (default when
`finetune_head.augment` is false): embed the training chips once (plus `aug_copies` augmented copies)
and train the head on the cached embeddings. With `finetune_head.pseudo_labels.enabled` (fast path only),
confident, in-distribution-looking test chips join the training with the labels the stage-2 model
gives them (thresholds set on validation; pipeline.pseudo). Writes weights/sar_final.*.
"""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.errors import UserError, exit_on_user_error
from pipeline.losses import build_classification_loss
from pipeline.pseudo import PseudoLabelSettings, pseudo_labelled_embeddings
from pipeline.stage import (
    build_parser, check_parent_split, fit_stage, holds_weights_lock, load_model, parent_digests, prepare_stage,
    save_split, save_stage_artifact,
)
from pipeline.tasks import EmbeddingDataset, HeadTask, embed_dataset

STAGE = "finetune_head"
PARENT = "sar_student"


def backbone_digest(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every backbone tensor, buffers (batch-norm statistics) included."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    ctx = prepare_stage(STAGE, build_parser(STAGE, __doc__).parse_args(argv))
    cfg, data = ctx.stage_cfg, ctx.data
    parents = parent_digests(ctx)
    pseudo = PseudoLabelSettings.from_config(cfg.pseudo_labels.model_dump())
    if pseudo.enabled:
        if cfg.augment:
            raise UserError("finetune_head.pseudo_labels needs the fast path: set finetune_head.augment=false")
        parents["test_chips"] = ctx.packed.test_fingerprint  # the head then depends on the test chips too
    if ctx.skip_if_fresh("sar_final", parents):
        return 0
    model, manifest = load_model(ctx, PARENT)
    check_parent_split(ctx, PARENT, manifest)  # epochs are selected on validation chips the backbone never saw
    frozen = backbone_digest(model)

    train_rows, val_rows = data.train_val_rows("sar")
    split_sha = save_split(ctx, "sar_final")
    task = HeadTask(model, build_classification_loss(cfg.loss, ctx.class_counts(train_rows)))
    pseudo_info = None
    if cfg.augment:
        ctx.console.print(f"{STAGE}: head on the frozen backbone, chips augmented and embedded every step")
        train_loader = data.train_batches(train_rows, "sar", cfg)
        val_ds = data.chip_dataset("sar", val_rows, augment=False)
    else:
        copies = cfg.aug_copies
        ctx.console.print(f"{STAGE}: fast path: embedding {len(train_rows)} training chips once (+{copies} augmented copies)")
        emb, labels = embed_dataset(model, data.chip_dataset("sar", train_rows, augment=False), 512, ctx.device)
        if copies:
            aug_emb, aug_labels = embed_dataset(
                model, data.chip_dataset("sar", train_rows, augment=True), 512, ctx.device, epochs=range(1, copies + 1)
            )
            emb, labels = torch.cat([emb, aug_emb]), torch.cat([labels, aug_labels])
        val_emb, val_labels = embed_dataset(model, data.chip_dataset("sar", val_rows, augment=False), 512, ctx.device)
        val_ds = EmbeddingDataset(val_emb, val_labels)
        if pseudo.enabled:
            test = data.test_dataset(norm=data.norm("sar"))
            p_emb, p_labels, pseudo_info = pseudo_labelled_embeddings(model, test, val_emb, val_labels, pseudo, ctx.device, ctx.num_classes)
            ctx.console.print(f"{STAGE}: pseudo-labels: {pseudo_info['chips']} of {pseudo_info['of']} test chips, per class {pseudo_info['per_class']}")
            emb, labels = torch.cat([emb, p_emb]), torch.cat([labels, p_labels])
        train_loader = data.loader(EmbeddingDataset(emb, labels), data.train_batch_size(cfg, len(labels)),
                                   data.sampler_for(labels.numpy(), cfg))

    result = fit_stage(ctx, task, train_loader, data.loader(val_ds, cfg.batch_size, train=False))
    model.load_state_dict(result.best_state)
    after = backbone_digest(model)
    unchanged = all(torch.equal(frozen[k], after[k]) for k in frozen)
    if not unchanged:
        raise RuntimeError("the frozen backbone changed while fine-tuning the head")
    save_stage_artifact(
        ctx, result.best_state, manifest["model"], parents=parents, metrics={**result.best_metrics, "best_epoch": result.best_epoch},
        split_sha256=split_sha, modality="sar", backbone_unchanged=unchanged, pseudo_labels=pseudo_info,
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
