"""Packing: arrays equal the decoded+resized files, index tables, cache reuse/invalidation, bad images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_data import chip, make_generic, make_paired, write_image
from PIL import Image
from rich.console import Console

from pipeline.data import pack as pack_module
from pipeline.data.layout import apply_holdout, discover_layout
from pipeline.data.pack import PackedData, decode_chip, pack_dataset
from pipeline.errors import UserError


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _pack(root: Path, cache: Path, skip_bad: bool = False, workers: int | None = None,
          console: Console | None = None) -> PackedData:
    layout = discover_layout(root)
    return pack_dataset(layout, 8, 12, cache_dir=cache, skip_bad=skip_bad, workers=workers, console=console or _quiet())


def _expected(path: str, size: int) -> np.ndarray:
    """Independent reference: PIL decodes to 8-bit luma, OpenCV area-resizes."""
    image = np.asarray(Image.open(path).convert("L"))
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def test_packed_arrays_equal_decoded_images(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "data", classes={"sedan": 3, "van": 2}, sar_only={"bus": 2}, eo_only={"van": 1},
                       test_ids=[4, 9], truth={4: 3, 9: -1}, eo_shape=(9, 9), sar_shape=(13, 11))
    packed = _pack(root, tmp_path / "cache")
    index = packed.train_index
    assert packed.train_eo.shape == (6, 8, 8) and packed.train_sar.shape == (7, 12, 12)
    assert packed.test_sar.shape == (2, 12, 12)
    assert isinstance(packed.train_sar, np.memmap) and not packed.train_sar.flags.writeable
    assert list(index.columns) == [
        "name", "class_id", "eo_row", "sar_row", "eo_path", "sar_path", "eo_h", "eo_w", "sar_h", "sar_w"
    ]
    assert len(index) == 8 and sorted(index["eo_row"][index["eo_row"] >= 0]) == list(range(6))
    for row in index.itertuples():
        if row.eo_row >= 0:
            np.testing.assert_array_equal(packed.train_eo[row.eo_row], _expected(row.eo_path, 8))
            assert (row.eo_h, row.eo_w) == (9, 9)
        else:
            assert row.eo_path == "" and row.eo_h == -1
        if row.sar_row >= 0:
            np.testing.assert_array_equal(packed.train_sar[row.sar_row], _expected(row.sar_path, 12))
            assert (row.sar_h, row.sar_w) == (13, 11)
    assert set(index["class_id"][index["sar_row"] < 0]) == {3}  # the EO-only van
    test = packed.test_index
    assert list(test.columns) == ["image_id", "class_id", "sar_row", "path", "h", "w"]
    assert test[["image_id", "class_id"]].values.tolist() == [[4, 3], [9, -1]]
    for row in test.itertuples():
        np.testing.assert_array_equal(packed.test_sar[row.sar_row], _expected(row.path, 12))
    assert len(packed.train_fingerprint) == 64 and packed.train_fingerprint != packed.test_fingerprint


def test_norm_from_training_arrays(tmp_path: Path) -> None:
    packed = _pack(make_paired(tmp_path / "data"), tmp_path / "cache")
    for modality, array in (("eo", packed.train_eo), ("sar", packed.train_sar)):
        values = np.asarray(array, dtype=np.float64) / 255
        assert packed.norm[modality]["mean"] == pytest.approx(values.mean())
        assert packed.norm[modality]["std"] == pytest.approx(values.std())


def test_unknown_test_labels_are_minus_two(tmp_path: Path) -> None:
    packed = _pack(make_paired(tmp_path / "data", test_ids=[3, 5], truth={3: 1}), tmp_path / "cache")
    assert packed.test_index["class_id"].tolist() == [1, -2]


def test_odd_sizes_rgb_rgba_and_16_bit(tmp_path: Path) -> None:
    root = make_generic(tmp_path / "data", train={"a": 1}, test={}, shape=(33, 29), suffix=".png")
    rgb = write_image(root / "train" / "a" / "rgb.png", chip(1, 29, 33, channels=3))
    rgba = write_image(root / "train" / "a" / "rgba.png", chip(2, 17, 31, channels=4))
    wide = (chip(3, 21, 23).astype(np.uint16) * 257)
    Image.fromarray(wide).save(root / "train" / "a" / "deep.png")
    layout = discover_layout(root)
    packed = pack_dataset(layout, eo_size=7, sar_size=13, cache_dir=tmp_path / "cache", console=_quiet())
    assert packed.train_sar.shape == (4, 13, 13)
    rows = dict(zip(packed.train_index["name"], packed.train_index["sar_row"]))
    shapes = {n: (h, w) for n, h, w in packed.train_index[["name", "sar_h", "sar_w"]].itertuples(index=False)}
    assert shapes == {"0000.png": (33, 29), "rgb.png": (29, 33), "rgba.png": (17, 31), "deep.png": (21, 23)}
    for path, name in ((rgb, "rgb.png"), (rgba, "rgba.png")):
        diff = packed.train_sar[rows[name]].astype(int) - _expected(str(path), 13)
        assert np.abs(diff).max() <= 1  # luma rounding of OpenCV vs PIL
    expected_deep = cv2.resize(chip(3, 21, 23), (13, 13), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(packed.train_sar[rows["deep.png"]], expected_deep)


def test_interpolation_setting(tmp_path: Path) -> None:
    root = make_generic(tmp_path / "data", train={"a": 2}, test={}, shape=(15, 15))
    layout = discover_layout(root)
    area = pack_dataset(layout, 8, 9, "area", cache_dir=tmp_path / "cache", console=_quiet())
    nearest = pack_dataset(layout, 8, 9, "nearest", cache_dir=tmp_path / "cache", console=_quiet())
    assert area.train_fingerprint != nearest.train_fingerprint
    path = nearest.train_index["sar_path"][0]
    np.testing.assert_array_equal(nearest.train_sar[0], decode_chip(path, 9, "nearest"))
    assert not np.array_equal(area.train_sar[0], nearest.train_sar[0])


def test_bad_settings(tmp_path: Path) -> None:
    layout = discover_layout(make_paired(tmp_path / "data"))
    with pytest.raises(UserError, match="interpolation 'lanczos'"):
        pack_dataset(layout, 8, 12, "lanczos", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="sar_size must be a positive integer"):
        pack_dataset(layout, 8, 0, cache_dir=tmp_path / "cache")


def _pack_files(cache: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()}


def test_cache_is_reused_without_rewriting(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "data")
    first = _pack(root, tmp_path / "cache")
    before = _pack_files(tmp_path / "cache")
    second = _pack(root, tmp_path / "cache")
    assert _pack_files(tmp_path / "cache") == before
    assert second.train_fingerprint == first.train_fingerprint
    np.testing.assert_array_equal(second.train_sar, first.train_sar)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["test", "train"]


def test_changed_files_invalidate_only_their_part(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "data")
    first = _pack(root, tmp_path / "cache")
    sar_file = root / "SAR_Train" / "sedan" / "p000.png"
    stat = sar_file.stat()
    os.utime(sar_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = _pack(root, tmp_path / "cache")
    assert touched.train_fingerprint != first.train_fingerprint
    assert touched.test_fingerprint == first.test_fingerprint
    write_image(root / "SAR_Test" / "Gotcha101.png", chip(999, 13, 11))
    modified = _pack(root, tmp_path / "cache")
    assert modified.test_fingerprint != touched.test_fingerprint
    assert modified.train_fingerprint == touched.train_fingerprint
    row = modified.test_index.set_index("image_id").loc[101, "sar_row"]
    np.testing.assert_array_equal(modified.test_sar[row], _expected(str(root / "SAR_Test" / "Gotcha101.png"), 12))


def test_holdout_changes_the_training_key(tmp_path: Path) -> None:
    layout = discover_layout(make_paired(tmp_path / "data", classes={"sedan": 2, "SUV": 2}))
    console = Console(file=io.StringIO())
    full = pack_dataset(layout, 8, 12, cache_dir=tmp_path / "cache", console=console)
    held = pack_dataset(apply_holdout(layout, ["SUV"]), 8, 12, cache_dir=tmp_path / "cache", console=console)
    assert held.train_fingerprint != full.train_fingerprint and len(held.train_index) == 2


def test_corrupt_image_stops_packing(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "data")
    bad = root / "SAR_Train" / "SUV" / "p001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(UserError) as info:
        _pack(root, tmp_path / "cache")
    assert str(bad) in str(info.value) and "--skip-bad" in str(info.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing half-written left behind


def test_skip_bad_leaves_bad_images_out(tmp_path: Path, capsys) -> None:
    root = make_paired(tmp_path / "data", classes={"sedan": 3}, test_ids=[1, 2])
    bad_eo = root / "EO_Train" / "sedan" / "p001.png"
    bad_sar = root / "SAR_Train" / "sedan" / "p002.png"
    bad_test = root / "SAR_Test" / "Gotcha2.png"
    bad_eo.write_bytes(b"not a png")
    bad_sar.write_bytes(b"")
    bad_test.write_bytes(bad_test.read_bytes()[:30])
    out = io.StringIO()
    packed = _pack(root, tmp_path / "cache", skip_bad=True, console=Console(file=out, width=300))
    assert sorted(packed.bad_files) == sorted(map(str, (bad_eo, bad_sar, bad_test)))
    listed = (packed.cache_dir / f"train-{packed.train_fingerprint[:20]}" / "bad_files.txt").read_text()
    assert str(bad_eo) in listed and str(bad_sar) in listed
    logged = capsys.readouterr().out  # the warning goes through logging (pipeline.log), not the console
    assert "WARNING pipeline.data.pack: left out 3 unreadable image(s)" in logged
    index = packed.train_index.set_index("name")
    assert index.loc["p001.png", "eo_row"] == -1 and index.loc["p001.png", "sar_row"] >= 0
    assert index.loc["p002.png", "sar_row"] == -1 and index.loc["p002.png", "eo_row"] >= 0
    assert packed.train_eo.shape[0] == 2 and packed.train_sar.shape[0] == 2
    kept = index.loc["p001.png"]
    np.testing.assert_array_equal(packed.train_sar[kept["sar_row"]], _expected(kept["sar_path"], 12))
    assert packed.test_index["image_id"].tolist() == [1] and packed.test_sar.shape[0] == 1
    with pytest.raises(UserError, match="cannot decode image"):  # the cached pack still has bad files
        _pack(root, tmp_path / "cache")


def _tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` (hidden ones too, symlinks not followed): mode, size and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            state[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    stat = root.stat()
    state["."] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture
def repo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's default cache, moved into tmp_path; no EOSAR_CACHE_DIR."""
    cache = tmp_path / "repo" / ".cache" / "packs"
    monkeypatch.setattr(pack_module, "REPO_CACHE", cache)
    monkeypatch.delenv("EOSAR_CACHE_DIR", raising=False)
    return cache


