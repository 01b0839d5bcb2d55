"""Dataset discovery: the official, NJUST-style and generic class-folder layouts, detected automatically.

- official: `EO_Train/<class>/`, `SAR_Train/<class>/`, a flat test folder (`SAR_Test`, `test`, `Test`,
  `SAR_VAL` or `test_dir`) and optionally `test_truth.csv` (image_id,class_id; -1 = OOD) beside it;
- NJUST-style: `EO/<class>/`, `SAR/<class>/`, `test/`;
- generic (SAR only): `<train_dir>/<class>/` with an optional `<test_dir>/<class>/` (labelled) or a
  flat `<test_dir>/`; class ids are the sorted folder names.

A root with `EO_Train/` (or `EO/`) is always the official (or NJUST) layout: without its `SAR_Train/`
(or `SAR/`) it is refused, never read as a generic tree. Official/NJUST class folders are named by
official class name or id. A class folder holds its images at any depth (MSTAR's `T72/SN_132/*.jpeg`):
an item's name is its path relative to the class folder (`SN_132/HB03333.jpeg`), and EO and SAR chips
pair by that name inside the same class. Flat test folders name their files `<prefix><digits>.<ext>`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classes import OFFICIAL_NAMES, OOD_LABEL, ClassTable, official_class_id
from pipeline.data.testset import TRUTH_FILE, image_id_from_name, read_truth
from pipeline.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
TEST_DIR_NAMES = ("SAR_Test", "test", "Test", "SAR_VAL")


@dataclass(frozen=True, slots=True)
class TrainItem:
    """One training object: its EO and/or SAR chip (None where that modality is missing).

    `name` is the chip's path relative to its class folder, '/'-separated ('SN_132/HB03333.jpeg'): unique
    within a class, the key that pairs EO with SAR, and never used as a file name."""

    name: str
    class_id: int
    eo_path: Path | None
    sar_path: Path | None


@dataclass(frozen=True, slots=True)
class TestItem:
    """One test chip; class_id None = unknown, -1 = out-of-distribution."""

    image_id: int
    path: Path
    class_id: int | None


@dataclass
class DatasetLayout:
    """What was found under a data root: class table, training items, test items."""

    root: Path
    kind: str  # "official" | "njust" | "generic"
    classes: ClassTable
    train: list[TrainItem]
    test: list[TestItem]
    truth_path: Path | None
    has_eo: bool
    test_dir: Path | None = None

    def pair_counts(self) -> dict[str, int]:
        """Training items with both chips, SAR only, EO only."""
        counts = {"paired": 0, "sar_only": 0, "eo_only": 0}
        for item in self.train:
            if item.eo_path is not None and item.sar_path is not None:
                counts["paired"] += 1
            elif item.sar_path is not None:
                counts["sar_only"] += 1
            else:
                counts["eo_only"] += 1
        return counts

    def class_counts(self) -> np.ndarray:
        """Training items per class id (length = number of classes)."""
        labels = np.fromiter((item.class_id for item in self.train), dtype=np.int64, count=len(self.train))
        return np.bincount(labels, minlength=self.classes.num_classes)


# ----------------------------------------------------------------------------- directory helpers


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """Sorted (sub-folder names, image file names) of a folder; hidden entries are skipped."""
    dirs, images = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(entry.name)
    return sorted(dirs), sorted(images)


def _child_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first child folder named like one of `names`: exact spelling first, then any case."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    children = {d.lower(): d for d in _scan(root)[0]}
    for name in names:
        if name.lower() in children:
            return root / children[name.lower()]
    return None


def _resolve_dir(root: Path, name: str, what: str) -> Path:
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_dir():
        raise UserError(f"{what} folder {path} does not exist: expected a folder inside {root}")
    return path


# ----------------------------------------------------------------------------- class folders


def _official_class_folders(split_dir: Path) -> dict[int, Path]:
    """Class folders of an official/NJUST split, keyed by official id."""
    by_id: dict[int, Path] = {}
    for name in _scan(split_dir)[0]:
        class_id = official_class_id(name)
        if class_id is None:
            raise UserError(
                f"unknown class folder {split_dir / name}: expected an official class name "
                f"({', '.join(OFFICIAL_NAMES)}) or an id 0-{len(OFFICIAL_NAMES) - 1}"
            )
        if class_id in by_id:
            raise UserError(
                f"class folders {by_id[class_id]} and {split_dir / name} both name class "
                f"{class_id} ({OFFICIAL_NAMES[class_id]}): merge them into one folder"
            )
        by_id[class_id] = split_dir / name
    return by_id


def _walk_images(folder: Path) -> list[str]:
    """Image files at any depth under `folder`, as sorted '/'-separated paths relative to it.

    Hidden entries are skipped. Linked folders are followed, except a link to a folder that holds the
    link itself or `folder` (a loop); every real folder is entered once, folders reached without a link
    first, so a link to a folder already walked adds nothing and the names do not depend on listing order.
    """
    top = os.path.realpath(folder)
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    linked: list[tuple[str, str]] = []

    def holds(outer: str, inner: str) -> bool:
        return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)

    def enter(start: str, start_prefix: str, follow: bool) -> None:
        stack = [(start, start_prefix)]
        while stack:
            current, prefix = stack.pop()
            try:
                stat = os.stat(current)
                with os.scandir(current) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError:
                continue  # a dangling link or an unreadable folder holds no chips
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if holds(target, os.path.realpath(current)) or holds(target, top):
                            continue  # a loop
                        if not follow:
                            linked.append((target, f"{prefix}{entry.name}/"))
                            continue
                    subfolders.append((entry.path, f"{prefix}{entry.name}/"))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(prefix + entry.name)
            stack.extend(reversed(subfolders))

    enter(str(folder), "", follow=False)
    for target, prefix in sorted(linked, key=lambda t: t[1]):
        enter(target, prefix, follow=True)
    return sorted(found)


def _class_images(folder: Path) -> list[str]:
    """Images of a class folder at any depth (names relative to it); UserError when there are none."""
    images = _walk_images(folder)
    if not images:
        raise UserError(f"empty class folder {folder}: expected image files ({_extensions()})")
    return images


def _extensions() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _paired_items(class_id: int, eo_dir: Path | None, sar_dir: Path | None) -> list[TrainItem]:
    """Training items of one class, EO and SAR paired by identical path relative to the class folder."""
    eo_names = set(_class_images(eo_dir)) if eo_dir is not None else set()
    sar_names = set(_class_images(sar_dir)) if sar_dir is not None else set()
    return [
        TrainItem(
            name=name,
            class_id=class_id,
            eo_path=eo_dir / name if name in eo_names else None,
            sar_path=sar_dir / name if name in sar_names else None,
        )
        for name in sorted(eo_names | sar_names)
    ]


# ----------------------------------------------------------------------------- test folders


def _flat_test_items(folder: Path) -> list[TestItem]:
    """Unlabelled test items of a flat folder; image ids from the file names."""
    dirs, images = _scan(folder)
    if dirs:
        raise UserError(
            f"test folder {folder} contains sub-folders ({', '.join(dirs[:3])}): expected a flat folder of images"
        )
    seen: dict[int, str] = {}
    items = []
    for name in images:
        image_id = image_id_from_name(folder / name)
        if image_id in seen:
            raise UserError(
                f"duplicate test image id {image_id} in {folder}: files {seen[image_id]} and {name}"
            )
        seen[image_id] = name
        items.append(TestItem(image_id=image_id, path=folder / name, class_id=None))
    return sorted(items, key=lambda item: item.image_id)


def _labelled(items: list[TestItem], truth: dict[int, int]) -> list[TestItem]:
    return [dataclasses.replace(item, class_id=truth.get(item.image_id)) for item in items]


# ----------------------------------------------------------------------------- the three layouts


def _paired_layout(root: Path, kind: str, eo_dir: Path | None, sar_dir: Path, test_dir: str | None) -> DatasetLayout:
    classes = ClassTable.official_table()
    eo_classes = _official_class_folders(eo_dir) if eo_dir is not None else {}
    sar_classes = _official_class_folders(sar_dir)
    train: list[TrainItem] = []
    for class_id in sorted(set(eo_classes) | set(sar_classes)):
        train.extend(_paired_items(class_id, eo_classes.get(class_id), sar_classes.get(class_id)))
    if not train:
        where = f"{sar_dir}" + (f" or {eo_dir}" if eo_dir is not None else "")
        raise UserError(f"no training images under {where}: expected <class>/ folders of images")

    test_folder = _resolve_dir(root, test_dir, "test") if test_dir else _child_dir(root, TEST_DIR_NAMES)
    test: list[TestItem] = []
    truth_path = None
    if test_folder is not None:
        test = _flat_test_items(test_folder)
        if (test_folder.parent / TRUTH_FILE).is_file():
            truth_path = test_folder.parent / TRUTH_FILE
            truth = read_truth(truth_path, classes.num_classes)
            test = _labelled(test, dict(zip(truth["image_id"].tolist(), truth["class_id"].tolist())))
    return DatasetLayout(
        root=root,
        kind=kind,
        classes=classes,
        train=train,
        test=test,
        truth_path=truth_path,
        has_eo=any(item.eo_path is not None for item in train),
        test_dir=test_folder,
    )


def _pick_generic_splits(root: Path, train_dir: str | None, test_dir: str | None) -> tuple[Path, Path | None]:
    """Train and test folders of a generic tree, given or guessed from the folder names."""
    if train_dir is not None:
        train = _resolve_dir(root, train_dir, "training")
        if test_dir is not None:
            return train, _resolve_dir(root, test_dir, "test")
    dirs = _scan(root)[0]
    if not dirs and train_dir is None:
        raise UserError(
            f"no recognisable dataset layout in {root}: looked for EO_Train/ + SAR_Train/ (official), "
            f"EO/ + SAR/ (NJUST-style) or <split>/<class>/ folders (generic)"
        )
    if train_dir is None and all(_scan(root / d)[1] and not _scan(root / d)[0] for d in dirs):
        return root, (_resolve_dir(root, test_dir, "test") if test_dir else None)  # root is the class tree
    evaluation = [d for d in dirs if "train" not in d.lower() and ("test" in d.lower() or "val" in d.lower())]
    if train_dir is None:
        candidates = [d for d in dirs if "train" in d.lower()] or [d for d in dirs if d not in evaluation]
        if len(candidates) != 1:
            raise UserError(
                f"cannot tell the training split in {root} (folders: {', '.join(dirs)}): "
                f"pass --train-dir and --test-dir"
            )
        train = root / candidates[0]
    if test_dir is not None:
        return train, _resolve_dir(root, test_dir, "test")
    tests = [d for d in evaluation if "test" in d.lower()] or evaluation
    if len(tests) > 1:
        raise UserError(f"cannot tell the test split in {root} (candidates: {', '.join(tests)}): pass --test-dir")
    return train, (root / tests[0] if tests else None)


def _generic_layout(root: Path, train_dir: str | None, test_dir: str | None) -> DatasetLayout:
    train_root, test_root = _pick_generic_splits(root, train_dir, test_dir)
    class_dirs, stray_images = _scan(train_root)
    if not class_dirs:
        found = f"found {len(stray_images)} images directly in it" if stray_images else "it has no sub-folders"
        raise UserError(f"no training images under {train_root}: expected <class>/ folders of images, {found}")
    classes = ClassTable(names=tuple(class_dirs), official=False)
    train: list[TrainItem] = []
    for class_id, name in enumerate(class_dirs):
        train.extend(_paired_items(class_id, None, train_root / name))

    test: list[TestItem] = []
    if test_root is not None:
        test_dirs, test_images = _scan(test_root)
        if test_dirs and test_images:
            raise UserError(
                f"test folder {test_root} mixes images and sub-folders: "
                f"expected either <class>/ folders or a flat folder of images"
            )
        if test_dirs:
            labelled = []
            for name in test_dirs:
                class_id = classes.id_of(name)
                if class_id is None:
                    raise UserError(
                        f"unknown class folder {test_root / name}: expected one of the training classes "
                        f"({', '.join(class_dirs)})"
                    )
                labelled.extend((class_id, f, test_root / name / f) for f in _class_images(test_root / name))
            labelled.sort(key=lambda t: (t[0], t[1]))
            test = [TestItem(image_id=i, path=p, class_id=c) for i, (c, _, p) in enumerate(labelled)]
        else:
            test = _flat_test_items(test_root)
    return DatasetLayout(
        root=root,
        kind="generic",
        classes=classes,
        train=train,
        test=test,
        truth_path=None,
        has_eo=False,
        test_dir=test_root,
    )


def discover_layout(root: str | Path, train_dir: str | None = None, test_dir: str | None = None) -> DatasetLayout:
    """Find the dataset under `root`: official, NJUST-style or generic class-folder tree."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data folder {root} does not exist: expected a dataset root (EO_Train/, SAR_Train/, ...)")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder: expected a dataset root folder")
    root = root.resolve()
    for kind, eo_name, sar_name in (("official", "EO_Train", "SAR_Train"), ("njust", "EO", "SAR")):
        eo_dir, sar_dir = _child_dir(root, (eo_name,)), _child_dir(root, (sar_name,))
        if sar_dir is None and eo_dir is None:
            continue
        if sar_dir is None:
            raise UserError(
                f"{root} has {eo_dir.name}/ but no {sar_name}/: the {kind} layout needs {sar_name}/<class>/ "
                f"folders of SAR chips beside {eo_dir.name}/<class>/ (EO chips alone cannot train the SAR model)"
            )
        if train_dir is not None:
            raise UserError(
                f"--train-dir applies to generic class-folder trees only: {root} is an {kind} layout ({sar_dir.name}/)"
            )
        return _paired_layout(root, kind, eo_dir, sar_dir, test_dir)
    return _generic_layout(root, train_dir, test_dir)


