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


def test_near_duplicates_are_grouped_across_flips_and_turns_and_only_at_one_size():
    rng = np.random.default_rng(0)
    scene = cv2.GaussianBlur(rng.standard_normal((32, 32)).astype(np.float32), (0, 0), 1.5)
    # its twin flipped, turned, brighter, with a little noise; another scene; the scene at another size
    twin = np.rot90(scene.T, 1) * 1.7 + 0.3 + 0.02 * rng.standard_normal((32, 32)).astype(np.float32)
    other = cv2.GaussianBlur(rng.standard_normal((32, 32)).astype(np.float32), (0, 0), 1.5)
    larger = cv2.resize(scene, (33, 33))
    turned = np.rot90(scene, 3).copy()  # a quarter turn alone
    groups = realism.near_duplicate_groups([scene, other, twin, larger, turned])
    assert groups[0] == groups[2] == groups[4] and len({groups[0], groups[1], groups[3]}) == 3
    copies = [scene, scene.copy(), other]
    assert len(set(realism.near_duplicate_groups(copies, threshold=1.0))) == 3  # off, even for exact copies
    # a non-square chip is only flipped and turned about its shape: the pixels of its quarter turn, laid out at its
    # own shape, are another image, not a twin
    wide = rng.standard_normal((8, 12)).astype(np.float32)
    scrambled = np.rot90(wide).reshape(8, 12).copy()
    assert len(set(realism.near_duplicate_groups([wide, wide[::-1, ::-1].copy(), scrambled]))) == 2
    chain = [scene, 0.95 * scene + 0.3 * other, 0.8 * scene + 0.6 * other]  # linked through the middle one
    assert len(set(realism.near_duplicate_groups(chain))) == 1


def test_grouped_folds_keep_a_memorised_scene_out_of_the_score():
    """Real rows that are 8 noisy copies of 12 scenes, synthetic rows from the same distribution: plain k-fold
    scores the copies of scenes it trained on (high AUROC); folds that keep each scene whole do not."""
    rng = np.random.default_rng(0)
    scenes = rng.standard_normal((12, 5))
    real = np.repeat(scenes, 8, axis=0) + 0.01 * rng.standard_normal((96, 5))
    synthetic = rng.standard_normal((96, 5))
    groups = np.r_[np.repeat(np.arange(12), 8), 12 + np.arange(96)]
    plain = realism.statistics_auroc(real, synthetic, seed=0)
    grouped = realism.statistics_auroc(real, synthetic, seed=0, groups=groups)
    assert plain > 0.8 and grouped < 0.7
    singletons = np.arange(192)  # no duplicates: exactly the plain folds
    assert realism.statistics_auroc(real, synthetic, seed=0, groups=singletons) == plain


def test_compare_counts_scenes_and_the_cli_can_turn_grouping_off(tmp_path, capsys):
    a = _write_chips(tmp_path / "a", 12, seed=1, blur=1.0, offset=0.0, sizes=(32,))
    for i in range(4):  # four more copies of chip 0, brighter
        img = cv2.imread(str(a / "SAR_0.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(a / f"SAR_copy{i}.png"), np.clip(img.astype(int) + 5 * i, 0, 255).astype(np.uint8))
    b = _write_chips(tmp_path / "b", 12, seed=2, blur=1.0, offset=0.0, sizes=(32,))
    result = realism.compare(a, b, "sar", cnn_epochs=2)
    assert result.n_real == 16 and result.scenes == (12, 12)
    realism.main(["--real", str(a), "--synthetic", str(b), "--out", str(tmp_path / "out"), "--cnn-epochs", "0",
                  "--near-duplicate", "1"])
    report = json.loads((tmp_path / "out" / "sar.json").read_text())
    assert report["real_scenes"] == 16 and report["near_duplicate"] == 1.0
    with pytest.raises(SystemExit):
        realism.main(["--real", str(a), "--synthetic", str(b), "--out", str(tmp_path / "o2"), "--near-duplicate", "0"])
    assert "expected a correlation above 0" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_both_classifiers_get_the_groups_and_real_and_synthetic_scenes_never_share_one(tmp_path, monkeypatch):
    a = _write_chips(tmp_path / "a", 10, seed=1, blur=1.0, offset=0.0, sizes=(32,))
    b = tmp_path / "b"
    b.mkdir()
    for path in sorted(a.iterdir()):  # the synthetic side holds the very same chips
        (b / path.name).write_bytes(path.read_bytes())
    seen = []
    original = realism._splits
    monkeypatch.setattr(realism, "_splits", lambda y, groups, seed: seen.append(groups) or original(y, groups, seed))
    realism.compare(a, b, "sar", cnn_epochs=1)
    assert len(seen) == 2 and all(g is not None for g in seen)  # the statistics classifier and the CNN
    groups = seen[0]
    assert not set(groups[:10]) & set(groups[10:]) and len(set(groups)) == 20
    with pytest.raises(UserError, match="too few chips"):
        realism.statistics_auroc(np.zeros((4, 3)), np.ones((4, 3)), groups=np.array([0, 0, 0, 0, 1, 2, 3, 4]))