def test_default_cache_is_never_inside_the_data_folder(tmp_path: Path, repo_cache: Path) -> None:
    root = make_paired(tmp_path / "data")
    before = _tree_state(root)
    packed = pack_dataset(discover_layout(root), 8, 12, console=_quiet())
    assert packed.cache_dir == repo_cache
    assert _tree_state(root) == before  # nothing created, changed or touched in the data folder
    again = pack_dataset(discover_layout(root), 8, 12, console=_quiet())
    assert again.cache_dir == repo_cache and _tree_state(root) == before


def test_cache_dir_from_the_environment(tmp_path: Path, repo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_paired(tmp_path / "data")
    monkeypatch.setenv("EOSAR_CACHE_DIR", str(tmp_path / "env cache"))
    packed = pack_dataset(discover_layout(root), 8, 12, console=_quiet())
    assert packed.cache_dir == tmp_path / "env cache" and not repo_cache.exists()
    explicit = pack_dataset(discover_layout(root), 8, 12, cache_dir=tmp_path / "flag", console=_quiet())
    assert explicit.cache_dir == tmp_path / "flag"  # --cache-dir wins over the environment


def test_unwritable_default_cache_asks_for_cache_dir(tmp_path: Path, repo_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_paired(tmp_path / "data")
    monkeypatch.setattr(pack_module, "_writable", lambda folder: False)
    with pytest.raises(UserError, match="--cache-dir") as info:
        pack_dataset(discover_layout(root), 8, 12, console=_quiet())
    assert str(repo_cache) in str(info.value) and "\n" not in str(info.value)
    assert not (root / ".cache").exists()


def test_process_pool_gives_the_same_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_paired(tmp_path / "data", classes={"sedan": 40, "van": 30})
    serial = _pack(root, tmp_path / "serial", workers=1)
    monkeypatch.setattr(pack_module, "PARALLEL_MIN_IMAGES", 10)
    parallel = _pack(root, tmp_path / "parallel", workers=2)
    np.testing.assert_array_equal(serial.train_eo, parallel.train_eo)
    np.testing.assert_array_equal(serial.train_sar, parallel.train_sar)
    np.testing.assert_array_equal(serial.test_sar, parallel.test_sar)
    assert serial.train_index.equals(parallel.train_index)


def test_no_test_folder_and_no_eo(tmp_path: Path) -> None:
    root = make_generic(tmp_path / "data", test={})
    packed = pack_dataset(discover_layout(root), 8, 12, cache_dir=tmp_path / "cache", console=_quiet())
    assert packed.train_eo.shape == (0, 8, 8) and packed.test_sar.shape == (0, 12, 12)
    assert len(packed.test_index) == 0 and (packed.train_index["eo_row"] == -1).all()


def test_mstar_packs(mstar_root: Path, repo_cache: Path) -> None:
    before = _tree_state(mstar_root)
    layout = discover_layout(mstar_root)
    packed = pack_dataset(layout, 16, 24, console=_quiet())  # the default cache (moved into tmp_path)
    assert packed.cache_dir == repo_cache
    assert packed.train_sar.shape == (2747, 24, 24) and packed.test_sar.shape == (2425, 24, 24)
    assert np.bincount(packed.train_index["class_id"]).tolist() == layout.class_counts().tolist()
    assert sorted(packed.test_index["class_id"].unique()) == list(range(10))
    first = packed.train_index.iloc[0]
    np.testing.assert_array_equal(packed.train_sar[first.sar_row], _expected(first.sar_path, 24))
    assert _tree_state(mstar_root) == before  # whatever earlier runs left there, this one wrote nothing


def test_split_folder_outside_the_root(tmp_path: Path) -> None:
    make_generic(tmp_path / "elsewhere", test={})
    (tmp_path / "root").mkdir()
    layout = discover_layout(tmp_path / "root", train_dir=str(tmp_path / "elsewhere" / "train"))
    packed = pack_dataset(layout, 8, 12, cache_dir=tmp_path / "cache", console=_quiet())
    first = packed.train_index.iloc[0]
    assert Path(first.sar_path).resolve() == (tmp_path / "elsewhere" / "train" / "a_cls" / "0000.jpeg").resolve()
    np.testing.assert_array_equal(packed.train_sar[first.sar_row], _expected(first.sar_path, 12))


def test_names_with_sub_folders_pack_and_reload(tmp_path: Path) -> None:
    """Chips two levels deep under a class folder: names are relative paths ('SN_1/a.png'), never file names."""
    root = make_paired(tmp_path / "data", classes={"sedan": 1}, test_ids=[3])
    for i, name in enumerate(("SN_1/a.png", "SN_1/deg_17/a.png", "SN_2/a.png")):
        write_image(root / "EO_Train" / "van" / name, chip(i, 9))
        write_image(root / "SAR_Train" / "van" / name, chip(100 + i, 13, 11))
    first = _pack(root, tmp_path / "cache")
    again = _pack(root, tmp_path / "cache")
    for packed in (first, again):
        van = packed.train_index[packed.train_index["class_id"] == 3].set_index("name")
        assert list(van.index) == ["SN_1/a.png", "SN_1/deg_17/a.png", "SN_2/a.png"]
        for name, row in van.iterrows():
            assert row["sar_path"] == str(root / "SAR_Train" / "van" / name)
            np.testing.assert_array_equal(packed.train_eo[row["eo_row"]], _expected(row["eo_path"], 8))
            np.testing.assert_array_equal(packed.train_sar[row["sar_row"]], _expected(row["sar_path"], 12))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["test", "train"]
    assert all(p.parent.parent == tmp_path / "cache" for p in (tmp_path / "cache").rglob("*") if p.is_file())
