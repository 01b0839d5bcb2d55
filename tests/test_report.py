"""The run report: plot functions on small arrays, report.html of tiny runs (with and without truth), --compare."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data.synth import generate
from pipeline.errors import UserError
from pipeline.config import load_config, validate_config
from pipeline.report import ReportConfig, RunData, compare_runs, load_run, plots
from pipeline.report.build import summarise_ablation, vote_outcomes
from stages import distill_sar, finetune_head, infer, pretrain_eo
from stages import report as report_stage

NAMES = ["sedan", "SUV", "pickup_truck"]
FAST = ("--set", "pretrain_eo.steps_per_epoch=2", "--set", "distill_sar.steps_per_epoch=2")


def decode(png: bytes) -> np.ndarray:
    """A PNG as an RGB array; fails unless it is a PNG whose pixels are not all one colour."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.size and (pixels != pixels.reshape(-1, 3)[0]).any(), "a blank image"
    return pixels


# ----------------------------------------------------------------------------- plot functions (fast)


def test_confusion_and_recall_plots():
    matrix = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    for normalize in (False, True):
        decode(plots.confusion_png(matrix, NAMES, normalize=normalize, dpi=50))
    decode(plots.recall_png([5 / 6, 0.6, None], [6, 5, 0], NAMES, dpi=50))
    with pytest.raises(ValueError):
        plots.confusion_png(matrix, NAMES[:2], normalize=False)


def test_ood_plots_with_and_without_truth():
    rng = np.random.default_rng(0)
    score = np.concatenate([rng.normal(2, 1, 40), rng.normal(0, 1, 20)])
    is_in = np.arange(60) < 40
    decode(plots.ood_histogram_png(score, is_in, method="energy", dpi=50))
    decode(plots.ood_histogram_png(score, None, dpi=50))
    decode(plots.roc_png(is_in, score, dpi=50))
    decode(plots.ood_histogram_png(np.full(5, 3.0), None, dpi=50))  # one value: bins still span something
    with pytest.raises(ValueError, match="both"):
        plots.roc_png(np.ones(5, bool), np.arange(5.0))
    decode(plots.ood_overlay_png([("a", score, is_in), ("b", score + 1, None)], dpi=50))


def test_training_curves_from_a_metrics_table():
    history = pd.DataFrame({
        "epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2], "train_kd": [0.5, 0.4, 0.3], "val_loss": [2.1, 1.7, 1.6],
        "val_accuracy": [0.3, 0.5, 0.6], "val_balanced_accuracy": [0.25, 0.45, 0.55], "val_balanced_accuracy_se": [0.05, 0.05, 0.04],
    })
    decode(plots.training_curves_png(history, "sar_student", dpi=50))
    decode(plots.training_curves_png(history.head(1), "sar_final", dpi=50))  # one epoch still draws
    with pytest.raises(ValueError):
        plots.training_curves_png(history.iloc[0:0], "empty")


def test_voting_gallery_ablation_robustness_and_difference_plots():
    per_cluster = pd.DataFrame({"cluster": [0, 1, 2], "wrong_to_right": [2, 0, 0], "right_to_wrong": [0, 1, 0]})
    decode(plots.voting_png(per_cluster, dpi=50))
    decode(plots.voting_png(pd.DataFrame({"cluster": [0]}), dpi=50))  # nothing changed: says so
    chips = [np.random.default_rng(i).integers(0, 256, (20, 20)).astype(np.uint8) for i in range(3)]
    decode(plots.gallery_png(chips, ["a", "b", "c"], "title", dpi=50))
    df = pd.DataFrame({"variant": ["base", "base", "no_kd", "no_kd"], "seed": [0, 1, 0, 1], "score": [0.8, 0.82, 0.7, 0.74],
                       "seconds": [10, 11, 9, 9]})
    summary, metrics = summarise_ablation(df)
    assert metrics == ["score", "seconds"] and summary["variant"].tolist() == ["base", "no_kd"]
    assert summary["score"].tolist() == pytest.approx([0.81, 0.72])
    assert summary["score_se"].tolist() == pytest.approx([0.01, 0.02])  # std(ddof=1)/sqrt(2)
    decode(plots.ablation_png(summary, "score", dpi=50))
    robust = pd.DataFrame({"artifact": ["sar_final"] * 4, "split": ["val"] * 4, "attack": ["fgsm", "fgsm", "pgd", "pgd"],
                           "eps": [0.0, 0.03, 0.0, 0.03], "accuracy": [0.9, 0.5, 0.9, 0.3]})
    decode(plots.robustness_png(robust, dpi=50))
    decode(plots.recall_difference_png([0.5, 0.6, None], [0.7, 0.4, None], NAMES, ("a", "b"), dpi=50))