# ----------------------------------------------------------------------------- holdout and summary


def _holdout_ids(classes: ClassTable, names: list[str | int]) -> set[int]:
    ids = set()
    for name in names:
        class_id = classes.id_of(str(name))
        if class_id is None and str(name).strip().isdigit() and int(name) < classes.num_classes:
            class_id = int(name)
        if class_id is None:
            raise UserError(
                f"holdout class '{name}' is not a class of this dataset: expected one of "
                f"{', '.join(classes.names)} or an id 0-{classes.num_classes - 1}"
            )
        ids.add(class_id)
    return ids


def apply_holdout(layout: DatasetLayout, classes: list[str | int]) -> DatasetLayout:
    """Remove `classes` (names or ids) from training; their labelled test items become OOD (-1)."""
    if not classes:
        return layout
    ids = _holdout_ids(layout.classes, list(classes))
    train = [item for item in layout.train if item.class_id not in ids]
    if not train:
        raise UserError(f"holding out {', '.join(map(str, classes))} leaves no training images in {layout.root}")
    test = [
        dataclasses.replace(item, class_id=OOD_LABEL) if item.class_id in ids else item for item in layout.test
    ]
    return dataclasses.replace(
        layout, train=train, test=test, has_eo=any(item.eo_path is not None for item in train)
    )


