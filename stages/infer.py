"""Stage 4: predict the SAR test chips and write a submission folder.

Test-time augmentation (flips, 90-degree rotations, input scales) averaged in one batched forward per
batch; faiss k-means on the test embeddings with winner-take-all label correction inside confident,
pure clusters; an OOD score per chip (energy by default, higher = more in-distribution). Writes
submissions/<run>/{results.csv, predictions.csv, summary.json} and, when the test labels are known
(synthetic test_truth.csv, labelled generic test split), scores itself into score.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import distributed
from pipeline.artifacts import atomic_write_text, code_version, load_artifact
from pipeline.cluster import check_voting_settings, cluster_vote, no_vote
from pipeline.data.datasets import ChipDataset
from pipeline.errors import UserError, exit_on_user_error
from pipeline.models import model_from_spec
from pipeline.ood import ood_score
from pipeline.stage import REPO_ROOT, build_parser, holds_weights_lock, parent_digest, prepare_stage
from pipeline.submission import new_run_dir, print_score_report, report_json, score_submission, write_submission
from pipeline.tta import predict_tta

STAGE = "infer"
PARENT = "sar_final"
DEFAULT_SUBMISSIONS = REPO_ROOT / "submissions"


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


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: ChipDataset, cfg: dict, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTA class scores, raw logits and embeddings of every test chip, streamed in batches (sharded
    across ranks, gathered). Class scores decide labels (mean logits or log mean probabilities, as
    `infer.tta.average` says); the mean raw logits are what OOD scores are computed from."""
    sampler = distributed.ShardSampler(len(dataset)) if distributed.is_distributed() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg["batch_size"]), sampler=sampler, shuffle=False)
    tta = cfg["tta"]
    scores, logits, embs, index = [], [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = predict_tta(model, x, list(tta["views"]), [float(s) for s in tta["scales"]], str(tta["average"]))
        scores.append(out.class_scores.float().cpu())
        logits.append(out.logits.float().cpu())
        embs.append(out.embeddings.float().cpu())
        index.append(batch["index"])
    scores_np = torch.cat(scores).numpy().astype(np.float64)
    logits_np = torch.cat(logits).numpy().astype(np.float64)
    embs_np = torch.cat(embs).numpy().astype(np.float32)
    index_np = torch.cat(index).numpy().astype(np.int64)
    if distributed.is_distributed():
        scores_np, logits_np, embs_np, index_np = distributed.all_gather_arrays(scores_np, logits_np, embs_np, index_np)
    order = np.argsort(index_np, kind="stable")
    return scores_np[order], logits_np[order], embs_np[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(STAGE, __doc__, training=False)
    parser.add_argument("--submissions", type=Path, default=DEFAULT_SUBMISSIONS, help="folder of submission runs")
    parser.add_argument("--run", default=None, help="name of the new submission folder (default: a timestamp); never overwritten")
    args = parser.parse_args(argv)
    ctx = prepare_stage(STAGE, args)
    cfg = ctx.stage_cfg
    vote_cfg = cfg["cluster"]
    if vote_cfg["enabled"]:  # a bad setting stops here, not after the whole test set is predicted
        check_voting_settings(
            vote_cfg["tau"], vote_cfg["rho"], vote_cfg["min_voters"], vote_cfg["min_voter_share"], vote_cfg["top_k"]
        )

    parents = {PARENT: parent_digest(ctx, PARENT)}
    inputs = {
        "config": ctx.recorded_config, "train_fingerprint": ctx.packed.train_fingerprint,
        "test_fingerprint": ctx.packed.test_fingerprint, "parents": parents,
    }
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

    if vote_cfg["enabled"]:
        voting = cluster_vote(
            embeddings, probs, vote_cfg["k"], vote_cfg["tau"], vote_cfg["rho"],
            niter=vote_cfg["niter"], seed=ctx.seed, min_voters=vote_cfg["min_voters"],
            min_voter_share=vote_cfg["min_voter_share"], top_k=vote_cfg["top_k"],
        )
    else:
        voting = no_vote(probs)
    ood = cfg["ood"]
    score = ood_score(logits, ood["method"], ood["temperature"])
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
        "ood_method": ood["method"], "votes_changed": int(voting.changed.sum()),
        "clusters": int(voting.k),
        "views": len(cfg["tta"]["views"]) * len(cfg["tta"]["scales"]),
        "predict_seconds": predict_seconds, "images_per_s": len(ids) / max(predict_seconds, 1e-9),
        "code_version": code_version(),
    }
    if not distributed.is_main_process():
        distributed.cleanup()
        return 0
    run_dir = new_run_dir(args.submissions, args.run)
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
