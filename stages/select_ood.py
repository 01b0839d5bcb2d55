"""Choose the OOD detector on validation data, one training class left out at a time.

Embeds the training and validation splits of weights/sar_final with the infer stage's TTA (its views
chosen on validation as infer chooses them when infer.tta.views is auto; cached in
weights/ood_embeddings.npz, with virtual anomalies of the training chips when a candidate such as
hypersphere needs them), then for each class c refits every candidate detector (and, for the ones
that read logits, a logistic-regression head) without c and measures the AUROC of c's validation
chips against the others. Prints detector x mean AUROC +- standard error over the left-out classes and
writes the winner to weights/ood_choice.json, which infer uses when infer.ood.method is auto.

With select_ood.proxy_folds N > 0 the unseen classes are made honestly instead: N proxy SAR models are
trained (the distill_sar recipe on SAR labels, proxy_epochs), each without proxy_left_out training
classes, and every detector, fitted on a proxy's own training outputs, scores those classes' validation
chips against the other classes' (cached in weights/ood_proxy_embeddings.npz). The final model has seen
every training class, so on its embeddings a left-out class is easy to tell apart and every embedding
detector scores near 1; a proxy's features never saw it, as the final model never saw a test-time
unseen class. Test chips and test labels are never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from pipeline import distributed
from pipeline.artifacts import ArtifactPaths, atomic_write, code_version
from pipeline.errors import UserError, exit_on_user_error
from pipeline.inference import anomaly_dataset, predict, resolve_views, with_views
from pipeline.losses import OutlierExposure, build_classification_loss
from pipeline.ood import make_detector
from pipeline.ood.fit import head_of, write_choice
from pipeline.ood.knn import capped_rows
from pipeline.ood.select import (
    CandidateResult, candidates, choose, leave_one_class_out, proxy_groups, score_unseen_classes,
)
from pipeline.stage import StageContext, build_parser, holds_weights_lock, load_model, new_model, parent_digest, prepare_stage
from pipeline.tasks import ClassifierTask
from pipeline.train import fit

STAGE = "select_ood"
PARENT = "sar_final"
CACHE_FILE = "ood_embeddings.npz"
PROXY_CACHE_FILE = "ood_proxy_embeddings.npz"
PROXY_TMP_PREFIX = ".ood_proxy_"  # a proxy's training files (metrics, resume state), removed after it is embedded


def cached_outputs(path: Path, key: dict, compute) -> dict[str, np.ndarray]:
    """Arrays from `path` when it was written for `key`, else `compute()` saved there."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) == digest:
                    return {k: data[k] for k in data.files if k != "key"}
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: recompute
    arrays = compute()
    atomic_write(path, lambda fh: np.savez(fh, key=np.array(digest), **arrays))
    return arrays


