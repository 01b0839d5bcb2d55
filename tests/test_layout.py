"""Dataset discovery: the three layouts, pairing, class folders, test ids, holdout and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_data import chip, make_generic, make_paired, write_image

from pipeline.classes import OFFICIAL_NAMES
from pipeline.data.layout import apply_holdout, describe, discover_layout
from pipeline.errors import UserError


def test_official_layout_pairs_and_truth(tmp_path: Path) -> None:
    make_paired(
        tmp_path,
        classes={"sedan": 3, "van": 2},
        sar_only={"sedan": 2, "bus": 1},
        eo_only={"van": 1},
        test_ids=[101, 205, 37],
        truth={101: 0, 205: -1},
    )
    layout = discover_layout(tmp_path)
    assert layout.kind == "official" and layout.classes.official and layout.has_eo
    assert layout.pair_counts() == {"paired": 5, "sar_only": 3, "eo_only": 1}
    assert layout.class_counts().tolist() == [5, 0, 0, 3, 0, 0, 0, 1, 0, 0]
    sedan = [item for item in layout.train if item.class_id == 0]
    assert [item.name for item in sedan] == ["p000.png", "p001.png", "p002.png", "s000.png", "s001.png"]
    assert sedan[0].eo_path == tmp_path / "EO_Train" / "sedan" / "p000.png"
    assert sedan[0].sar_path == tmp_path / "SAR_Train" / "sedan" / "p000.png"
    assert sedan[3].eo_path is None
    assert [(t.image_id, t.class_id) for t in layout.test] == [(37, None), (101, 0), (205, -1)]
    assert layout.truth_path == tmp_path / "test_truth.csv"
    summary = describe(layout)
    assert "official layout" in summary and "paired 5, SAR only 3, EO only 1" in summary
    assert "labelled 1, OOD 1, unlabelled 1" in summary


def test_pairing_is_by_exact_file_name(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={"sedan": 1}, test_ids=[])
    write_image(tmp_path / "EO_Train" / "sedan" / "x.PNG", chip(1, 9))
    write_image(tmp_path / "SAR_Train" / "sedan" / "x.png", chip(2, 9))
    write_image(tmp_path / "SAR_Train" / "sedan" / "y.bmp", chip(3, 9))
    (tmp_path / "SAR_Train" / "sedan" / "notes.txt").write_text("not an image")
    layout = discover_layout(tmp_path)
    assert layout.pair_counts() == {"paired": 1, "sar_only": 2, "eo_only": 1}


def test_njust_layout(tmp_path: Path) -> None:
    make_paired(tmp_path, kind="njust", classes={"SUV": 2, "bus": 1}, eo_only={"bus": 1}, test_ids=[7, 8])
    layout = discover_layout(tmp_path)
    assert layout.kind == "njust"
    assert layout.pair_counts() == {"paired": 3, "sar_only": 0, "eo_only": 1}
    assert [t.image_id for t in layout.test] == [7, 8]
    assert layout.truth_path is None


def test_sar_only_official_layout_has_no_eo(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={}, sar_only={"sedan": 2})
    layout = discover_layout(tmp_path)
    assert not layout.has_eo and layout.pair_counts()["sar_only"] == 2


def test_class_folders_by_name_variant_and_id(tmp_path: Path) -> None:
    variants = {"SEDAN": 1, "Pickup-Truck": 1, "semi w trailer": 1, "3": 1, "pickup_truck_W_trailer": 1}
    make_paired(tmp_path, classes=variants)
    layout = discover_layout(tmp_path)
    assert sorted({item.class_id for item in layout.train}) == [0, 2, 3, 8, 9]


@pytest.mark.parametrize("name", ["SAR_Test", "test", "Test", "SAR_VAL"])
def test_test_folder_names(tmp_path: Path, name: str) -> None:
    make_paired(tmp_path, test_dir=name, test_ids=[5])
    layout = discover_layout(tmp_path)
    assert layout.test_dir == tmp_path / name and [t.image_id for t in layout.test] == [5]


def test_test_folder_by_argument_and_numeric_names(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[1])
    write_image(tmp_path / "holdout_chips" / "000123.png", chip(9, 9))
    write_image(tmp_path / "holdout_chips" / "gotcha77.png", chip(10, 9))
    layout = discover_layout(tmp_path, test_dir="holdout_chips")
    assert [t.image_id for t in layout.test] == [77, 123]


def test_missing_test_folder_gives_no_test_items(tmp_path: Path) -> None:
    make_paired(tmp_path, test_dir="elsewhere")
    (tmp_path / "elsewhere").rename(tmp_path / "unrelated")
    layout = discover_layout(tmp_path)
    assert layout.test == [] and layout.test_dir is None
    assert "no test folder" in describe(layout)


def test_generic_layout_guesses_splits(tmp_path: Path) -> None:
    make_generic(tmp_path, train={"b_cls": 3, "a_cls": 2}, test={"b_cls": 1, "a_cls": 2},
                 train_name="train_17deg", test_name="test_15deg")
    (tmp_path / ".cache" / "packs").mkdir(parents=True)  # hidden folders are not splits
    layout = discover_layout(tmp_path)
    assert layout.kind == "generic" and not layout.classes.official and not layout.has_eo
    assert layout.classes.names == ("a_cls", "b_cls")
    assert layout.class_counts().tolist() == [2, 3]
    assert layout.pair_counts() == {"paired": 0, "sar_only": 5, "eo_only": 0}
    assert [(t.image_id, t.class_id, t.path.parent.name, t.path.name) for t in layout.test] == [
        (0, 0, "a_cls", "0000.jpeg"),
        (1, 0, "a_cls", "0001.jpeg"),
        (2, 1, "b_cls", "0000.jpeg"),
    ]


def test_generic_val_split_and_explicit_dirs(tmp_path: Path) -> None:
    make_generic(tmp_path, train_name="trn", test_name="validation")
    layout = discover_layout(tmp_path)  # 'validation' is the test split, the other folder trains
    assert [len(layout.train), len(layout.test)] == [5, 3]
    with_dirs = discover_layout(tmp_path, train_dir="trn", test_dir="validation")
    assert len(with_dirs.train) == 5 and len(with_dirs.test) == 3


def test_generic_root_that_is_itself_a_class_tree(tmp_path: Path) -> None:
    make_generic(tmp_path / "data", test={}, train_name="")
    layout = discover_layout(tmp_path / "data")
    assert layout.classes.names == ("a_cls", "b_cls") and layout.test == []


def test_generic_flat_test_folder(tmp_path: Path) -> None:
    make_generic(tmp_path, test={})
    write_image(tmp_path / "test" / "Gotcha9.png", chip(1, 12))
    layout = discover_layout(tmp_path)
    assert [(t.image_id, t.class_id) for t in layout.test] == [(9, None)]


def test_generic_ambiguous_splits_ask_for_dirs(tmp_path: Path) -> None:
    make_generic(tmp_path, train_name="train_a", test_name="train_b")
    with pytest.raises(UserError, match="--train-dir"):
        discover_layout(tmp_path)
    make_generic(tmp_path / "two_tests", train_name="train", test_name="test_a")
    make_generic(tmp_path / "two_tests", train={}, test={"a_cls": 1}, test_name="test_b")
    with pytest.raises(UserError, match="--test-dir"):
        discover_layout(tmp_path / "two_tests")


def test_holdout_by_name_and_id(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={"sedan": 2, "SUV": 2, "van": 1}, test_ids=[1, 2, 3], truth={1: 0, 2: 1, 3: 3})
    layout = discover_layout(tmp_path)
    held = apply_holdout(layout, ["suv", 3])
    assert sorted({item.class_id for item in held.train}) == [0]
    assert [t.class_id for t in held.test] == [0, -1, -1]
    assert held.class_counts().tolist()[:4] == [2, 0, 0, 0]
    assert len(layout.train) == 5  # the original layout is untouched
    assert apply_holdout(layout, []) is layout


def test_holdout_generic_by_folder_name(tmp_path: Path) -> None:
    layout = discover_layout(make_generic(tmp_path))
    held = apply_holdout(layout, ["b_cls"])
    assert {item.class_id for item in held.train} == {0}
    assert [t.class_id for t in held.test] == [0, 0, -1]


def test_holdout_errors(tmp_path: Path) -> None:
    layout = discover_layout(make_paired(tmp_path, classes={"sedan": 1, "SUV": 1}))
    with pytest.raises(UserError, match="holdout class 'tank'"):
        apply_holdout(layout, ["tank"])
    with pytest.raises(UserError, match="leaves no training images"):
        apply_holdout(layout, ["sedan", "SUV"])


# ----------------------------------------------------------------------------- bad inputs


def _error(root: Path, **kwargs: str) -> str:
    with pytest.raises(UserError) as info:
        discover_layout(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_root_missing_or_not_a_folder(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    assert "is not a folder" in _error(tmp_path / "file.txt")


def test_no_recognisable_layout(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert "EO_Train/ + SAR_Train/" in message and "EO/ + SAR/" in message and "<split>/<class>/" in message


def test_unknown_class_folder(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={"sedan": 1, "tank": 1})
    message = _error(tmp_path)
    assert "unknown class folder" in message and str(Path("EO_Train") / "tank") in message


def test_two_folders_for_one_class(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={"sedan": 1, "0": 1})
    assert "both name class 0" in _error(tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    make_paired(tmp_path, classes={"sedan": 1})
    (tmp_path / "SAR_Train" / "van").mkdir()
    message = _error(tmp_path)
    assert "empty class folder" in message and str(Path("SAR_Train") / "van") in message


def test_no_images_at_all(tmp_path: Path) -> None:
    (tmp_path / "SAR_Train").mkdir()
    (tmp_path / "EO_Train").mkdir()
    assert "no training images" in _error(tmp_path)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    write_image(tmp_path / "flat" / "train" / "1.png", chip(0, 8))
    assert "expected <class>/ folders" in _error(tmp_path / "flat", train_dir="train")


def test_duplicate_test_ids(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[12])
    write_image(tmp_path / "SAR_Test" / "Gotcha012.png", chip(0, 8))
    message = _error(tmp_path)
    assert "duplicate test image id 12" in message and "Gotcha012.png" in message


def test_test_name_without_id(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[1])
    write_image(tmp_path / "SAR_Test" / "chip_a.png", chip(0, 8))
    assert "chip_a.png has no numeric id" in _error(tmp_path)


def test_test_folder_with_subfolders(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[1])
    write_image(tmp_path / "SAR_Test" / "sedan" / "Gotcha2.png", chip(0, 8))
    assert "expected a flat folder" in _error(tmp_path)


def test_given_dirs_that_do_not_exist(tmp_path: Path) -> None:
    make_generic(tmp_path)
    assert "does not exist" in _error(tmp_path, train_dir="nope")
    make_paired(tmp_path / "official")
    assert "does not exist" in _error(tmp_path / "official", test_dir="nope")
    assert "generic class-folder trees only" in _error(tmp_path / "official", train_dir="SAR_Train")


def test_generic_unknown_test_class(tmp_path: Path) -> None:
    make_generic(tmp_path, train={"a_cls": 1}, test={"zzz": 1})
    assert "unknown class folder" in _error(tmp_path)


def test_bad_truth_file(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[1])
    (tmp_path / "test_truth.csv").write_text("image_id,class_id\n1,12\n")
    assert "class_id not an integer in -1..9 in data row(s) 1" in _error(tmp_path)
    (tmp_path / "test_truth.csv").write_text("id,label\n1,0\n")
    assert "header image_id,class_id" in _error(tmp_path)
    (tmp_path / "test_truth.csv").write_text("image_id,class_id\n1,sedan\n2,0\n-3,1\n")
    message = _error(tmp_path)
    assert "class_id not an integer in -1..9 in data row(s) 1" in message
    assert "image_id not a non-negative integer in data row(s) 3" in message


def test_mstar_is_a_generic_layout(mstar_root: Path) -> None:
    layout = discover_layout(mstar_root)
    assert layout.kind == "generic" and layout.classes.num_classes == 10
    assert len(layout.train) == 2747 and len(layout.test) == 2425
    assert layout.classes.names[0] == "2S1"
    assert np.all(layout.class_counts() > 200)
    assert sorted(t.image_id for t in layout.test) == list(range(2425))
    assert OFFICIAL_NAMES[0] not in layout.classes.names


# ----------------------------------------------------------------------------- images in sub-folders (MSTAR-style)

_NESTED = ["SN_132/HB03333.png", "SN_132/deg_17/HB03334.png", "SN_9563/HB03333.png", "top.png"]


def _nested_class(folder: Path, seed: int, names: list[str] = _NESTED) -> None:
    """Images two levels deep, plus a hidden folder, a hidden file and a symlink loop (all to be skipped)."""
    for i, name in enumerate(names):
        write_image(folder / name, chip(seed + i, 9))
    write_image(folder / ".thumbs" / "hidden.png", chip(seed + 90, 9))
    write_image(folder / "SN_132" / ".HB00000.png", chip(seed + 91, 9))
    (folder / "SN_132" / "deg_17" / "loop").symlink_to("../..", target_is_directory=True)  # -> the class folder
    (folder / "SN_9563" / "self").symlink_to(".", target_is_directory=True)


@pytest.mark.parametrize("kind", ["official", "njust"])
def test_paired_layouts_walk_class_folders_recursively(tmp_path: Path, kind: str) -> None:
    eo_name, sar_name, test_name = ("EO_Train", "SAR_Train", "SAR_Test") if kind == "official" else ("EO", "SAR", "test")
    _nested_class(tmp_path / eo_name / "sedan", 1, _NESTED + ["SN_777/HB03333.png"])
    _nested_class(tmp_path / sar_name / "sedan", 100, _NESTED + ["SN_9563/sar_only.png"])
    _nested_class(tmp_path / sar_name / "van", 200)
    write_image(tmp_path / test_name / "Gotcha5.png", chip(300, 9))
    layout = discover_layout(tmp_path)
    assert layout.kind == kind
    sedan = {item.name: item for item in layout.train if item.class_id == 0}
    assert list(sedan) == sorted(_NESTED + ["SN_777/HB03333.png", "SN_9563/sar_only.png"])
    for name in _NESTED:  # paired by the path relative to the class folder, not by the bare file name
        assert sedan[name].eo_path == tmp_path / eo_name / "sedan" / name
        assert sedan[name].sar_path == tmp_path / sar_name / "sedan" / name
    assert sedan["SN_777/HB03333.png"].sar_path is None and sedan["SN_9563/sar_only.png"].eo_path is None
    assert [item.name for item in layout.train if item.class_id == 3] == sorted(_NESTED)
    assert layout.pair_counts() == {"paired": 4, "sar_only": 5, "eo_only": 1}
    assert discover_layout(tmp_path).train == layout.train  # deterministic


def test_generic_layout_walks_train_and_labelled_test_recursively(tmp_path: Path) -> None:
    _nested_class(tmp_path / "train_17deg" / "T72", 1)
    _nested_class(tmp_path / "train_17deg" / "BMP2", 10)
    _nested_class(tmp_path / "test_15deg" / "T72", 20)
    write_image(tmp_path / "test_15deg" / "BMP2" / "SN_9566" / "a.png", chip(30, 9))
    layout = discover_layout(tmp_path)
    assert layout.kind == "generic" and layout.classes.names == ("BMP2", "T72")
    assert [item.name for item in layout.train] == sorted(_NESTED) * 2
    assert all(item.sar_path == tmp_path / "train_17deg" / layout.classes.names[item.class_id] / item.name
               for item in layout.train)
    assert [(t.image_id, t.class_id, t.path.relative_to(tmp_path / "test_15deg").as_posix()) for t in layout.test] == [
        (0, 0, "BMP2/SN_9566/a.png"),
        *[(i + 1, 1, f"T72/{name}") for i, name in enumerate(sorted(_NESTED))],
    ]
    assert discover_layout(tmp_path).test == layout.test


def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    write_image(tmp_path / "elsewhere" / "SN_1" / "a.png", chip(1, 9))
    make_generic(tmp_path / "data", train={"a_cls": 1}, test={})
    write_image(tmp_path / "data" / "train" / "b_cls" / "real" / "b.png", chip(2, 9))
    (tmp_path / "data" / "train" / "b_cls" / "ext").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data" / "train" / "b_cls" / "again").symlink_to("real", target_is_directory=True)
    (tmp_path / "data" / "train" / "b_cls" / "up").symlink_to("..", target_is_directory=True)  # holds b_cls: a loop
    layout = discover_layout(tmp_path / "data")
    assert [item.name for item in layout.train if item.class_id == 1] == ["ext/SN_1/a.png", "real/b.png"]


def test_class_folder_with_only_hidden_or_looping_content_is_empty(tmp_path: Path) -> None:
    make_generic(tmp_path, train={"a_cls": 1}, test={})
    write_image(tmp_path / "train" / "b_cls" / ".hidden" / "x.png", chip(1, 8))
    (tmp_path / "train" / "b_cls" / "loop").symlink_to("..", target_is_directory=True)
    message = _error(tmp_path)
    assert "empty class folder" in message and str(Path("train") / "b_cls") in message


# ----------------------------------------------------------------------------- official layout with a missing counterpart


@pytest.mark.parametrize(("kind", "present", "missing"), [("official", "EO_Train", "SAR_Train"), ("njust", "EO", "SAR")])
def test_eo_folder_without_sar_counterpart_stops(tmp_path: Path, kind: str, present: str, missing: str) -> None:
    make_paired(tmp_path, kind=kind, classes={"sedan": 2, "SUV": 1})
    import shutil

    shutil.rmtree(tmp_path / missing)
    message = _error(tmp_path)
    assert f"{missing}/" in message and f"{present}/" in message and str(tmp_path) in message


# ----------------------------------------------------------------------------- test ids: <prefix><digits>.<ext>


def test_test_names_of_every_edition(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[])
    for name in ("SAR_12.png", "EO_13.png", "Gotcha14.png", "15.png", "chip-0016.tif"):
        write_image(tmp_path / "SAR_Test" / name, chip(len(name), 8))
    layout = discover_layout(tmp_path)
    assert [(t.image_id, t.path.name) for t in layout.test] == [
        (12, "SAR_12.png"), (13, "EO_13.png"), (14, "Gotcha14.png"), (15, "15.png"), (16, "chip-0016.tif")
    ]


@pytest.mark.parametrize("name", ["chip_a.png", "SAR_1_2.png", "2022_SAR_5.png", "v2chip7.png"])
def test_test_names_without_exactly_one_number(tmp_path: Path, name: str) -> None:
    make_paired(tmp_path, test_ids=[1])
    write_image(tmp_path / "SAR_Test" / name, chip(0, 8))
    message = _error(tmp_path)
    assert name in message and "<prefix><digits>" in message


def test_duplicate_ids_across_prefixes(tmp_path: Path) -> None:
    make_paired(tmp_path, test_ids=[12])
    write_image(tmp_path / "SAR_Test" / "SAR_0012.png", chip(0, 8))
    message = _error(tmp_path)
    assert "duplicate test image id 12" in message and "SAR_0012.png" in message and "Gotcha12.png" in message


@pytest.mark.parametrize(
    "text",
    [
        "image_id,class_id\n-5,0\n",  # a negative id
        "image_id,class_id\n1.0,0\n",  # an integer written as a float
        "image_id,class_id\n1,12\n",
        "image_id,class_id\n1,sedan\n",
        "id,label\n1,0\n",
        "image_id,class_id\n1,0\n1,0\n",
        "",
    ],
)
def test_truth_file_is_read_as_the_scorer_reads_it(tmp_path: Path, text: str) -> None:
    """One reader for test_truth.csv: discovery accepts and refuses exactly what scoring does."""
    from pipeline.submission import read_truth

    make_paired(tmp_path, test_ids=[1])
    truth = tmp_path / "test_truth.csv"
    truth.write_text(text)
    try:
        expected = read_truth(truth)
    except UserError as err:
        assert _error(tmp_path) == str(err)
    else:
        layout = discover_layout(tmp_path)
        known = dict(zip(expected["image_id"], expected["class_id"]))
        assert [t.class_id for t in layout.test] == [known.get(t.image_id) for t in layout.test]


MAVOC2022 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mavoc2022_sample"


def test_real_2022_test_chips(tmp_path: Path) -> None:
    """The 2022 edition's SAR test chips (SAR_<id>.png) discover and pack as a flat test folder."""
    if not (MAVOC2022 / "SAR").is_dir():
        pytest.skip("../shared/data/mavoc2022_sample is absent")
    import io

    from rich.console import Console

    from pipeline.data.pack import pack_dataset

    root = make_paired(tmp_path / "data", test_ids=[])
    layout = discover_layout(root, test_dir=str(MAVOC2022 / "SAR"))
    ids = [t.image_id for t in layout.test]
    assert len(ids) == len(set(ids)) == 413 and all(t.class_id is None for t in layout.test)
    assert all(t.path.name == f"SAR_{t.image_id}.png" for t in layout.test)
    packed = pack_dataset(layout, 8, 56, cache_dir=tmp_path / "cache", console=Console(file=io.StringIO()))
    assert packed.test_sar.shape == (413, 56, 56) and sorted(packed.test_index["image_id"]) == sorted(ids)
    assert (packed.test_index["class_id"] == -2).all()
