"""Build `submissions/<run>/report.html` (+ `plots/*.png`) from what a run left, and compare two runs.

Inputs, all read-only: the run folder (`summary.json`, `predictions.csv`, `score.json` and `truth.csv`
when the test labels were known, `ablation.csv` / `robustness.csv` when present), the artifacts of the
weights folder the run used (manifests and `<name>.metrics.csv`; each is checked against the sha256
its child recorded, so curves of a model retrained since the run are not passed off as this run's)
and the test chips (thumbnails, from the paths in `predictions.csv`). Outputs: `report.html`, written
atomically, and the same plots as PNGs in `plots/`; nothing else in the folder is touched.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.artifacts import ArtifactPaths, atomic_write, atomic_write_text, code_version
from pipeline.data.testset import read_csv_table
from pipeline.config import ReportConfig
from pipeline.errors import UserError
from pipeline.metrics import auroc, classification_metrics, confusion_matrix
from pipeline.report import plots
from pipeline.report.html import Section, figures, img, note, page, paragraph, pre_json, table
from pipeline.submission import SCORE_FILE

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
TRUTH_FILE = "truth.csv"  # image_id,class_id of the test chips (-1 = OOD), written by infer when known
ABLATION_FILE = "ablation.csv"
ROBUSTNESS_FILE = "robustness.csv"
ARTIFACT_CHAIN = ("eo_teacher", "sar_student", "sar_final")  # parent first; sar_final is infer's parent
THUMBNAIL_PX = 64


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunData:
    """What one submission folder holds, aligned per test chip (rows of predictions.csv)."""

    run_dir: Path
    summary: dict[str, Any]
    predictions: pd.DataFrame
    score: dict[str, Any] | None  # score.json
    truth: np.ndarray | None  # per chip: class id, -1 = OOD; None when the labels are not known
    class_names: list[str]

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_in(self) -> np.ndarray | None:
        """Per chip: in-distribution (True) or OOD (False); None without truth."""
        return None if self.truth is None else self.truth >= 0

    def class_name(self, class_id: int) -> str:
        if class_id < 0:
            return "OOD"
        return self.class_names[class_id] if class_id < self.num_classes else str(class_id)

    def classification(self) -> dict[str, Any] | None:
        """Confusion matrix, per-class recall and support of the submitted labels (in-distribution chips).

        From the per-chip truth when it is known, else from score.json (a run scored with stages.score).
        """
        if self.truth is not None and self.is_in.any():
            keep = self.is_in
            y_true, y_pred = self.truth[keep], self.predictions["label_after"].to_numpy(np.int64)[keep]
            metrics = classification_metrics(y_true, y_pred, self.num_classes)
            return {
                "confusion_matrix": confusion_matrix(y_true, y_pred, self.num_classes),
                "per_class_recall": metrics["per_class_recall"],
                "per_class_support": np.bincount(y_true, minlength=self.num_classes).tolist(),
            }
        if self.score and self.score.get("confusion_matrix") is not None:
            matrix = np.asarray(self.score["confusion_matrix"], dtype=np.int64)
            if matrix.shape == (self.num_classes, self.num_classes):
                return {
                    "confusion_matrix": matrix,
                    "per_class_recall": self.score["per_class_recall"],
                    "per_class_support": self.score["per_class_support"],
                }
        return None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except json.JSONDecodeError:
        raise UserError(f"{what} {path} is damaged (not JSON): rerun python -m stages.infer") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is damaged (not a JSON object): rerun python -m stages.infer")
    return value


def load_run(run_dir: str | Path) -> RunData:
    """Read a submission folder; UserError (one line) when it is not a complete one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"submission folder {run_dir} not found: give a folder written by python -m stages.infer")
    for name in ("results.csv", "summary.json", "predictions.csv"):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir} is not a complete submission folder (no {name}): give a folder written by python -m stages.infer"
            )
    summary = read_json_object(run_dir / "summary.json", "summary")
    predictions = read_csv_table(run_dir / "predictions.csv", "predictions")
    needed = {"image_id", "label_before", "label_after", "changed", "cluster", "confidence", "score"}
    missing = sorted(needed - set(predictions.columns))
    if missing:
        raise UserError(f"predictions file {run_dir / 'predictions.csv'} lacks column(s) {', '.join(missing)}: rerun python -m stages.infer")
    score = read_json_object(run_dir / SCORE_FILE, "score") if (run_dir / SCORE_FILE).is_file() else None
    classes = (summary.get("dataset") or {}).get("classes")
    if not classes:
        width = sum(c.startswith("prob_") for c in predictions.columns)
        classes = [str(i) for i in range(width)]
    truth = None
    if (run_dir / TRUTH_FILE).is_file():
        table_ = read_csv_table(run_dir / TRUTH_FILE, "truth")
        try:  # a truth table that does not cover every chip, or is damaged, counts as unknown labels
            lookup = dict(zip(table_["image_id"].astype(np.int64), table_["class_id"].astype(np.int64)))
            values = [lookup.get(int(i)) for i in predictions["image_id"]]
            if all(v is not None and -1 <= v < len(classes) for v in values):
                truth = np.asarray(values, dtype=np.int64)
        except (KeyError, ValueError, TypeError):
            truth = None
    return RunData(run_dir, summary, predictions, score, truth, [str(c) for c in classes])


