"""End to end: run_all on a tiny synthetic dataset with the tiny profile (one epoch per stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.data.synth import generate
from pipeline.submission import read_truth, validate_submission

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = ("eo_teacher", "sar_student", "sar_final")


def run_all(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run_all", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    generate(root / "data", "tiny", seed=3)
    return root


def flags(ws: Path) -> list[str]:
    return ["--data", str(ws / "data"), "--profile", "tiny", "--weights", str(ws / "weights"),
            "--submissions", str(ws / "subs"), "--cache-dir", str(ws / "cache")]


def manifest_times(ws: Path) -> dict[str, str]:
    return {n: json.loads((ws / "weights" / f"{n}.json").read_text())["time"] + str((ws / "weights" / f"{n}.json").stat().st_mtime_ns) for n in MANIFESTS}


def runs(ws: Path) -> list[str]:
    return sorted(p.name for p in (ws / "subs").iterdir() if p.is_dir())


def test_end_to_end_then_skip_then_force_infer(workspace):
    ws = workspace
    first = run_all(*flags(ws))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "run_all summary" in first.stdout and "competition score" in first.stdout
    (run,) = runs(ws)
    results = pd.read_csv(ws / "subs" / run / "results.csv")
    truth = read_truth(ws / "data" / "test_truth.csv")
    validate_submission(results, truth["image_id"], num_classes=10)
    score = json.loads((ws / "subs" / run / "score.json").read_text())
    assert 0.0 <= score["competition_score"] <= 1.0
    before = manifest_times(ws)

    second = run_all(*flags(ws))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped") >= 4
    summary = second.stdout.split("run_all summary", 1)[1]
    assert summary.count("up to date") == 4 and " ran " not in summary
    assert manifest_times(ws) == before and runs(ws) == [run]

    forced = run_all(*flags(ws), "--force", "--only", "infer")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert manifest_times(ws) == before and len(runs(ws)) == 2
    assert "│ ran " in forced.stdout.split("run_all summary", 1)[1]


def test_changed_training_image_reruns_everything_downstream(workspace):
    ws = workspace
    assert run_all(*flags(ws)).returncode == 0
    before = manifest_times(ws)
    chip = sorted((ws / "data" / "SAR_Train" / "bus").glob("*.png"))[0]
    image = cv2.imread(str(chip), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(chip), 255 - image)
    again = run_all(*flags(ws))
    assert again.returncode == 0, again.stderr[-3000:]
    after = manifest_times(ws)
    assert all(after[n] != before[n] for n in MANIFESTS)


def test_failure_in_stage_3_keeps_earlier_artifacts_and_rerun_continues(workspace):
    ws = workspace
    assert run_all(*flags(ws)).returncode == 0
    before = manifest_times(ws)
    failed = run_all(*flags(ws), "--force", "--from", "finetune_head", "--set", "finetune_head.lr=.nan")
    assert failed.returncode != 0
    assert "finetune_head failed" in failed.stdout
    assert "error:" in failed.stderr and "Traceback" not in failed.stderr
    after = manifest_times(ws)
    assert after["eo_teacher"] == before["eo_teacher"] and after["sar_student"] == before["sar_student"]
    assert (ws / "weights" / "sar_final.safetensors").exists()  # the last good artifact is kept
    rerun = run_all(*flags(ws), "--force", "--from", "finetune_head")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = manifest_times(ws)
    assert final["eo_teacher"] == before["eo_teacher"] and final["sar_final"] != before["sar_final"]


def test_nonexistent_data_is_one_line_and_nonzero():
    result = run_all("--data", "/nonexistent/data")
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "/nonexistent/data" in lines[0]


def test_run_all_sh_help_works():
    result = subprocess.run(["bash", str(REPO / "run_all.sh"), "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "--from" in result.stdout and "--gpus" in result.stdout
