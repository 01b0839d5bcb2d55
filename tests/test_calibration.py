"""Calibration of the synthetic replica to the real chips: quantile table, quantile matching, the real split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data import calibration, synth
from pipeline.data.calibration import QUANTILE_LEVELS
from pipeline.errors import UserError


def _write_pairs(folder: Path, n: int, blank: tuple[int, ...] = ()) -> Path:
    """n real-style chip pairs SAR/SAR_<id>.png (56 px) and EO/EO_<id>.png (32 px) of random levels."""
    rng = np.random.default_rng(0)
    for modality, side in (("SAR", 56), ("EO", 32)):
        (folder / modality).mkdir(parents=True)
        for i in range(n):
            img = np.zeros((side, side), np.uint8) if i in blank else \
                np.clip(rng.normal(rng.uniform(60, 180), rng.uniform(10, 40), (side, side)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / modality / f"{modality}_{1000 + i}.png"), img)
    return folder


def test_split_is_disjoint_balanced_deterministic_and_order_free():
    ids = [str(10_000 + 7 * i) for i in range(413)]
    fit, holdout = calibration.split_ids(ids)
    assert not set(fit) & set(holdout) and set(fit) | set(holdout) == set(ids)
    assert (len(fit), len(holdout)) == (207, 206)
    assert calibration.split_ids(list(reversed(ids))) == (fit, holdout)
    assert fit != sorted(ids)[0::2]  # hashed, not every other id in name order
    sar = [Path(f"SAR_{i}.png") for i in ids]
    eo = [Path(f"x/EO_{i}.png") for i in ids]
    assert [calibration.chip_id(p) for p in calibration.select_subset(sar, "holdout")] == \
        [calibration.chip_id(p) for p in calibration.select_subset(eo, "holdout")] == holdout
    assert calibration.select_subset(sar, "all") == sar
    with pytest.raises(UserError, match="real subset 'half'"):
        calibration.select_subset(sar, "half")


def test_quantile_matching_lands_on_the_target_row_and_keeps_pixel_order():
    rng = np.random.default_rng(1)
    chip = cv2.GaussianBlur(rng.gamma(1.0, 1.0, (56, 56)).astype(np.float32), (0, 0), 1.5)
    target = np.sort(rng.uniform(10, 240, len(QUANTILE_LEVELS)))
    mapped = calibration.match_quantiles(chip, target)
    assert np.abs(calibration.chip_quantiles(mapped) - target).max() < 0.25  # sample quantiles straddle the knots
    order = np.argsort(chip, axis=None, kind="stable")  # pixel order kept (float32 may tie two close pixels)
    assert np.all(np.diff(mapped.ravel()[order].astype(np.float64)) >= 0)
    assert len(np.unique(mapped)) > 0.95 * chip.size
    flat = calibration.match_quantiles(np.full((8, 8), 3.0), target)
    assert np.all(flat == np.float32(target[len(target) // 2]))
    tied = calibration.match_quantiles(np.repeat([0.0, 1.0], 32).reshape(8, 8), target)  # knots with ties
    assert np.isfinite(tied).all() and tied.min() >= target[0] and tied.max() <= target[-1]


def test_table_from_the_fit_half_round_trips_and_leaves_blank_chips_out(tmp_path, capsys):
    real = _write_pairs(tmp_path / "real", 12, blank=(0, 1, 2, 3))
    out = tmp_path / "table.npz"
    calibration.main(["--real", str(real), "--out", str(out)])
    assert "real chips (fit half" in capsys.readouterr().out
    table = calibration.load_table(out)
    fit, _ = calibration.split_ids([str(1000 + i) for i in range(12)])
    assert set(table["ids"]) == set(fit) - {"1000", "1001", "1002", "1003"}
    for modality, folder in (("sar", "SAR"), ("eo", "EO")):
        assert table[modality].shape == (len(table["ids"]), len(QUANTILE_LEVELS)) and table[modality].dtype == np.uint8
        for row, identifier in zip(table[modality], table["ids"]):
            chip = cv2.imread(str(real / folder / f"{folder}_{identifier}.png"), cv2.IMREAD_GRAYSCALE)
            assert np.abs(row.astype(float) - calibration.chip_quantiles(chip)).max() <= 0.5
    for texture, identifier in zip(table["sar_texture"], table["ids"]):
        chip = cv2.imread(str(real / "SAR" / f"SAR_{identifier}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.allclose(texture, calibration.texture_descriptor(chip), atol=1e-6)
    assert np.allclose(table["levels"], QUANTILE_LEVELS)
    older = tmp_path / "older.npz"  # a table written before the texture column
    np.savez_compressed(older, **{k: v for k, v in table.items() if k != "sar_texture"})
    with pytest.raises(UserError, match="older version"):
        calibration.load_table(older)
    other_lags = tmp_path / "other_lags.npz"
    np.savez_compressed(other_lags, **{**table, "texture_lags": np.array([1, 3, 5], np.int16)})
    with pytest.raises(UserError, match="older version"):
        calibration.load_table(other_lags)
    even = np.linspace(0.0, 1.0, 33)  # a version-5 table: 33 even levels, no tail levels (other shape: no crash)
    keep = np.isin(QUANTILE_LEVELS, even)
    version5 = tmp_path / "version5.npz"
    np.savez_compressed(version5, **{**table, "levels": even.astype(np.float32), "sar": table["sar"][:, keep], "eo": table["eo"][:, keep]})
    with pytest.raises(UserError, match="older version"):
        calibration.load_table(version5)


def test_quantile_levels_resolve_both_tails():
    """The top and bottom 3 % of a chip are mapped through 0.5/1/2 % levels, not one linear step to the extreme."""
    assert np.all(np.diff(QUANTILE_LEVELS) > 0) and QUANTILE_LEVELS[0] == 0.0 and QUANTILE_LEVELS[-1] == 1.0
    for level in (0.005, 0.01, 0.02, 0.98, 0.99, 0.995):
        assert np.isclose(QUANTILE_LEVELS, level).any(), level
    chip = np.random.default_rng(0).exponential(size=(64, 64))  # a heavy upper tail, as SAR
    target = np.quantile(np.random.default_rng(1).gamma(4.0, size=100_000), QUANTILE_LEVELS)
    mapped = calibration.match_quantiles(chip, target)
    assert abs(np.quantile(mapped, 0.99) - target[np.isclose(QUANTILE_LEVELS, 0.99)][0]) < 0.02 * target[-1]


def test_bad_real_folder_and_table_are_user_errors(tmp_path):
    (tmp_path / "SAR").mkdir()
    cv2.imwrite(str(tmp_path / "SAR" / "SAR_1.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(SystemExit) as stop:
        calibration.main(["--real", str(tmp_path), "--out", str(tmp_path / "t.npz")])
    assert stop.value.code == 2
    with pytest.raises(UserError, match="cannot read the calibration table"):
        calibration.load_table(tmp_path / "missing.npz")


def test_committed_table_is_compact_and_complete():
    table = calibration.load_table()
    assert calibration.CALIBRATION_TABLE.stat().st_size < 20_000
    assert 150 < len(table["ids"]) <= 207 and len(set(table["ids"])) == len(table["ids"])
    for modality in ("sar", "eo"):
        rows = table[modality]
        assert rows.shape == (len(table["ids"]), len(QUANTILE_LEVELS)) and np.all(np.diff(rows.astype(int), axis=1) >= 0)
    textures = table["sar_texture"]
    assert textures.shape == (len(table["ids"]), len(calibration.TEXTURE_LAGS))
    assert np.all(np.diff(np.median(textures, axis=0)) < 0) and 0.5 < np.median(textures[:, 0]) < 0.95  # decays with lag


def test_texture_descriptor_reads_the_clutter_around_the_centre_whatever_the_grey_levels():
    rng = np.random.default_rng(2)
    rough = rng.standard_normal((57, 57)).astype(np.float32)
    smooth = cv2.GaussianBlur(rough, (0, 0), 2.0)
    lags = calibration.texture_descriptor(smooth)
    assert lags.shape == (len(calibration.TEXTURE_LAGS),) and np.all(np.diff(lags) < 0) and lags[0] > 0.8
    assert np.all(np.abs(calibration.texture_descriptor(rough)) < 0.1)
    assert np.allclose(calibration.texture_descriptor(3.0 * smooth + 7.0), lags, atol=1e-5)
    centre = smooth.copy()
    centre[19:38, 19:38] = rng.uniform(-5, 5, (19, 19))  # the object's third: not read
    assert np.allclose(calibration.texture_descriptor(centre), lags, atol=1e-5)
    framed = smooth.copy()
    framed[:6] = rng.uniform(-5, 5, (6, 57))
    assert not np.allclose(calibration.texture_descriptor(framed), lags, atol=1e-3)
    assert np.all(np.isnan(calibration.texture_descriptor(np.full((56, 56), 4.0))))  # no texture to match
    assert np.all(np.isnan(calibration.texture_descriptor(rough[:2, :2])))  # no frame


def test_targets_for_a_texture_come_from_the_real_chips_nearest_to_it():
    n = 30
    textures = np.stack([np.linspace(0.4, 0.9, n), np.linspace(0.1, 0.7, n), np.linspace(0.0, 0.5, n)], axis=1)
    table = {"ids": np.array([str(i) for i in range(n)]), "sar_texture": textures.astype(np.float32),
             "sar": np.repeat(np.arange(n, dtype=np.uint8)[:, None] * 8, 2, axis=1),
             "eo": np.repeat(np.arange(n, dtype=np.uint8)[:, None] * 8, 2, axis=1)}
    rng = np.random.default_rng(0)
    k = calibration.TEXTURE_NEIGHBOURS
    assert 1 < k < n // 2
    near = set(range(21 - k // 2, 21 + k // 2))  # rows nearest to row 20 nudged up (evenly spaced rows)
    low, exact = set(), 0
    for _ in range(300):
        target = calibration.random_targets(table, rng, textures[20] + 1e-3)
        row = target["sar"][0] / 8.0  # between two drawn rows, nearer the first
        assert min(near) - 1e-6 <= row <= max(near) + 1e-6
        low.add(int(np.floor(row)))
        exact += abs(row - round(row)) < 1e-9
    assert len(low) >= k // 2  # several neighbours, not just the nearest
    assert exact == 0  # two different rows mixed: no exact copy of a real chip's row
    for texture in (None, np.full(3, np.nan)):  # without a texture: any real chip
        plain = {int(np.floor(calibration.random_targets(table, rng, texture)["sar"][0] / 8.0)) for _ in range(300)}
        assert min(plain) < min(near) - 2 and max(plain) > max(near) + 2


def test_random_targets_lie_between_two_real_chips_the_same_for_both_modalities():
    table = {"ids": np.array(["1", "2"]), "sar": np.array([[0, 10], [100, 110]], np.uint8),
             "eo": np.array([[0, 20], [200, 220]], np.uint8)}
    rng = np.random.default_rng(0)
    targets = [calibration.random_targets(table, rng) for _ in range(200)]
    sar_first = np.array([t["sar"][0] for t in targets])
    assert np.allclose(np.array([t["eo"][0] for t in targets]), 2 * sar_first)  # one pair, one weight
    assert set(np.round(sar_first, 6)) >= {0.0, 100.0}  # both chips are drawn
    assert sar_first.min() >= 0 and sar_first.max() <= 100 + 1e-9 and len(set(np.round(sar_first, 6))) > 50


def test_generated_chips_follow_their_drawn_targets_and_the_uncalibrated_path_does_not(monkeypatch):
    drawn, textures = [], []

    def recorded(table, rng, texture=None):
        drawn.append(calibration.random_targets(table, rng, texture))
        textures.append(texture)
        return drawn[-1]

    monkeypatch.setattr(synth, "random_targets", recorded)
    default_modalities = synth.CALIBRATED_MODALITIES
    default = [synth.render_pair(i, synth.object_rng(3, 0, i), 32, 56, calibrate=True) for i in range(6)]
    monkeypatch.setattr(synth, "CALIBRATED_MODALITIES", ("sar", "eo"))
    drawn.clear()
    calibrated = [synth.render_pair(i, synth.object_rng(3, 0, i), 32, 56, calibrate=True) for i in range(6)]
    plain = [synth.render_pair(i, synth.object_rng(3, 0, i), 32, 56, calibrate=False) for i in range(6)]
    assert len(drawn) == 6
    for texture, (_, sar_plain) in zip(textures[-6:], plain):  # the rendered SAR chip's texture, before the mapping
        assert np.allclose(texture, calibration.texture_descriptor(sar_plain), atol=0.01)
    for (eo_default, sar_default), (eo, sar), (eo_plain, _) in zip(default, calibrated, plain):
        assert np.array_equal(sar_default, sar)  # the modalities are mapped independently of one another
        assert np.array_equal(eo_default, eo_plain) == ("eo" not in default_modalities)
    inner = slice(1, -1)
    for (eo, sar), (_, sar_plain), target in zip(calibrated, plain, drawn):
        assert np.abs(calibration.chip_quantiles(sar)[inner] - target["sar"][inner]).max() <= 1.0  # quantisation
        assert np.abs(calibration.chip_quantiles(eo)[inner] - target["eo"][inner]).max() <= 6.0  # + sensor noise
        assert np.corrcoef(sar.ravel(), sar_plain.ravel())[0, 1] > 0.8  # same scene, other grey levels
    gaps = [np.abs(calibration.chip_quantiles(s)[inner] - t["sar"][inner]).max() for (_, s), t in zip(plain, drawn)]
    assert np.median(gaps) > 10.0