def test_vote_outcomes_count_each_changed_label_once_by_its_effect():
    truth = np.array([0, 0, 1, 1, 2, -1, 2])
    predictions = pd.DataFrame({
        "image_id": np.arange(7), "label_before": [1, 0, 1, 0, 0, 0, 2], "label_after": [0, 1, 1, 2, 1, 1, 2],
        "cluster": [0, 0, 1, 1, 1, 2, 2], "confidence": 0.5, "score": 0.0,
    })
    predictions["changed"] = predictions["label_before"] != predictions["label_after"]
    run = RunData(Path("."), {"clusters": 3}, predictions, None, truth, NAMES)
    table = vote_outcomes(run).set_index("cluster")
    assert table.loc[0, "wrong_to_right"] == 1 and table.loc[0, "right_to_wrong"] == 1  # chips 0 and 1
    assert table.loc[1, "wrong_to_wrong"] == 2 and table.loc[1, "right_to_wrong"] == 0  # chips 3 (0->2, true 1) and 4
    assert table.loc[2, "ood"] == 1 and table[["wrong_to_right", "right_to_wrong", "wrong_to_wrong", "ood"]].to_numpy().sum() == 5
    blind = vote_outcomes(RunData(Path("."), {"clusters": 3}, predictions, None, None, NAMES)).set_index("cluster")
    assert blind["unknown"].tolist() == [2, 2, 1]


