"""Stage 4: predict the SAR test chips and write a submission folder.

Test-time augmentation (flips, 90-degree rotations, input scales) averaged in one batched forward per
batch; faiss k-means on the test embeddings with winner-take-all label correction inside confident,
pure clusters; an OOD score per chip (higher = more in-distribution) from the detector
`infer.ood.method` (energy by default; knn, mahalanobis and vim are fitted once on the training
split's TTA-averaged embeddings; auto takes stages.select_ood's choice). Writes
submissions/<run>/{results.csv, predictions.csv, summary.json, ood_detector.npz} and, when the test labels are known
(synthetic test_truth.csv, labelled generic test split), scores itself into score.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.artifacts import atomic_write_text, code_version, load_artifact
from pipeline.cluster import VotingSettings, cluster_vote, no_vote, plan_voting
from pipeline.data.datasets import ChipDataset
from pipeline.errors import UserError, exit_on_user_error
from pipeline.inference import predict, softmax  # noqa: F401 (predict, softmax: stages.infer names kept)
from pipeline.models import model_from_spec
from pipeline.ood import ood_score, save_detector
from pipeline.ood.fit import fit_on_split, resolve_detector
from pipeline.stage import (
    REPO_ROOT, build_parser, chip_dataset, holds_weights_lock, parent_digest, prepare_stage, train_val_rows,
)
from pipeline.submission import new_run_dir, print_score_report, report_json, score_submission, write_submission

STAGE = "infer"
PARENT = "sar_final"
DEFAULT_SUBMISSIONS = REPO_ROOT / "submissions"
DETECTOR_FILE = "ood_detector.npz"


def find_fresh_submission(submissions: Path, inputs: dict) -> Path | None:
    """An earlier submission made from exactly these inputs (config, data, model), if any."""
    key = json.dumps(inputs, sort_keys=True)
    for summary in sorted(submissions.glob("*/summary.json")):
        try:
            if json.dumps(json.loads(summary.read_text()).get("inputs"), sort_keys=True) == key:
                return summary.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def mark_latest(submissions: Path, run_dir: Path) -> None:
    """Record the newest (or re-confirmed) submission folder in <submissions>/latest.txt."""
    atomic_write_text(submissions / "latest.txt", run_dir.name + "\n")


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(STAGE, __doc__, training=False)
    parser.add_argument("--submissions", type=Path, default=DEFAULT_SUBMISSIONS, help="folder of submission runs")
    parser.add_argument("--run", default=None, help="name of the new submission folder (default: a timestamp); never overwritten")
    args = parser.parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    cfg = ctx.stage_cfg
    voting_settings = VotingSettings.from_config(cfg["cluster"])  # a bad setting stops here, before predicting

    parents = {PARENT: parent_digest(ctx, PARENT)}
    ood = cfg["ood"]
    detector, choice = resolve_detector(ood, ctx.weights_dir, parents[PARENT], seed=ctx.seed)
    inputs = {
        "config": ctx.recorded_config, "train_fingerprint": ctx.packed.train_fingerprint,
        "test_fingerprint": ctx.packed.test_fingerprint, "parents": parents,
    }
    if choice is not None:  # infer.ood.method auto: the chosen detector is an input too
        inputs["ood_choice"] = {"method": detector.name, "params": detector.params()}
    if args.skip_fresh:
        earlier = find_fresh_submission(args.submissions, inputs)
        if earlier is not None:
            ctx.console.print(f"[green]{STAGE}[/]: {earlier} is up to date (same config, data and model), skipped")
            mark_latest(args.submissions, earlier)
            return 0

    state, manifest = load_artifact(ctx.weights_dir, PARENT, ctx.packed.train_fingerprint)
    spec = manifest["model"]
    model = model_from_spec(spec)
    model.load_state_dict(state)
    model.to(ctx.device).eval()

    test = ctx.packed.test_index
    if len(test) == 0:
        raise UserError(f"no test chips found under {ctx.args.data}: nothing to predict")
    labels = test["class_id"].to_numpy()
    dataset = ChipDataset(
        ctx.packed.test_sar, test["sar_row"].to_numpy(), np.maximum(labels, 0),
        norm=(spec["norm"]["mean"], spec["norm"]["std"]), augment=None, seed=ctx.seed,
    )
    ctx.console.print(f"{STAGE}: {len(dataset)} test chips, {len(cfg['tta']['views']) * len(cfg['tta']['scales'])} TTA views")
    start = time.perf_counter()
    class_scores, logits, embeddings = predict(model, dataset, cfg, ctx.device)
    predict_seconds = time.perf_counter() - start
    probs = softmax(class_scores)  # the TTA-averaged probabilities when infer.tta.average is probs

    fit_start, fitted_on = time.perf_counter(), 0
    if detector.needs_fit:  # fitted once on the training split, with the test chips' TTA averaging
        train_rows, _ = train_val_rows(ctx, "sar")
        ctx.console.print(f"{STAGE}: fitting the {detector.describe()} OOD detector on {len(train_rows)} training chips")
        fit_on_split(
            detector, model, chip_dataset(ctx, "sar", train_rows, augment=False),
            ctx.packed.train_index["class_id"].to_numpy()[train_rows], cfg, ctx.device,
        )
        fitted_on = len(train_rows)
    fit_seconds = time.perf_counter() - fit_start
    score = detector.score(logits=logits, embeddings=embeddings)

    validation: dict = {}
    if voting_settings.enabled and voting_settings.needs_validation:  # tau, OOD floor, k chosen on validation
        _, val_rows = train_val_rows(ctx, "sar")
        v_scores, v_logits, v_emb = predict(model, chip_dataset(ctx, "sar", val_rows, augment=False), cfg, ctx.device)
        validation = {"val_embeddings": v_emb, "val_probs": softmax(v_scores),
                      "val_labels": ctx.packed.train_index["class_id"].to_numpy()[val_rows],
                      "val_scores": detector.score(logits=v_logits, embeddings=v_emb)}
    plan = plan_voting(voting_settings, score, ctx.num_classes, ctx.seed, **validation)
    if plan.vote:
        voting = cluster_vote(
            embeddings, probs, plan.k, plan.tau, voting_settings.rho,
            niter=voting_settings.niter, seed=ctx.seed, min_voters=voting_settings.min_voters,
            min_voter_share=voting_settings.min_voter_share, top_k=voting_settings.top_k, eligible=plan.eligible,
        )
        ctx.console.print(f"{STAGE}: voting with tau {plan.tau:.3f}, k {voting.k}, {int(plan.eligible.sum())} of "
                          f"{len(plan.eligible)} chips above the OOD floor: {int(voting.changed.sum())} labels changed")
    else:
        voting = no_vote(probs)
        if voting_settings.enabled:
            ctx.console.print(f"{STAGE}: no voting: {plan.reason}")
    energy = ood_score(logits, "energy", ood["temperature"])

    ids = test["image_id"].to_numpy().astype(np.int64)
    results = pd.DataFrame({"image_id": ids, "class_id": voting.labels.astype(np.int64), "score": score})
    predictions = pd.DataFrame({
        "image_id": ids, "path": test["path"].to_numpy(),
        "label_before": probs.argmax(axis=1), "label_after": voting.labels, "changed": voting.changed,
        "cluster": voting.cluster, "confidence": probs.max(axis=1), "score": score, "energy": energy,
        **{f"logit_{c}": logits[:, c] for c in range(logits.shape[1])},
        **{f"prob_{c}": probs[:, c] for c in range(probs.shape[1])},
    })
    summary = {
        "inputs": inputs, "model": spec, "dataset": {"root": str(Path(args.data).resolve()), "kind": ctx.layout.kind,
        "classes": list(ctx.layout.classes.names)}, "num_test": int(len(ids)),
        "ood_method": detector.name, "ood": {
            "method": ood["method"], "detector": detector.name, "params": detector.params(),
            "state_file": DETECTOR_FILE, "fitted_on_chips": fitted_on,
            "fit_seconds": fit_seconds,
            "choice": None if choice is None else {k: choice.get(k) for k in ("method", "params", "mean_auroc", "time")},
        },
        "votes_changed": int(voting.changed.sum()),
        "voting": {"applied": bool(plan.vote), "reason": plan.reason, "tau": None if not math.isfinite(plan.tau) else plan.tau,
                   "k": int(voting.k), "ood_floor": plan.floor, "eligible": int(plan.eligible.sum()),
                   "validation": None if plan.validation is None else plan.validation.to_dict(orient="records")},
        "clusters": int(voting.k),
        "views": len(cfg["tta"]["views"]) * len(cfg["tta"]["scales"]),
        "predict_seconds": predict_seconds, "images_per_s": len(ids) / max(predict_seconds, 1e-9),
        "code_version": code_version(),
    }
    if not distributed.is_main_process():
        distributed.cleanup()
        return 0
    run_dir = new_run_dir(args.submissions, args.run)
    save_detector(detector, run_dir / DETECTOR_FILE)  # results.csv, written last, marks a complete folder
    known = labels >= -1
    if known.all():
        truth = pd.DataFrame({"image_id": ids, "class_id": labels})
        report = score_submission(results, truth, num_classes=ctx.num_classes)
        summary["score"] = {k: report[k] for k in ("accuracy", "auroc", "competition_score", "balanced_accuracy")}
    write_submission(run_dir, results, predictions, summary, expected_ids=ids, num_classes=ctx.num_classes)
    ctx.console.print(f"[green]{STAGE}[/]: wrote {run_dir / 'results.csv'} ({len(ids)} rows, {int(voting.changed.sum())} labels changed by cluster voting)")
    mark_latest(args.submissions, run_dir)
    if known.all():
        atomic_write_text(run_dir / "score.json", report_json(report))
        print_score_report(report, list(ctx.layout.classes.names), ctx.console)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