def describe(layout: DatasetLayout) -> str:
    """A few lines: layout kind, classes, training pairs, per-class counts, test images and labels."""
    pairs = layout.pair_counts()
    counts = layout.class_counts()
    table = "official ids" if layout.classes.official else "sorted folder names"
    per_class = ", ".join(f"{name} {n}" for name, n in zip(layout.classes.names, counts))
    lines = [
        f"{layout.kind} layout at {layout.root}",
        f"classes: {layout.classes.num_classes} ({table})",
        f"train: {len(layout.train)} items (paired {pairs['paired']}, SAR only {pairs['sar_only']}, "
        f"EO only {pairs['eo_only']})",
        f"per class: {per_class}",
    ]
    if layout.test_dir is None:
        lines.append("test: no test folder")
    else:
        labels = [item.class_id for item in layout.test]
        n_ood = sum(1 for c in labels if c == OOD_LABEL)
        n_known = sum(1 for c in labels if c is not None and c != OOD_LABEL)
        n_unknown = sum(1 for c in labels if c is None)
        truth = f", truth {layout.truth_path.name}" if layout.truth_path is not None else ""
        lines.append(
            f"test: {len(layout.test)} images in {layout.test_dir.name}/ (labelled {n_known}, OOD {n_ood}, "
            f"unlabelled {n_unknown}{truth})"
        )
    return "\n".join(lines)