# ----------------------------------------------------------------------------- training artifacts of the run


@dataclass
class ArtifactRecord:
    """One training artifact in the run's weights folder and whether it is the one this run used."""

    name: str
    status: str  # "used by this run" | "changed since this run" | "missing"
    manifest: dict[str, Any] | None
    metrics_csv: Path | None

    @property
    def is_this_runs(self) -> bool:
        return self.status == "used by this run"


def artifact_records(weights_dir: Path, run: RunData) -> list[ArtifactRecord]:
    """The training artifacts of the run, parent first: sar_final, then each parent its manifest names.

    Each is checked against the sha256 its child recorded (sar_final: the run's summary); the walk stops
    at an artifact that is missing or changed since the run, since its parents can no longer be vouched for.
    """
    expected = ((run.summary.get("inputs") or {}).get("parents") or {}).get("sar_final")
    records: list[ArtifactRecord] = []
    for position in range(len(ARTIFACT_CHAIN) - 1, -1, -1):
        if expected is None:
            break
        name = ARTIFACT_CHAIN[position]
        paths = ArtifactPaths.of(weights_dir, name)
        try:
            manifest = json.loads(paths.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            records.append(ArtifactRecord(name, "missing", None, None))
            break
        same = manifest.get("weights_sha256") == expected
        metrics = paths.metrics_csv if paths.metrics_csv.is_file() else None
        records.append(ArtifactRecord(name, "used by this run" if same else "changed since this run", manifest, metrics))
        if not same:
            break
        parent = ARTIFACT_CHAIN[position - 1] if position > 0 else None
        expected = (manifest.get("parents") or {}).get(parent) if parent else None
    return list(reversed(records))


# ----------------------------------------------------------------------------- optional tables


def _normalised(column: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(column).strip().lower()).strip("_")


def read_ablation(path: Path) -> pd.DataFrame:
    """An ablation table (variant, seed, metric columns) with column names lower_snake_cased."""
    df = read_csv_table(path, "ablation")
    df.columns = [_normalised(c) for c in df.columns]
    if "variant" not in df.columns or len(df) == 0:
        raise UserError(f"ablation file {path} has no variant column or no rows: expected variant,seed,<metrics>")
    return df


ABLATION_PLOT_METRICS = ("score", "competition_score", "test_score", "val_balanced_accuracy", "val_bal_acc",
                         "test_accuracy", "auroc", "test_auroc")


def summarise_ablation(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Mean and standard error (std/sqrt(n), n seeds) of every numeric column per variant, in first-seen order."""
    metrics = [c for c in df.columns if c not in ("variant", "seed") and pd.to_numeric(df[c], errors="coerce").notna().any()]
    rows = []
    for variant, part in df.groupby("variant", sort=False):
        row: dict[str, Any] = {"variant": str(variant), "seeds": int(part["seed"].nunique()) if "seed" in part else len(part)}
        for metric in metrics:
            values = pd.to_numeric(part[metric], errors="coerce").dropna().to_numpy(np.float64)
            row[metric] = float(values.mean()) if values.size else float("nan")
            row[f"{metric}_se"] = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows), metrics


def read_robustness(path: Path) -> pd.DataFrame:
    """A robustness table: at least eps and accuracy columns (plus artifact, split, attack when present)."""
    df = read_csv_table(path, "robustness")
    df.columns = [_normalised(c) for c in df.columns]
    missing = [c for c in ("eps", "accuracy") if c not in df.columns]
    if missing or len(df) == 0:
        raise UserError(f"robustness file {path} lacks column(s) {', '.join(missing) or '(rows)'}: expected artifact,split,attack,eps,accuracy")
    df["eps"] = pd.to_numeric(df["eps"], errors="coerce")
    df["accuracy"] = pd.to_numeric(df["accuracy"], errors="coerce")
    return df.dropna(subset=["eps", "accuracy"])


def _is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the report


class _Plots:
    """Collects the run's PNGs: each is embedded in the page and written to plots/<name>.png."""

    def __init__(self, dpi: int) -> None:
        self.dpi = dpi
        self.files: dict[str, bytes] = {}

    def make(self, name: str, draw: Callable[..., bytes], *args: Any, caption: str | None = None, **kwargs: Any) -> str:
        png = draw(*args, dpi=self.dpi, **kwargs)
        self.files[f"{name}.png"] = png
        return img(png, alt=name, caption=caption)

    def embed(self, name: str, png: bytes, caption: str | None = None) -> str:
        self.files[f"{name}.png"] = png
        return img(png, alt=name, caption=caption)


def _headline(run: RunData) -> Section:
    section = Section("Summary")
    s = run.summary
    score = run.score or s.get("score")
    if score:
        section.add(table(
            ["competition score", "accuracy (in-distribution)", "AUROC", "balanced accuracy", "macro F1"],
            [[score.get("competition_score"), score.get("accuracy"), score.get("auroc"), score.get("balanced_accuracy"),
              score.get("macro_f1")]],
        ))
        if not isinstance(score.get("auroc"), (int, float)) or not math.isfinite(score.get("auroc") or float("nan")):
            section.add(paragraph("AUROC n/a: no out-of-distribution test chips, so no competition score."))
    else:
        section.add(note("The test labels are not known: the run is not scored and truth-only plots are left out."))
    ood = s.get("ood") or {}
    counts = (run.score or {}).get("counts") or {}
    section.add(table(
        ["test chips", "in-distribution / OOD", "TTA views", "clusters", "labels changed by voting", "OOD detector",
         "predict (s)", "images/s"],
        [[s.get("num_test"), f"{counts.get('in_distribution', '-')} / {counts.get('ood', '-')}" if counts else "-",
          s.get("views"), s.get("clusters"), s.get("votes_changed"), ood.get("detector") or s.get("ood_method"),
          s.get("predict_seconds"), s.get("images_per_s")]],
        digits=2,
    ))
    return section


def _classification_section(run: RunData, figs: _Plots) -> Section:
    section = Section("Classification")
    result = run.classification()
    if result is None:
        return section.add(note("Left out: the test labels are not known (no truth.csv or score.json in the run)."))
    section.add(figures(
        figs.make("confusion_counts", plots.confusion_png, result["confusion_matrix"], run.class_names, normalize=False),
        figs.make("confusion_normalised", plots.confusion_png, result["confusion_matrix"], run.class_names, normalize=True),
    ))
    section.add(figures(figs.make(
        "per_class_recall", plots.recall_png, result["per_class_recall"], result["per_class_support"], run.class_names
    )))
    return section.add(table(
        ["class", "id", "support", "recall"],
        [[name, i, int(n), r] for i, (name, n, r) in enumerate(
            zip(run.class_names, result["per_class_support"], result["per_class_recall"]))],
    ))


def _ood_section(run: RunData, figs: _Plots) -> Section:
    section = Section("Out-of-distribution score")
    score = run.predictions["score"].to_numpy(np.float64)
    method = str((run.summary.get("ood") or {}).get("detector") or run.summary.get("ood_method") or "OOD")
    is_in = run.is_in
    if is_in is None:
        section.add(figures(figs.make("ood_histogram", plots.ood_histogram_png, score, None, method=method)))
        return section.add(paragraph("The test labels are not known: the score distribution alone, no ROC curve."))
    parts = [figs.make("ood_histogram", plots.ood_histogram_png, score, is_in, method=method)]
    if is_in.all() or not is_in.any():
        section.add(figures(*parts))
        return section.add(paragraph("No ROC curve: the test set has only in-distribution chips (AUROC n/a)."))
    parts.append(figs.make("ood_roc", plots.roc_png, is_in, score, caption=f"AUROC {auroc(is_in, score):.4f}"))
    return section.add(figures(*parts))


def _training_section(records: list[ArtifactRecord], weights_dir: Path | None, figs: _Plots) -> Section:
    section = Section("Training curves")
    if weights_dir is None:
        return section.add(note("The weights folder of this run is not recorded: pass --weights to show its training curves."))
    if not records:
        return section.add(note(f"No artifacts of this run in {weights_dir}."))
    for record in records:
        if not record.is_this_runs:
            section.add(note(f"{record.name}: {record.status} ({weights_dir}); its curves are not this run's and are left out."))
            continue
        if record.metrics_csv is None:
            section.add(note(f"{record.name}: no per-epoch metrics ({record.name}.metrics.csv) beside the artifact."))
            continue
        try:
            history = read_csv_table(record.metrics_csv, "metrics")
            section.add(figures(figs.make(f"training_{record.name}", plots.training_curves_png, history, record.name)))
        except (UserError, ValueError) as err:
            section.add(note(f"{record.name}: training curves left out ({err})."))
    return section


def vote_outcomes(run: RunData) -> pd.DataFrame:
    """Per cluster: labels changed by voting, split by outcome (see plots.VOTE_OUTCOMES)."""
    p = run.predictions
    changed = p["changed"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    before, after = p["label_before"].to_numpy(np.int64), p["label_after"].to_numpy(np.int64)
    cluster = p["cluster"].to_numpy(np.int64)
    if run.truth is None:
        outcome = np.where(changed, "unknown", "")
    else:
        t = run.truth
        outcome = np.select(
            [~changed, t < 0, before == t, after == t], ["", "ood", "right_to_wrong", "wrong_to_right"], "wrong_to_wrong"
        )
    frame = pd.DataFrame({"cluster": cluster, "outcome": outcome})
    frame = frame[(frame["cluster"] >= 0) & (frame["outcome"] != "")]
    counts = frame.groupby(["cluster", "outcome"]).size().unstack(fill_value=0)
    all_clusters = pd.DataFrame({"cluster": np.unique(cluster[cluster >= 0])})
    return all_clusters.merge(counts.reset_index(), on="cluster", how="left").fillna(0)


def _voting_section(run: RunData, figs: _Plots) -> Section:
    section = Section("Cluster voting")
    if not (run.summary.get("clusters") or 0) or not (run.predictions["cluster"] >= 0).any():
        reason = (run.summary.get("voting") or {}).get("reason") or "infer.cluster.enabled is false"
        return section.add(paragraph(f"Cluster voting did not run ({reason})."))
    per_cluster = vote_outcomes(run)
    section.add(figures(figs.make("voting", plots.voting_png, per_cluster)))
    totals = {key: int(per_cluster[key].sum()) if key in per_cluster else 0 for key, _, _ in plots.VOTE_OUTCOMES}
    changed = sum(totals.values())
    if run.truth is not None:
        n_in = int(run.is_in.sum())
        net = (totals["wrong_to_right"] - totals["right_to_wrong"]) / max(n_in, 1)
        section.add(table(
            ["clusters", "labels changed", "wrong → right", "right → wrong", "wrong → wrong", "OOD chips", "accuracy change"],
            [[int(run.summary.get("clusters") or 0), changed, totals["wrong_to_right"], totals["right_to_wrong"],
              totals["wrong_to_wrong"], totals["ood"], f"{net:+.4f}"]],
        ))
    else:
        section.add(table(["clusters", "labels changed"], [[int(run.summary.get("clusters") or 0), changed]]))
    return section


def _thumbnail(path: Any) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(str(path)) as image:
            image = image.convert("L")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            return np.asarray(image)
    except (OSError, ValueError):
        return None


def _gallery(run: RunData, rows: pd.DataFrame, caption: Callable[[pd.Series], str], name: str, title: str,
             figs: _Plots) -> str:
    images, captions = [], []
    for _, row in rows.iterrows():
        thumb = _thumbnail(row.get("path", ""))
        if thumb is not None:
            images.append(thumb)
            captions.append(caption(row))
    if not images:
        return note(f"{title}: the test chips could not be read (moved or deleted since the run).")
    return figs.make(name, plots.gallery_png, images, captions, title)


def _gallery_section(run: RunData, figs: _Plots, size: int) -> Section:
    section = Section("Gallery")
    if size == 0:
        return section
    p = run.predictions.copy()
    if "path" not in p.columns:
        return section.add(note("No image paths in predictions.csv: no thumbnails."))
    truth = run.truth
    if truth is not None:
        p["truth"] = truth
        wrong = p[(p["truth"] >= 0) & (p["label_after"] != p["truth"])].sort_values("confidence", ascending=False)
        if len(wrong):
            section.add(_gallery(
                run, wrong.head(size),
                lambda r: f"{r['image_id']}\ntrue {run.class_name(int(r['truth']))}\npred {run.class_name(int(r['label_after']))}\n"
                          f"conf {r['confidence']:.2f}",
                "gallery_confident_mistakes", "Most confident mistakes (in-distribution chips)", figs,
            ))
        else:
            section.add(paragraph("No mistakes among the in-distribution test chips."))
    ood_like = p.sort_values("score", ascending=True).head(size)

    def ood_caption(r: pd.Series) -> str:
        text = f"{r['image_id']}\nscore {r['score']:.3g}\npred {run.class_name(int(r['label_after']))}"
        return text + (f"\ntrue {run.class_name(int(r['truth']))}" if truth is not None else "")

    section.add(_gallery(run, ood_like, ood_caption, "gallery_most_ood", "Most out-of-distribution-looking chips (lowest score)", figs))
    return section


def _ablation_section(path: Path | None, explicit: bool, figs: _Plots) -> Section:
    section = Section("Ablation")
    if path is None:
        return section
    try:
        df = read_ablation(path)
    except UserError as err:
        if explicit:
            raise
        return section.add(note(f"ablation table left out: {err}"))
    summary, metrics = summarise_ablation(df)
    header = ["variant", "seeds", *[m.replace("_", " ") for m in metrics]]
    rows = [[r["variant"], r["seeds"], *[
        "-" if not math.isfinite(r[m]) else (f"{r[m]:.4f}" + ("" if not math.isfinite(r[f"{m}_se"]) else f" ± {r[f'{m}_se']:.4f}"))
        for m in metrics]] for _, r in summary.iterrows()]
    section.add(paragraph(f"From {path} (mean ± standard error over seeds)."), table(header, rows))
    metric = next((m for m in ABLATION_PLOT_METRICS if m in metrics), next((m for m in metrics if "second" not in m), None))
    if metric is not None:
        section.add(figures(figs.make("ablation", plots.ablation_png, summary, metric)))
    return section


def _robustness_section(path: Path | None, explicit: bool, weights_dir: Path | None, figs: _Plots) -> Section:
    section = Section("Robustness")
    candidates: list[tuple[Path, bool]] = [(path, explicit)] if path is not None else []
    if weights_dir is not None and weights_dir.is_dir():
        candidates += [(p, False) for p in sorted(weights_dir.glob("*robustness*.csv")) if p != path]
        for i, png in enumerate(sorted(weights_dir.glob("*robustness*.png"))):
            data = png.read_bytes()
            if _is_png(data):
                section.add(figures(figs.embed(f"robustness_image_{i}", data, caption=str(png))))
    for i, (csv_path, must) in enumerate(candidates):
        try:
            df = read_robustness(csv_path)
        except UserError as err:
            if must:
                raise
            section.add(note(f"robustness table left out: {err}"))
            continue
        section.add(figures(figs.make(f"robustness_{i}", plots.robustness_png, df, caption=str(csv_path))))
    return section


def _provenance_section(run: RunData, records: list[ArtifactRecord], weights_dir: Path | None) -> Section:
    section = Section("Provenance")
    s = run.summary
    inputs = s.get("inputs") or {}
    dataset = s.get("dataset") or {}
    section.add(table(
        ["item", "value"],
        [["code version (infer)", s.get("code_version", "-")], ["code version (report)", code_version()],
         ["dataset", f"{dataset.get('root', '-')} ({dataset.get('kind', '-')})"],
         ["training data fingerprint", inputs.get("train_fingerprint", "-")],
         ["test data fingerprint", inputs.get("test_fingerprint", "-")],
         ["weights folder", str(weights_dir) if weights_dir is not None else "-"],
         ["model", (s.get("model") or {}).get("timm_name", "-")]],
    ))
    rows = []
    for record in records:
        m = record.manifest or {}
        rows.append([record.name, record.status, m.get("weights_sha256", "-"), m.get("dataset_fingerprint", "-"),
                     m.get("code_version", "-"), m.get("time", "-"), (m.get("metrics") or {}).get("balanced_accuracy")])
    if rows:
        section.add("<h3>Artifacts</h3>", table(
            ["artifact", "status", "weights sha256", "dataset fingerprint", "code version", "time", "val balanced acc"], rows
        ))
    section.add("<h3>OOD detector</h3>", pre_json(s.get("ood")))
    section.add("<h3>Resolved config (infer)</h3>", pre_json(inputs.get("config")))
    return section


def _weights_dir(run: RunData, weights: Path | None) -> Path | None:
    if weights is not None:
        if not Path(weights).is_dir():
            raise UserError(f"--weights {weights}: no such folder")
        return Path(weights)
    recorded = run.summary.get("weights")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _write_plots(run_dir: Path, files: dict[str, bytes]) -> None:
    folder = run_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    for name, png in files.items():
        atomic_write(folder / name, png)
    for stale in folder.glob("*.png"):  # a plot of an earlier build that this one did not draw
        if stale.name not in files:
            stale.unlink(missing_ok=True)


def build_report(
    run_dir: str | Path,
    settings: ReportConfig = ReportConfig(),
    weights: Path | None = None,
    ablation: Path | None = None,
    robustness: Path | None = None,
) -> Path:
    """Write `<run_dir>/report.html` and `<run_dir>/plots/*.png`; returns the report's path."""
    run = load_run(run_dir)
    for flag, path in (("--ablation", ablation), ("--robustness", robustness)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    weights_dir = _weights_dir(run, weights)
    records = artifact_records(weights_dir, run) if weights_dir is not None else []
    figs = _Plots(settings.dpi)
    ablation_path = Path(ablation) if ablation else (run.run_dir / ABLATION_FILE if (run.run_dir / ABLATION_FILE).is_file() else None)
    robustness_path = Path(robustness) if robustness else (run.run_dir / ROBUSTNESS_FILE if (run.run_dir / ROBUSTNESS_FILE).is_file() else None)
    sections = [
        _headline(run),
        _classification_section(run, figs),
        _ood_section(run, figs),
        _training_section(records, weights_dir, figs),
        _voting_section(run, figs),
        _gallery_section(run, figs, settings.gallery_size),
        _ablation_section(ablation_path, ablation is not None, figs),
        _robustness_section(robustness_path, robustness is not None, weights_dir, figs),
        _provenance_section(run, records, weights_dir),
    ]
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    text = page(f"Run report: {run.name}", f"{run.run_dir.resolve()} · generated {stamp}", sections)
    path = run.run_dir / REPORT_FILE
    try:
        _write_plots(run.run_dir, figs.files)
        atomic_write_text(path, text)
    except OSError as err:
        raise UserError(f"cannot write the report into {run.run_dir}: {err.strerror or err}") from None
    return path


def write_report_safely(run_dir: Path, settings: ReportConfig, console: Any) -> Path | None:
    """infer's last step: build the report; any failure is one warning line, never a failed submission.

    The submission (results.csv, already written and validated) is what counts; a report can always be
    rebuilt with `python -m stages.report --submission <run>`, so a plotting error must not turn a
    finished run into a failed one (run_all would stop and say the stage failed).
    """
    if not settings.enabled:
        return None
    start = time.perf_counter()
    try:
        path = build_report(run_dir, settings)
    except Exception as err:  # noqa: BLE001 (any plotting/reading error; the submission stands)
        first = (str(err).strip().splitlines() or [""])[0]
        print(
            f"warning: report not written ({type(err).__name__}: {first}); the submission is complete. "
            f"Rebuild it with: python -m stages.report --submission {run_dir}",
            file=sys.stderr, flush=True,
        )
        return None
    console.print(f"report: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)
    return path


# ----------------------------------------------------------------------------- comparing two runs


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def _run_scores(run: RunData) -> dict[str, Any]:
    score = run.score or run.summary.get("score") or {}
    return {
        "competition score": score.get("competition_score"), "accuracy (in-distribution)": score.get("accuracy"),
        "AUROC": score.get("auroc"), "balanced accuracy": score.get("balanced_accuracy"), "macro F1": score.get("macro_f1"),
        "test chips": run.summary.get("num_test"), "labels changed by voting": run.summary.get("votes_changed"),
        "predict seconds": run.summary.get("predict_seconds"),
    }


def compare_runs(run_a: str | Path, run_b: str | Path, out: Path | None = None, settings: ReportConfig = ReportConfig()) -> Path:
    """Write a side-by-side HTML of two runs (scores, per-class recall difference, OOD histograms overlaid).

    Default path: `compare-<A>-vs-<B>.html` in A's submissions folder. Returns the path written.
    """
    a, b = load_run(run_a), load_run(run_b)
    labels = (a.name, b.name) if a.name != b.name else (f"A:{a.name}", f"B:{b.name}")
    out = Path(out) if out is not None else a.run_dir.parent / f"compare-{a.name}-vs-{b.name}.html"
    if out.suffix.lower() != ".html":
        raise UserError(f"--out {out}: the comparison is an HTML page, give a path ending in .html")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} not found")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file path ending in .html")
    figs = _Plots(settings.dpi)

    scores = Section("Scores")
    sa, sb = _run_scores(a), _run_scores(b)
    rows = []
    for key in sa:
        va, vb = sa[key], sb[key]
        both = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (va, vb))
        rows.append([key, va, vb, (vb - va) if both else None])
    scores.add(table(["", labels[0], labels[1], f"{labels[1]} − {labels[0]}"], rows))
    info = []
    for key, get in (("OOD detector", lambda r: (r.summary.get("ood") or {}).get("detector") or r.summary.get("ood_method")),
                     ("model", lambda r: (r.summary.get("model") or {}).get("timm_name")),
                     ("code version", lambda r: r.summary.get("code_version")),
                     ("test data fingerprint", lambda r: (r.summary.get("inputs") or {}).get("test_fingerprint")),
                     ("sar_final sha256", lambda r: (r.summary.get("inputs") or {}).get("parents", {}).get("sar_final"))):
        info.append([key, get(a) or "-", get(b) or "-"])
    scores.add(table(["", labels[0], labels[1]], info))
    if info[3][1] != info[3][2]:
        scores.add(note("The two runs predicted different test sets: their scores are not directly comparable."))

    recall = Section("Per-class recall")
    ca, cb = a.classification(), b.classification()
    if ca is None or cb is None:
        recall.add(note("Left out: the test labels of " + " and ".join(r.name for r, c in ((a, ca), (b, cb)) if c is None) + " are not known."))
    elif a.class_names != b.class_names:
        recall.add(note("Left out: the two runs have different class tables."))
    else:
        recall.add(figures(figs.make("recall_difference", plots.recall_difference_png, ca["per_class_recall"],
                                     cb["per_class_recall"], a.class_names, labels)))
        recall.add(table(
            ["class", f"recall {labels[0]}", f"recall {labels[1]}", "difference", "support"],
            [[name, ra, rb, (rb - ra) if ra is not None and rb is not None else None, n]
             for name, ra, rb, n in zip(a.class_names, ca["per_class_recall"], cb["per_class_recall"], ca["per_class_support"])],
        ))

    ood = Section("OOD score")
    ood.add(figures(figs.make("ood_overlay", plots.ood_overlay_png, [
        (labels[0], a.predictions["score"].to_numpy(np.float64), a.is_in),
        (labels[1], b.predictions["score"].to_numpy(np.float64), b.is_in),
    ])))

    config = Section("Config differences")
    fa = _flatten((a.summary.get("inputs") or {}).get("config") or {})
    fb = _flatten((b.summary.get("inputs") or {}).get("config") or {})
    diff = [[k, json.dumps(fa.get(k)), json.dumps(fb.get(k))] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    config.add(table(["key", labels[0], labels[1]], diff) if diff else paragraph("Same resolved config."))

    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    text = page(f"Runs compared: {labels[0]} vs {labels[1]}",
                f"{a.run_dir.resolve()} vs {b.run_dir.resolve()} · generated {stamp}", [scores, recall, ood, config])
    try:
        atomic_write_text(out, text)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    return out


__all__ = [
    "ABLATION_FILE", "PLOTS_DIR", "REPORT_FILE", "ROBUSTNESS_FILE", "TRUTH_FILE", "ReportConfig", "RunData",
    "build_report", "compare_runs", "load_run", "write_report_safely",
]