def proxy_epochs(ctx: StageContext) -> int:
    """Training epochs of each proxy model: select_ood.proxy_epochs, or half of distill_sar's (auto)."""
    epochs = ctx.stage_cfg.proxy_epochs
    return max(1, ctx.cfg.distill_sar.epochs // 2) if epochs == "auto" else int(epochs)


def proxy_outputs(ctx: StageContext, groups: list[list[int]], views: list[str], anomaly_detector) -> dict[str, np.ndarray]:
    """Train one proxy SAR model per group of left-out classes and embed, with the infer views: its
    training rows (no chip of the group), the whole validation split and, when a candidate needs them,
    virtual anomalies of those training rows. Arrays keyed fold<f>_<what>. A proxy follows distill_sar's
    schedule, loss, sampler and outlier exposure on SAR labels alone: no teacher, no adversarial training,
    no frozen layers (model.init_weights, when set, is its starting point as it is the final model's)."""
    train_rows, val_rows = ctx.data.train_val_rows("sar")
    labels = ctx.data.labels
    epochs = proxy_epochs(ctx)
    for stale in ctx.weights_dir.glob(f"{PROXY_TMP_PREFIX}*"):  # left by a killed run (we hold the weights lock)
        shutil.rmtree(stale, ignore_errors=True)
    proxy_cfg = ctx.cfg.distill_sar.model_copy(update={"epochs": epochs})
    infer_cfg = with_views(ctx.cfg.infer, views)
    names = ctx.layout.classes.names
    out: dict[str, np.ndarray] = {}
    for f, group in enumerate(groups):
        kept = train_rows[~np.isin(labels[train_rows], group)]
        val_seen = val_rows[~np.isin(labels[val_rows], group)]
        ctx.console.print(f"{STAGE}: proxy model {f + 1}/{len(groups)} without {', '.join(names[c] for c in group)} "
                          f"({len(kept)} training chips, {epochs} epochs)")
        torch.manual_seed(ctx.seed + 1 + f)  # each proxy's initial weights depend on its fold alone
        model = new_model(ctx, "sar")
        exposure = OutlierExposure.from_config(proxy_cfg.outlier_exposure, seed=ctx.seed + 1 + f)
        task = ClassifierTask(model, build_classification_loss(proxy_cfg.loss, ctx.class_counts(kept)), outlier_exposure=exposure)
        val_loader = ctx.data.loader(ctx.data.chip_dataset("sar", val_seen, augment=False), proxy_cfg.batch_size, train=False)
        with tempfile.TemporaryDirectory(dir=ctx.weights_dir, prefix=PROXY_TMP_PREFIX) as tmp:
            fit(task, ctx.data.train_batches(kept, "sar", proxy_cfg), val_loader, proxy_cfg, ctx.num_classes,
                ArtifactPaths.of(tmp, "proxy"), ctx.device, seed=ctx.seed + 1 + f, console=ctx.console)
        model.eval()
        for split, rows in (("train", kept), ("val", val_rows)):
            _, out[f"fold{f}_{split}_logits"], out[f"fold{f}_{split}_emb"] = predict(
                model, ctx.data.chip_dataset("sar", rows, augment=False), infer_cfg, ctx.device)
            out[f"fold{f}_{split}_labels"] = labels[rows]
        out[f"fold{f}_head_weight"], out[f"fold{f}_head_bias"] = head_of(model)
        if anomaly_detector is not None:
            anomalies = anomaly_dataset(anomaly_detector, ctx.data.chip_dataset("sar", kept, augment=False), labels[kept], seed=ctx.seed)
            _, _, out[f"fold{f}_anomaly_emb"] = predict(model, anomalies, infer_cfg, ctx.device)
    return out


def proxy_inputs(ctx: StageContext) -> dict:
    """The config the proxy models are trained from: the common sections and the parts of distill_sar a
    labels-only proxy reads (no teacher terms, adversarial training or layer freezing; workers change nothing)."""
    common = {k: v for k, v in ctx.recorded_config.items() if k != STAGE}
    common["data"] = {k: v for k, v in common["data"].items() if k != "num_workers"}
    recipe = ctx.cfg.distill_sar.model_dump(exclude={"distill", "adversarial", "freeze_layers", "epochs"})
    return {**common, "distill_sar": recipe}


def proxy_results(ctx: StageContext, cands, views: list[str], anomaly_detector) -> tuple[list[CandidateResult], list[list[int]]]:
    """Every candidate's AUROC per left-out class, on proxy models that never saw it (cached)."""
    cfg = ctx.stage_cfg
    _, val_rows = ctx.data.train_val_rows("sar")
    present = sorted(set(np.unique(ctx.data.labels[val_rows]).tolist()))
    groups = proxy_groups(present, cfg.proxy_folds, cfg.proxy_left_out, seed=ctx.seed)
    key = {"common": proxy_inputs(ctx), "epochs": proxy_epochs(ctx), "views": views,
           "scales": list(ctx.cfg.infer.tta.scales), "groups": groups,
           "split_sha256": ctx.data.split_digest(), "train_fingerprint": ctx.packed.train_fingerprint,
           "anomalies": None if anomaly_detector is None else
           [anomaly_detector.anomalies_per_chip, list(anomaly_detector.anomaly_kinds)]}
    arrays = cached_outputs(ctx.weights_dir / PROXY_CACHE_FILE, key, lambda: proxy_outputs(ctx, groups, views, anomaly_detector))
    results = [CandidateResult(c, {}) for c in cands]
    for f, group in enumerate(groups):
        a = {k.split("_", 1)[1]: v for k, v in arrays.items() if k.startswith(f"fold{f}_")}
        known = np.setdiff1d(np.arange(ctx.num_classes), group)  # a model that never knew the group has no logit for it
        train = capped_rows(a["train_labels"], cfg.max_per_class, ctx.seed)
        per_candidate = score_unseen_classes(
            a["train_logits"][train][:, known], a["train_emb"][train], a["train_labels"][train], a["val_logits"][:, known],
            a["val_emb"], a["val_labels"], group, cands, ctx.cfg.infer.ood,
            head=(a["head_weight"][known], a["head_bias"][known]), anomaly_emb=a.get("anomaly_emb"), seed=ctx.seed,
        )
        for result, per_class in zip(results, per_candidate):
            result.per_class.update(per_class)
    return results, groups


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    args = build_parser(STAGE, __doc__).parse_args(argv)
    if distributed.is_distributed():
        raise UserError(f"{STAGE} runs as one process: python -m stages.{STAGE} (not torchrun)")
    ctx = prepare_stage(STAGE, args)
    cfg, infer_cfg = ctx.stage_cfg, ctx.cfg.infer
    cands = candidates(cfg)  # a bad candidate list stops here, before any embedding
    model_sha = parent_digest(ctx, PARENT)
    train_rows, val_rows = ctx.data.train_val_rows("sar")
    labels = ctx.data.labels

    proxy = cfg.proxy_folds > 0
    # virtual anomalies of the training chips, for candidates such as hypersphere (same TTA, cached too)
    anomaly_detector = next((d for d in (make_detector(c.method, infer_cfg.ood, seed=ctx.seed, **c.params) for c in cands)
                             if d.needs_anomalies), None)
    final_anomalies = anomaly_detector if not proxy else None  # proxy folds embed their own

    def embed() -> dict[str, np.ndarray]:
        model = load_model(ctx, PARENT)[0].eval()
        val_split = (ctx.data.chip_dataset("sar", val_rows, augment=False), labels[val_rows])
        resolved = resolve_views(model, infer_cfg, ctx.device, lambda: val_split)  # the views infer will use
        ctx.console.print(f"{STAGE}: {resolved.choice.describe()}")
        out = {"views": np.array(resolved.choice.views)}
        if proxy:  # the proxies embed their own splits: only the views are needed from the final model
            return out
        ctx.console.print(f"{STAGE}: embedding {len(train_rows)} training and {len(val_rows)} validation chips with TTA")
        for split, rows in (("train", train_rows), ("val", val_rows)):
            if split == "val" and resolved.validation is not None:
                emb = resolved.validation[2]
            else:
                _, _, emb = predict(model, ctx.data.chip_dataset("sar", rows, augment=False), resolved.cfg, ctx.device)
            out[f"{split}_emb"], out[f"{split}_labels"] = emb, labels[rows]
        if final_anomalies is not None:
            anomalies = anomaly_dataset(final_anomalies, ctx.data.chip_dataset("sar", train_rows, augment=False),
                                        labels[train_rows], seed=ctx.seed)
            ctx.console.print(f"{STAGE}: embedding {len(anomalies)} virtual anomalies of the training chips with TTA")
            _, _, out["anomaly_emb"] = predict(model, anomalies, resolved.cfg, ctx.device)
            out["anomaly_source_labels"] = labels[train_rows][anomalies.sources]
        return out

    key = {"model_sha256": model_sha, "tta": infer_cfg.tta.model_dump(), "split_sha256": ctx.data.split_digest(),
           "train_fingerprint": ctx.packed.train_fingerprint, "rows": [len(train_rows), len(val_rows)], "views_only": proxy}
    if final_anomalies is not None:
        key["anomalies"] = {"per_chip": final_anomalies.anomalies_per_chip, "kinds": final_anomalies.anomaly_kinds,
                            "seed": ctx.seed}
    data = cached_outputs(ctx.weights_dir / CACHE_FILE, key, embed)
    views = [str(v) for v in data.pop("views")]

    names = list(ctx.layout.classes.names)
    groups: list[list[int]] = []
    if proxy:
        results, groups = proxy_results(ctx, cands, views, anomaly_detector)
        title = (f"OOD detectors on {len(groups)} proxy models, each trained without "
                 f"{' / '.join(', '.join(names[c] for c in g) for g in groups)} (validation split)")
    else:
        results = leave_one_class_out(
            data["train_emb"], data["train_labels"], data["val_emb"], data["val_labels"], cands,
            infer_cfg.ood, head_c=cfg.head_c, max_per_class=cfg.max_per_class, seed=ctx.seed,
            anomaly_emb=data.get("anomaly_emb"), anomaly_source_labels=data.get("anomaly_source_labels"),
        )
        title = f"OOD detectors, one training class left out at a time ({len(results[0].per_class)} classes, validation split)"
    winner = choose(results, cfg.rule)
    left_out = [names[c] for c in results[0].per_class]
    table = Table(title=title)
    for column in ("detector", "mean AUROC", "± s.e.", "worst left-out class"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for r in results:
        worst = min(r.per_class, key=r.per_class.get)
        table.add_row(r.candidate.label + (" *" if r is winner else ""), f"{r.mean:.4f}", f"{r.se:.4f}",
                      f"{names[worst]} {r.per_class[worst]:.3f}")
    ctx.console.print(table)

    choice = {
        "method": winner.candidate.method, "params": winner.candidate.params, "label": winner.candidate.label,
        "mean_auroc": winner.mean, "se": winner.se, "model_sha256": model_sha, "split_sha256": key["split_sha256"],
        "tta": infer_cfg.tta.model_dump(), "tta_views": views, "ood_config": infer_cfg.ood.model_dump(), "config": ctx.recorded_config,
        "left_out": left_out, "validation": "proxy_folds" if proxy else "leave_one_class_out",
        "proxy_groups": [[names[c] for c in g] for g in groups],
        "table": [{"label": r.candidate.label, "method": r.candidate.method, "params": r.candidate.params,
                   "mean_auroc": r.mean, "se": r.se,
                   "per_class": {names[c]: a for c, a in r.per_class.items()}} for r in results],
        "code_version": code_version(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_choice(ctx.weights_dir, choice)
    ctx.console.print(
        f"[green]{STAGE}[/]: chose {winner.candidate.label} (mean AUROC {winner.mean:.4f} ± {winner.se:.4f}); "
        f"wrote {path} (used when infer.ood.method is auto)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
