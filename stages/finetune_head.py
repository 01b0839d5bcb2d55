"""Stage 3: fine-tune only the classification head of the SAR student with a class-balanced sampler.

The backbone is frozen (no gradient, batch-norm statistics untouched). Fast path (default when
`finetune_head.augment` is false): embed the training chips once (plus `aug_copies` augmented copies)
and train the head on the cached embeddings. With `finetune_head.pseudo_labels.enabled` (fast path only),
confident, in-distribution-looking test chips join the training with the labels the stage-2 model
gives them (thresholds set on validation; pipeline.pseudo). Writes weights/sar_final.*.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import distributed
from pipeline.artifacts import load_artifact
from pipeline.data.datasets import ChipDataset
from pipeline.data.samplers import make_sampler
from pipeline.errors import UserError, exit_on_user_error
from pipeline.losses import build_classification_loss
from pipeline.models import ChipClassifier, model_from_spec
from pipeline.pseudo import PseudoLabelSettings, select_pseudo_labels
from pipeline.stage import (
    build_parser,
    check_parent_split,
    chip_dataset,
    class_counts,
    holds_weights_lock,
    make_loader,
    make_stage_sampler,
    parent_digest,
    prepare_stage,
    save_split,
    save_stage_artifact,
    steps_samples,
    StageContext,
    train_batches,
    train_val_rows,
)
from pipeline.tasks import EmbeddingDataset, HeadTask, embed_dataset
from pipeline.train import fit

STAGE = "finetune_head"
ARTIFACT = "sar_final"
PARENT = "sar_student"


def backbone_digest(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every backbone tensor, buffers (batch-norm statistics) included."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def pseudo_label_embeddings(
    ctx: StageContext, model: ChipClassifier, settings: PseudoLabelSettings, val_emb: torch.Tensor, val_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Embeddings and predicted labels of the test chips the stage-2 model is sure of (pipeline.pseudo)."""
    test = ctx.packed.test_index
    norm = ctx.packed.norm["sar"]
    dataset = ChipDataset(ctx.packed.test_sar, test["sar_row"].to_numpy(), np.zeros(len(test), dtype=np.int64),
                          norm=(norm["mean"], norm["std"]), augment=None, seed=ctx.seed)
    test_emb, _ = embed_dataset(model, dataset, 512, ctx.device)
    with torch.no_grad():
        head = model.classifier.to("cpu").float()
        test_logits, val_logits = head(test_emb).numpy(), head(val_emb).numpy()
        model.classifier.to(ctx.device)
    chosen = select_pseudo_labels(test_logits, val_logits, val_labels.numpy(), settings)
    per_class = np.bincount(chosen.labels, minlength=ctx.num_classes).tolist()
    ctx.console.print(f"{STAGE}: pseudo-labels: {len(chosen.indices)} of {len(test)} test chips (confidence >= "
                      f"{chosen.min_confidence:.3f}, energy >= {chosen.energy_floor}, validation precision "
                      f"{chosen.val_precision:.3f}); per class {per_class}")
    info = {"chips": int(len(chosen.indices)), "min_confidence": chosen.min_confidence, "energy_floor": chosen.energy_floor,
            "val_precision": chosen.val_precision, "per_class": per_class, "reason": chosen.reason}
    return test_emb[torch.as_tensor(chosen.indices)], torch.as_tensor(chosen.labels), info


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    args = build_parser(STAGE, __doc__).parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    parents = {PARENT: parent_digest(ctx, PARENT)}
    pseudo = PseudoLabelSettings.from_config(ctx.stage_cfg.get("pseudo_labels"))
    if pseudo.enabled:
        if ctx.stage_cfg["augment"]:
            raise UserError("finetune_head.pseudo_labels needs the fast path: set finetune_head.augment=false")
        parents["test_chips"] = ctx.packed.test_fingerprint  # the head then depends on the test chips too
    if ctx.skip_if_fresh(ARTIFACT, parents):
        return 0
    state, manifest = load_artifact(ctx.weights_dir, PARENT, ctx.packed.train_fingerprint)
    check_parent_split(ctx, PARENT, manifest)  # epochs are selected on validation chips the backbone never saw
    model = model_from_spec(manifest["model"])
    model.load_state_dict(state)
    model.to(ctx.device)
    frozen = backbone_digest(model)

    cfg = ctx.stage_cfg
    pseudo_info: dict | None = None
    train_rows, val_rows = train_val_rows(ctx, modality="sar")
    split_sha = save_split(ctx, ARTIFACT)
    loss = build_classification_loss(cfg["loss"], class_counts(ctx, train_rows))
    task = HeadTask(model, loss)
    if cfg["augment"]:
        ctx.console.print(f"{STAGE}: head on the frozen backbone, chips augmented and embedded every step")
        train_loader = train_batches(ctx, train_rows, "sar")
        val_ds = chip_dataset(ctx, "sar", val_rows, augment=False)
    else:
        copies = int(cfg["aug_copies"])
        ctx.console.print(f"{STAGE}: fast path: embedding {len(train_rows)} training chips once (+{copies} augmented copies)")
        emb, labels = embed_dataset(model, chip_dataset(ctx, "sar", train_rows, augment=False), 512, ctx.device)
        if copies:
            aug_emb, aug_labels = embed_dataset(
                model, chip_dataset(ctx, "sar", train_rows, augment=True), 512, ctx.device, epochs=range(1, copies + 1)
            )
            emb, labels = torch.cat([emb, aug_emb]), torch.cat([labels, aug_labels])
        val_emb, val_labels = embed_dataset(model, chip_dataset(ctx, "sar", val_rows, augment=False), 512, ctx.device)
        val_ds = EmbeddingDataset(val_emb, val_labels)
        all_rows = np.concatenate([train_rows] * (copies + 1))
        sampler = make_stage_sampler(ctx, all_rows)
        if pseudo.enabled:
            p_emb, p_labels, pseudo_info = pseudo_label_embeddings(ctx, model, pseudo, val_emb, val_labels)
            emb, labels = torch.cat([emb, p_emb]), torch.cat([labels, p_labels])
            sampler = make_sampler(cfg["sampler"]["kind"], labels.numpy(), float(cfg["sampler"]["power"]),
                                   num_samples=steps_samples(cfg, len(labels)), seed=ctx.seed,
                                   rank=distributed.rank(), world_size=distributed.world_size())
        train_ds = EmbeddingDataset(emb, labels)
        train_loader = make_loader(train_ds, cfg["batch_size"], ctx, sampler)

    result = fit(
        task, train_loader,
        make_loader(val_ds, cfg["batch_size"], ctx, train=False), cfg, ctx.num_classes,
        ctx.paths(ARTIFACT), ctx.device, resume=args.resume, seed=ctx.seed, console=ctx.console,
    )
    model.load_state_dict(result.best_state)
    after = backbone_digest(model)
    unchanged = all(torch.equal(frozen[k], after[k]) for k in frozen)
    if not unchanged:
        raise RuntimeError("the frozen backbone changed while fine-tuning the head")
    save_stage_artifact(
        ctx, ARTIFACT, result.best_state, manifest["model"], parents=parents,
        metrics={**result.best_metrics, "best_epoch": result.best_epoch},
        split_sha256=split_sha, modality="sar", backbone_unchanged=unchanged, pseudo_labels=pseudo_info,
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