def test_report_settings_are_checked():
    assert validate_config({}).report == ReportConfig()
    assert validate_config({"report": {"dpi": 72}}).report.dpi == 72
    for section, key in (({"dpi": 5}, "report.dpi"), ({"gallery_size": -1}, "report.gallery_size"),
                         ({"enabled": "yes"}, "report.enabled")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            validate_config({"report": section})
    with pytest.raises(UserError, match="report.colour: no such config key"):
        load_config("quick", ["report.colour=1"])


# ----------------------------------------------------------------------------- tiny runs


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            assert a["src"].startswith("data:image/png;base64,")
            self.images[a["alt"]] = base64.b64decode(a["src"].split(",", 1)[1])
        if tag in ("script", "link") or (tag != "a" and any(k in a and "://" in (a[k] or "") for k in ("src", "href"))):
            self.external.append(tag)


def parse(path: Path) -> dict[str, bytes]:
    """The report's embedded images by alt text, after checking it is self-contained HTML."""
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    parser = _Images()
    parser.feed(text)
    parser.close()
    assert parser.external == [], "the report loads something from outside"
    return parser.images


def argv(root: Path, *extra: str) -> list[str]:
    return ["--data", str(root / "data"), "--profile", "tiny", "--weights", str(root / "weights"),
            "--cache-dir", str(root / "cache"), "--submissions", str(root / "subs"), *FAST, *extra]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny trained chain and two infer runs of it: `voted` (cluster voting on, truth known), `blind` (no truth)."""
    root = tmp_path_factory.mktemp("report")
    generate(root / "data", "tiny", seed=5, workers=1)
    train = [a for a in argv(root) if a != "--submissions" and a != str(root / "subs")]
    assert pretrain_eo.main(train) == 0
    assert distill_sar.main(train) == 0
    assert finetune_head.main(train) == 0
    # the tiny profile votes in clusters; without require_gain the plan votes even where validation shows no gain
    assert infer.main(argv(root, "--run", "voted", "--set", "infer.cluster.require_gain=false")) == 0
    truth = root / "data" / "test_truth.csv"
    shutil.move(truth, root / "truth-aside.csv")  # the labels are not part of the test pack's fingerprint
    try:
        assert infer.main(argv(root, "--run", "blind", "--set", "infer.cluster.enabled=false")) == 0
    finally:
        shutil.move(root / "truth-aside.csv", truth)
    return root


def test_infer_writes_a_self_contained_report(tiny_runs):
    run = tiny_runs / "subs" / "voted"
    images = parse(run / "report.html")
    for name in ("confusion_counts", "confusion_normalised", "per_class_recall", "ood_histogram", "ood_roc",
                 "training_eo_teacher", "training_sar_student", "training_sar_final", "voting",
                 "gallery_confident_mistakes", "gallery_most_ood"):
        assert name in images, name
    for name, png in images.items():
        pixels = decode(png)
        assert (run / "plots" / f"{name}.png").read_bytes() == png  # the same plots as files
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    text = (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((tiny_runs / "weights" / "sar_final.json").read_text())
    for fact in (summary["inputs"]["train_fingerprint"], summary["inputs"]["test_fingerprint"],
                 manifest["weights_sha256"], summary["code_version"], "used by this run"):
        assert fact in text
    assert "sedan" in text and "Resolved config" in text
    assert summary["clusters"] > 0 and load_run(run).truth is not None


def test_report_without_truth_has_no_truth_only_plots(tiny_runs):
    run = tiny_runs / "subs" / "blind"
    assert not (run / "truth.csv").exists() and not (run / "score.json").exists()
    images = parse(run / "report.html")
    assert {"ood_histogram", "training_sar_final", "gallery_most_ood"} <= set(images)
    for truth_only in ("confusion_counts", "confusion_normalised", "per_class_recall", "ood_roc",
                       "gallery_confident_mistakes", "voting"):
        assert truth_only not in images
    for png in images.values():
        decode(png)
    assert "not known" in (run / "report.html").read_text()


def test_rebuild_keeps_the_submission_and_takes_ablation_and_robustness(tiny_runs, tmp_path, capsys):
    run = tiny_runs / "subs" / "voted"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "report.html"}
    ablation = tmp_path / "abl.csv"
    ablation.write_text("variant,seed,val balanced accuracy,test accuracy,AUROC,score,seconds\n"
                        "base,0,0.5,0.5,0.7,0.55,3\nbase,1,0.6,0.55,0.72,0.6,3\nno_kd,0,0.4,0.45,0.6,0.49,2\n")
    (run / "robustness.csv").write_text("artifact,split,attack,eps,accuracy\nsar_final,val,fgsm,0,0.6\nsar_final,val,fgsm,0.03,0.3\n")
    try:  # (its time is printed by the stage and belongs in a benchmark, not in a test)
        assert report_stage.main(["--submission", str(run), "--profile", "tiny", "--ablation", str(ablation)]) == 0
    finally:
        (run / "robustness.csv").unlink()
    assert f"wrote {run / 'report.html'}" in capsys.readouterr().out
    images = parse(run / "report.html")
    assert {"ablation", "robustness_0"} <= set(images)
    assert "no_kd" in (run / "report.html").read_text()
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "report.html"}
    assert after == before


def test_compare_two_runs(tiny_runs, capsys):
    subs = tiny_runs / "subs"
    assert report_stage.main(["--compare", str(subs / "voted"), str(subs / "blind"), "--profile", "tiny"]) == 0
    out = subs / "compare-voted-vs-blind.html"
    images = parse(out)
    assert "ood_overlay" in images and "recall_difference" not in images  # blind has no truth
    decode(images["ood_overlay"])
    assert "infer.cluster.enabled" in out.read_text()  # the config difference is listed
    path = compare_runs(subs / "voted", subs / "voted", tiny_runs / "same.html", ReportConfig(dpi=50))
    images = parse(path)
    assert {"recall_difference", "ood_overlay"} <= set(images)
    for png in images.values():
        decode(png)


def test_bad_paths_are_one_line_and_write_nothing(tiny_runs, tmp_path, capsys):
    subs = tiny_runs / "subs"
    report = (subs / "voted" / "report.html").read_bytes()
    cases = [
        (["--submission", str(tmp_path / "nope")], "submission folder"),
        (["--submission", str(tmp_path)], "not a complete submission folder"),
        (["--submission", str(subs / "voted"), "--ablation", str(tmp_path / "none.csv")], "--ablation"),
        (["--compare", str(subs / "voted"), str(tmp_path / "nope")], "not found"),
        (["--compare", str(subs / "voted"), str(subs / "blind"), "--out", str(subs / "voted" / "results.csv")], ".html"),
        (["--compare", str(subs / "voted"), str(subs / "blind"), "--out", str(tmp_path / "no" / "x.html")], "not found"),
        (["--submission", str(subs / "voted"), "--set", "report.dpi=1"], "report.dpi"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            report_stage.main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert (subs / "voted" / "report.html").read_bytes() == report
    assert list(tmp_path.iterdir()) == []


def test_a_failing_report_is_a_warning_and_the_submission_stands(tiny_runs, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(plots, "confusion_png", broken)
    capsys.readouterr()
    assert infer.main(argv(tiny_runs, "--run", "broken")) == 0
    run = tiny_runs / "subs" / "broken"
    captured = capsys.readouterr()
    assert (run / "results.csv").is_file() and (run / "score.json").is_file()
    assert not (run / "report.html").exists()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: report not written")]
    assert len(warning) == 1 and "plotting exploded" in warning[0] and "stages.report --submission" in warning[0]
    monkeypatch.undo()
    assert report_stage.main(["--submission", str(run), "--profile", "tiny"]) == 0  # rebuilt once the cause is gone
    assert "confusion_counts" in parse(run / "report.html")


def test_curves_of_a_model_retrained_since_the_run_are_not_shown_as_its_own(tiny_runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_runs / "subs" / "voted", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["inputs"]["parents"]["sar_final"] = "0" * 64  # as if weights/sar_final was retrained after this run
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "plots" / "training_sar_final.png").unlink()
    assert report_stage.main(["--submission", str(run), "--profile", "tiny", "--set", "report.gallery_size=0"]) == 0
    images = parse(run / "report.html")
    assert not any(name.startswith("training_") for name in images)
    assert "changed since this run" in (run / "report.html").read_text()
    assert not any(p.name.startswith(("training_", "gallery_")) for p in (run / "plots").iterdir())  # stale plots removed
