"""Tiny image datasets in temp folders for the data-layer tests: official, NJUST-style, generic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def chip(seed: int, height: int, width: int | None = None, channels: int = 0) -> np.ndarray:
    """A random uint8 chip (H, W) or (H, W, channels), different for every seed."""
    rng = np.random.default_rng(seed)
    shape = (height, width or height) + ((channels,) if channels else ())
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_image(path: Path, image: np.ndarray) -> Path:
    """Save an array as an image file (format from the suffix); creates parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def make_paired(
    root: Path,
    kind: str = "official",
    classes: dict[str, int] | None = None,
    sar_only: dict[str, int] | None = None,
    eo_only: dict[str, int] | None = None,
    test_ids: list[int] | None = None,
    truth: dict[int, int] | None = None,
    test_dir: str | None = None,
    eo_shape: tuple[int, int] = (9, 9),
    sar_shape: tuple[int, int] = (13, 11),
) -> Path:
    """An official (EO_Train/SAR_Train/SAR_Test) or NJUST-style (EO/SAR/test) dataset.

    `classes` maps a class folder name to its number of EO/SAR pairs; `sar_only`/`eo_only` add
    unpaired chips; test chips are Gotcha<id>.png; `truth` writes test_truth.csv.
    """
    official = kind == "official"
    eo_dir, sar_dir, default_test = ("EO_Train", "SAR_Train", "SAR_Test") if official else ("EO", "SAR", "test")
    classes = {"sedan": 3, "SUV": 2} if classes is None else classes
    seed = 0
    for folder, n in classes.items():
        for i in range(n):
            seed += 1
            write_image(root / eo_dir / folder / f"p{i:03d}.png", chip(seed, *eo_shape))
            write_image(root / sar_dir / folder / f"p{i:03d}.png", chip(seed + 10_000, *sar_shape))
    for folder, n in (sar_only or {}).items():
        for i in range(n):
            seed += 1
            write_image(root / sar_dir / folder / f"s{i:03d}.png", chip(seed + 10_000, *sar_shape))
    for folder, n in (eo_only or {}).items():
        for i in range(n):
            seed += 1
            write_image(root / eo_dir / folder / f"e{i:03d}.png", chip(seed, *eo_shape))
    (root / (test_dir or default_test)).mkdir(parents=True, exist_ok=True)
    for image_id in [101, 205, 37] if test_ids is None else test_ids:
        write_image(root / (test_dir or default_test) / f"Gotcha{image_id}.png", chip(50_000 + image_id, *sar_shape))
    if truth is not None:
        lines = ["image_id,class_id"] + [f"{i},{c}" for i, c in truth.items()]
        (root / "test_truth.csv").write_text("\n".join(lines) + "\n")
    return root


def make_generic(
    root: Path,
    train: dict[str, int] | None = None,
    test: dict[str, int] | None = None,
    train_name: str = "train",
    test_name: str = "test",
    shape: tuple[int, int] = (12, 12),
    suffix: str = ".jpeg",
) -> Path:
    """A SAR-only class-folder tree `<train_name>/<class>/`, `<test_name>/<class>/` (test may be {})."""
    train = {"b_cls": 3, "a_cls": 2} if train is None else train
    test = {"a_cls": 2, "b_cls": 1} if test is None else test
    seed = 0
    for split, classes in ((train_name, train), (test_name, test)):
        for folder, n in classes.items():
            for i in range(n):
                seed += 1
                write_image(root / split / folder / f"{i:04d}{suffix}", chip(seed, *shape))
    return root


def toy_clusters(seed: int = 0, n_per_class: int = 30, dim: int = 8) -> tuple:
    """Embeddings of three classes clustered on axes 0-2 (plus noise): (embeddings, labels, centres, rng)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, dim))
    centres[[0, 1, 2], [0, 1, 2]] = 5.0
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(0.0, 0.3, (len(labels), dim)), labels, centres, rng
