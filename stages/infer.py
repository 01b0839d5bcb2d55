"""Stage 4: predict the SAR test chips and write a submission folder.

Test-time augmentation averaged in one batched forward per batch (infer.tta.views auto: infer.tta.baseline
unless a candidate view set beats it on validation, for the test chips and the OOD detector's fit);
faiss k-means on the test embeddings with winner-take-all label correction inside confident, pure
clusters (when infer.cluster.enabled); an OOD score per chip (higher = more in-distribution) from the
detector `infer.ood.method` (knn, mahalanobis and vim are fitted once on the training split's
TTA-averaged embeddings; auto takes stages.select_ood's choice). Writes submissions/<run>/{results.csv,
predictions.csv, summary.json, ood_detector.npz} and, when the test labels are known, truth.csv and score.json. Last, the run report
(report.html + plots/, pipeline.report); a failing report is a warning, the submission stands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.artifacts import atomic_write_text, code_version
from pipeline.cli import DEFAULT_SUBMISSIONS
from pipeline.errors import exit_on_user_error
from pipeline.inference import prediction_tables, run_inference, voting_record, voting_settings
from pipeline.ood import save_detector
from pipeline.ood.fit import resolve_detector
from pipeline.report import REPORT_FILE, TRUTH_FILE, write_report_safely
from pipeline.stage import build_parser, holds_weights_lock, load_model, parent_digests, prepare_stage
from pipeline.submission import (
    HEADLINE, mark_latest, new_run_dir, reuse_fresh_submission, score_submission, write_score, write_submission,
)

STAGE = "infer"
DETECTOR_FILE = "ood_detector.npz"


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(STAGE, __doc__)
    parser.add_argument("--submissions", type=Path, default=DEFAULT_SUBMISSIONS, help="folder of submission runs")
    parser.add_argument("--run", default=None, help="name of the new submission folder (default: a timestamp); never overwritten")
    args = parser.parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    cfg, data = ctx.stage_cfg, ctx.data
    voting_settings(cfg)  # a bad setting stops here, not after the whole test set is predicted
    parents = parent_digests(ctx)
    detector, choice = resolve_detector(cfg.ood, ctx.weights_dir, parents["sar_final"], seed=ctx.seed)
    inputs = {"config": ctx.recorded_config, "train_fingerprint": ctx.packed.train_fingerprint,
              "test_fingerprint": ctx.packed.test_fingerprint, "parents": parents}
    if choice is not None:  # infer.ood.method auto: the chosen detector is an input too
        inputs["ood_choice"] = {"method": detector.name, "params": detector.params()}
    earlier = reuse_fresh_submission(args.submissions, inputs, STAGE, "config, data and model", ctx.console) if ctx.skip_fresh else None
    if earlier is not None:
        if not (earlier / REPORT_FILE).exists():  # a run made before reports existed gets one now
            write_report_safely(earlier, ctx.cfg.report, ctx.console)
        return 0

    model, manifest = load_model(ctx, "sar_final")
    spec, test = manifest["model"], ctx.packed.test_index
    test_ds = data.test_dataset(norm=(spec["norm"]["mean"], spec["norm"]["std"]))
    views = "TTA views chosen on validation" if cfg.tta.views == "auto" else f"{len(cfg.tta.views) * len(cfg.tta.scales)} TTA views"
    ctx.console.print(f"{STAGE}: {len(test_ds)} test chips, {views}")

    def training_split() -> tuple[object, np.ndarray]:
        rows, _ = data.train_val_rows("sar")
        ctx.console.print(f"{STAGE}: fitting the {detector.describe()} OOD detector on {len(rows)} training chips")
        return data.chip_dataset("sar", rows, augment=False), data.labels[rows]

    def validation_split() -> tuple[object, np.ndarray]:
        _, rows = data.train_val_rows("sar")
        return data.chip_dataset("sar", rows, augment=False), data.labels[rows]

    out = run_inference(model.eval(), test_ds, cfg, detector, ctx.device, seed=ctx.seed,
                        fit_data=training_split, val_data=validation_split)
    ctx.console.print(f"{STAGE}: {out.tta.describe()}")
    if cfg.cluster.enabled:
        ctx.console.print(f"{STAGE}: " + (f"voting with tau {out.plan.tau:.3f}, k {out.voting.k}, {int(out.plan.eligible.sum())} chips "
                                          f"above the OOD floor" if out.plan.vote else f"no voting: {out.plan.reason}"))
    ids, labels = test["image_id"].to_numpy().astype(np.int64), test["class_id"].to_numpy()
    results, predictions = prediction_tables(ids, test["path"].to_numpy(), out)
    changed = int(out.voting.changed.sum())
    summary = {
        "inputs": inputs, "model": spec, "dataset": ctx.dataset_record(), "num_test": int(len(ids)),
        "ood_method": detector.name,
        "ood": {"method": cfg.ood.method, "detector": detector.name, "params": detector.params(), "state_file": DETECTOR_FILE,
                "fitted_on_chips": out.fitted_on, "fit_seconds": out.fit_seconds,
                "choice": None if choice is None else {k: choice.get(k) for k in ("method", "params", "mean_auroc", "time")}},
        "votes_changed": changed, "voting": voting_record(out), "clusters": int(out.voting.k), "views": out.views,
        "tta": {**out.tta.record(), "seconds": out.tta_seconds},
        "predict_seconds": out.predict_seconds, "images_per_s": len(ids) / max(out.predict_seconds, 1e-9),
        "code_version": code_version(), "weights": str(ctx.weights_dir.resolve()),  # the report's training curves
    }
    if not distributed.is_main_process():
        distributed.cleanup()
        return 0
    run_dir = new_run_dir(args.submissions, args.run)
    save_detector(detector, run_dir / DETECTOR_FILE)  # results.csv, written last, marks a complete folder
    report = None
    if (labels >= -1).all():  # every test label known (-1: out of distribution)
        truth = pd.DataFrame({"image_id": ids, "class_id": labels})
        atomic_write_text(run_dir / TRUTH_FILE, truth.to_csv(index=False))  # per-chip truth for the report
        report = score_submission(results, truth, num_classes=ctx.num_classes)
        summary["score"] = {k: report[k] for k in HEADLINE}
    write_submission(run_dir, results, predictions, summary, expected_ids=ids, num_classes=ctx.num_classes)
    ctx.console.print(f"[green]{STAGE}[/]: wrote {run_dir / 'results.csv'} ({len(ids)} rows, {changed} labels changed by cluster voting)")
    mark_latest(args.submissions, run_dir)
    if report is not None:
        write_score(run_dir, report, list(ctx.layout.classes.names), ctx.console)
    write_report_safely(run_dir, ctx.cfg.report, ctx.console)  # after results.csv: it never costs the submission
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
