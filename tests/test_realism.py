"""The realism two-sample test: same-distribution folders are not told apart, different ones are."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data import realism
from pipeline.errors import UserError


def _write_chips(folder: Path, n: int, seed: int, blur: float, offset: float, sizes=(40,)) -> Path:
    """n chips of smoothed Gaussian noise (grain `blur` px, brightness `offset`) as PNGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        side = int(sizes[i % len(sizes)])
        noise = rng.standard_normal((side, side)).astype(np.float32)
        if blur > 0:
            noise = cv2.GaussianBlur(noise, (0, 0), blur)
            noise /= noise.std() + 1e-6
        img = np.clip(255 * (0.4 + offset + 0.12 * noise), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"SAR_{i}.png"), img)
    return folder


def test_statistics_of_a_known_chip():
    flat = np.full((20, 20), 0.5, np.float32)
    stats = dict(zip(realism.STATISTICS, realism.chip_statistics(flat)))
    assert stats["mean"] == pytest.approx(0.5) and stats["p01"] == pytest.approx(0.5)
    assert stats["std"] == 0 and stats["local_cv"] == pytest.approx(0, abs=1e-3) and stats["autocorr_lag1"] == 0
    assert stats["size"] == 20 and stats["dark_fraction"] == 0
    rng = np.random.default_rng(0)
    white = rng.random((64, 64)).astype(np.float32)
    coarse = cv2.GaussianBlur(white, (0, 0), 2.0)
    assert abs(realism.chip_statistics(white)[realism.STATISTICS.index("autocorr_lag1")]) < 0.1
    assert realism.chip_statistics(coarse)[realism.STATISTICS.index("autocorr_lag1")] > 0.8
    black = np.zeros((8, 8), np.float32)
    assert realism.chip_statistics(black)[realism.STATISTICS.index("dark_fraction")] == 1.0


def test_same_distribution_is_near_chance_and_different_is_told_apart(tmp_path):
    a = _write_chips(tmp_path / "a", 40, seed=1, blur=1.0, offset=0.0, sizes=(32,))
    b = _write_chips(tmp_path / "b", 40, seed=2, blur=1.0, offset=0.0, sizes=(32,))
    c = _write_chips(tmp_path / "c", 40, seed=3, blur=0.0, offset=-0.2, sizes=(32,))
    same = realism.compare(a, b, "sar", cnn_epochs=4)
    different = realism.compare(a, c, "sar", cnn_epochs=4)
    assert 0.25 < same.statistics_auroc < 0.75 and 0.25 < same.cnn_auroc < 0.75
    assert different.statistics_auroc > 0.95 and different.cnn_auroc > 0.9
    assert different.medians["autocorr_lag1"][0] > different.medians["autocorr_lag1"][1] + 0.3


def test_modality_folders_of_a_dataset_root_are_used(tmp_path):
    _write_chips(tmp_path / "root" / "SAR_Train" / "sedan", 3, seed=0, blur=1.0, offset=0.0)
    _write_chips(tmp_path / "root" / "SAR_Test", 2, seed=0, blur=1.0, offset=0.0)
    _write_chips(tmp_path / "root" / "EO_Train" / "sedan", 4, seed=0, blur=1.0, offset=0.0)
    assert len(realism.chip_paths(tmp_path / "root", "sar")) == 5
    assert len(realism.chip_paths(tmp_path / "root", "eo")) == 4
    assert len(realism.chip_paths(tmp_path / "root" / "EO_Train", "sar")) == 4  # no modality folder: all images


def test_cli_writes_json_and_montage(tmp_path, capsys):
    a = _write_chips(tmp_path / "a", 12, seed=1, blur=1.0, offset=0.0, sizes=(56, 57))
    b = _write_chips(tmp_path / "b", 12, seed=2, blur=0.0, offset=-0.2, sizes=(55,))
    realism.main(["--real", str(a), "--synthetic", str(b), "--out", str(tmp_path / "out"), "--cnn-epochs", "0"])
    report = json.loads((tmp_path / "out" / "sar.json").read_text())
    assert report["n_real"] == 12 and report["cnn_auroc"] is None and report["statistics_auroc"] > 0.8
    assert report["medians"]["size"]["synthetic"] == 55
    assert cv2.imread(str(tmp_path / "out" / "sar_montage.png")) is not None
    assert "statistics classifier" in capsys.readouterr().out


def test_missing_or_empty_folders_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no such folder"):
        realism.compare(tmp_path / "nope", tmp_path / "empty")
    with pytest.raises(UserError, match="no SAR images"):
        realism.compare(tmp_path / "empty", tmp_path / "empty")
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        realism.compare(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(SystemExit) as stop:
        realism.main(["--real", str(tmp_path / "nope"), "--synthetic", str(tmp_path), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2


def test_real_subset_uses_one_half_of_the_real_chips(tmp_path):
    from pipeline.data.calibration import chip_id, split_ids

    a = _write_chips(tmp_path / "a", 20, seed=1, blur=1.0, offset=0.0, sizes=(32,))
    b = _write_chips(tmp_path / "b", 8, seed=2, blur=0.0, offset=-0.2, sizes=(32,))
    fit, holdout = split_ids([chip_id(p) for p in realism.chip_paths(a, "sar")])
    out = tmp_path / "out"
    realism.main(["--real", str(a), "--synthetic", str(b), "--out", str(out), "--cnn-epochs", "0",
                  "--real-subset", "holdout"])
    report = json.loads((out / "sar.json").read_text())
    assert report["real_subset"] == "holdout" and report["n_real"] == len(holdout) == 10
    assert realism.compare(a, b, "sar", cnn_epochs=0, real_subset="fit").n_real == len(fit)
    with pytest.raises(UserError, match="in the holdout half"):
        realism.compare(_write_chips(tmp_path / "one", 1, seed=1, blur=1.0, offset=0.0), b, real_subset="holdout")
