"""Choose the OOD detector on validation data, one training class left out at a time.

Embeds the training and validation splits of weights/sar_final with the infer stage's TTA (its views
chosen on validation as infer chooses them when infer.tta.views is auto; cached in
weights/ood_embeddings.npz, with virtual anomalies of the training chips when a candidate such as
hypersphere needs them), then for each class c refits every candidate detector (and, for the ones
that read logits, a logistic-regression head) without c and measures the AUROC of c's validation
chips against the others. Prints detector x mean AUROC +- standard error over the left-out classes and
writes the winner to weights/ood_choice.json, which infer uses when infer.ood.method is auto.
Test chips and test labels are never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from pipeline import distributed
from pipeline.artifacts import atomic_write, code_version
from pipeline.errors import UserError, exit_on_user_error
from pipeline.inference import anomaly_dataset, predict, resolve_views
from pipeline.ood import make_detector
from pipeline.ood.fit import write_choice
from pipeline.ood.select import best, candidates, leave_one_class_out
from pipeline.stage import build_parser, holds_weights_lock, load_model, parent_digest, prepare_stage

STAGE = "select_ood"
PARENT = "sar_final"
CACHE_FILE = "ood_embeddings.npz"


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

    # virtual anomalies of the training chips, for candidates such as hypersphere (same TTA, cached too)
    anomaly_detector = next((d for d in (make_detector(c.method, infer_cfg.ood, seed=ctx.seed, **c.params) for c in cands)
                             if d.needs_anomalies), None)

    def embed() -> dict[str, np.ndarray]:
        model = load_model(ctx, PARENT)[0].eval()
        val_split = (ctx.data.chip_dataset("sar", val_rows, augment=False), labels[val_rows])
        resolved = resolve_views(model, infer_cfg, ctx.device, lambda: val_split)  # the views infer will use
        ctx.console.print(f"{STAGE}: {resolved.choice.describe()}")
        ctx.console.print(f"{STAGE}: embedding {len(train_rows)} training and {len(val_rows)} validation chips with TTA")
        out = {"views": np.array(resolved.choice.views)}
        for split, rows in (("train", train_rows), ("val", val_rows)):
            if split == "val" and resolved.validation is not None:
                emb = resolved.validation[2]
            else:
                _, _, emb = predict(model, ctx.data.chip_dataset("sar", rows, augment=False), resolved.cfg, ctx.device)
            out[f"{split}_emb"], out[f"{split}_labels"] = emb, labels[rows]
        if anomaly_detector is not None:
            anomalies = anomaly_dataset(anomaly_detector, ctx.data.chip_dataset("sar", train_rows, augment=False),
                                        labels[train_rows], seed=ctx.seed)
            ctx.console.print(f"{STAGE}: embedding {len(anomalies)} virtual anomalies of the training chips with TTA")
            _, _, out["anomaly_emb"] = predict(model, anomalies, resolved.cfg, ctx.device)
            out["anomaly_source_labels"] = labels[train_rows][anomalies.sources]
        return out

    key = {"model_sha256": model_sha, "tta": infer_cfg.tta.model_dump(), "split_sha256": ctx.data.split_digest(),
           "train_fingerprint": ctx.packed.train_fingerprint, "rows": [len(train_rows), len(val_rows)]}
    if anomaly_detector is not None:
        key["anomalies"] = {"per_chip": anomaly_detector.anomalies_per_chip, "kinds": anomaly_detector.anomaly_kinds,
                            "seed": ctx.seed}
    data = cached_outputs(ctx.weights_dir / CACHE_FILE, key, embed)
    views = [str(v) for v in data.pop("views")]

    names = list(ctx.layout.classes.names)
    results = leave_one_class_out(
        data["train_emb"], data["train_labels"], data["val_emb"], data["val_labels"], cands,
        infer_cfg.ood, head_c=cfg.head_c, max_per_class=cfg.max_per_class, seed=ctx.seed,
        anomaly_emb=data.get("anomaly_emb"), anomaly_source_labels=data.get("anomaly_source_labels"),
    )
    winner = best(results)
    left_out = [names[c] for c in results[0].per_class]
    table = Table(title=f"OOD detectors, one training class left out at a time ({len(left_out)} classes, validation split)")
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
        "left_out": left_out,
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
