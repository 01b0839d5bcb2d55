"""Datasets and augmentation: normalisation, shared paired geometry, reproducibility, splits, pickling."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fake_data import make_paired
from rich.console import Console
from torch.utils.data import DataLoader

from pipeline.config import load_config
from pipeline.data.augment import AugmentSpec, BatchAugmenter, build_augmenter, sample_seeds
from pipeline.data.datasets import ChipDataset, PairedChipDataset, stratified_split
from pipeline.data.layout import discover_layout
from pipeline.data.pack import pack_dataset
from pipeline.data.samplers import make_sampler
from pipeline.errors import UserError

SEEDS_16 = sample_seeds(0, 0, range(16))
GEOMETRY_ONLY = {"hflip": True, "vflip": True, "rot90": True, "shift": 0.1, "scale": 0.1, "rotate": 20.0}


def _pattern(size: int, phase: float = 0.0) -> np.ndarray:
    """A smooth, asymmetric uint8 pattern sampled at pixel centres: the same picture at any size."""
    u, v = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size)
    image = 110 + 70 * np.sin(2 * np.pi * (0.9 * u + 0.35 * v) + phase) + 60 * u * v - 40 * (v - 0.3) ** 2
    return np.clip(image, 0, 255).astype(np.uint8)


def _chips(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def test_chip_dataset_normalises_without_augmentation() -> None:
    images = _chips(5, 9)
    dataset = ChipDataset(images, rows=np.array([4, 0]), labels=np.array([3, 1]), norm=(0.4, 0.2))
    item = dataset[0]
    assert item["image"].shape == (1, 9, 9) and item["image"].dtype == torch.float32
    np.testing.assert_allclose(item["image"][0].numpy(), (images[4] / 255 - 0.4) / 0.2, rtol=1e-5, atol=1e-5)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 3 and item["index"] == 0
    assert len(dataset) == 2 and dataset[3]["index"] == 1  # draw keys wrap onto items


def test_paired_chips_share_geometry_across_sizes() -> None:
    eo = np.stack([_pattern(32, p) for p in (0.0, 1.0, 2.0)])
    sar = np.stack([_pattern(56, p) for p in (0.0, 1.0, 2.0)])
    dataset = PairedChipDataset(eo, sar, np.arange(3), np.arange(3), np.zeros(3), (0, 1), (0, 1),
                                augment=build_augmenter(GEOMETRY_ONLY), seed=5)
    matched, mismatched = [], []
    for key in range(12):
        item = dataset[key]
        other = dataset[key + 3]  # same pair, another draw: different geometry
        sar_small = cv2.resize(item["sar"][0].numpy(), (32, 32), interpolation=cv2.INTER_AREA)
        matched.append(np.abs(sar_small - item["eo"][0].numpy()).mean())
        mismatched.append(np.abs(sar_small - other["eo"][0].numpy()).mean())
    assert max(matched) < 0.01
    assert np.median(mismatched) > 5 * max(matched)


def test_geometry_on_odd_sizes() -> None:
    """Flips and quarter turns move pixels exactly (a dihedral copy), shift/zoom/rotation resample; sizes stay."""
    image = _pattern(33)
    chips = {"image": torch.from_numpy(np.stack([image] * 16)).unsqueeze(1).float() / 255}
    same = BatchAugmenter(AugmentSpec())(chips, {"image": "sar"}, {"image": None}, SEEDS_16)["image"]
    torch.testing.assert_close(same, chips["image"])
    turned = BatchAugmenter(AugmentSpec(hflip=True, rot90=True))(chips, {"image": "sar"}, {"image": None}, SEEDS_16)
    dihedral = [np.rot90(flipped, k) for flipped in (image, image[:, ::-1]) for k in range(4)]
    seen = set()
    for chip in turned["image"][:, 0].numpy():
        errors = [np.abs(np.rint(chip * 255) - d).max() for d in dihedral]
        assert min(errors) == 0
        seen.add(int(np.argmin(errors)))
    assert len(seen) >= 5
    affine = BatchAugmenter(AugmentSpec(shift=0.1, scale=0.1, rotate=7.0))
    moved = affine(chips, {"image": "sar"}, {"image": None}, SEEDS_16)
    assert moved["image"].shape == (16, 1, 33, 33) and not torch.equal(moved["image"], chips["image"])


def test_photometry_per_modality() -> None:
    """EO settings act on EO chips only, SAR settings on SAR chips only, in a paired dataset."""
    eo = np.full((2, 16, 16), 128, np.uint8)
    sar = np.full((2, 24, 24), 128, np.uint8)
    for only, changed, unchanged in (({"eo_noise": 0.05}, "eo", "sar"), ({"sar_speckle": 0.2}, "sar", "eo")):
        dataset = PairedChipDataset(eo, sar, np.arange(2), np.arange(2), np.zeros(2), (0, 1), (0, 1),
                                    augment=build_augmenter(only))
        item = dataset[0]
        assert float(item[changed].std()) > 0.01, only
        assert float(item[unchanged].std()) == 0.0 and np.isclose(float(item[unchanged].mean()), 128 / 255), only


def test_window_crop_keeps_scale_and_moves_per_draw() -> None:
    """A 20-px packed chip gives 14-px training windows cut at random offsets, never resampled."""
    image = np.arange(400, dtype=np.uint8).reshape(20, 20)
    dataset = ChipDataset(image[None], np.zeros(1, np.int64), np.zeros(1), (0, 1),
                          augment=build_augmenter({"sar_gamma": 0.0, "hflip": False}), window=14)
    offsets = set()
    for key in range(40):
        window = np.rint(dataset[key]["image"][0].numpy() * 255).astype(int)
        assert window.shape == (14, 14)
        top, left = divmod(int(window[0, 0]), 20)
        np.testing.assert_array_equal(window, image[top : top + 14, left : left + 14])  # a crop, not a resample
        offsets.add((top, left))
    assert len(offsets) > 10 and all(0 <= t <= 6 and 0 <= l <= 6 for t, l in offsets)
    plain = ChipDataset(image[None], np.zeros(1, np.int64), np.zeros(1), (0, 1), window=14)[0]["image"]
    assert plain.shape == (1, 20, 20)  # evaluation keeps the packed chip; the model takes its centre


def test_missing_eo_gives_zeros() -> None:
    dataset = PairedChipDataset(_chips(1, 8), _chips(2, 12), np.array([-1, 0]), np.array([0, 1]), np.array([2, 5]),
                                {"mean": 0.5, "std": 0.25}, (0.5, 0.25), augment=build_augmenter(GEOMETRY_ONLY))
    first, second = dataset[0], dataset[1]
    assert not bool(first["has_eo"]) and torch.count_nonzero(first["eo"]) == 0 and first["eo"].shape == (1, 8, 8)
    assert bool(second["has_eo"]) and second["sar"].shape == (1, 12, 12) and int(second["label"]) == 5
    with pytest.raises(ValueError, match="SAR rows"):
        PairedChipDataset(_chips(1, 8), _chips(2, 12), np.array([0]), np.array([-1]), np.array([0]), (0, 1), (0, 1))


def _batches(dataset: ChipDataset, workers: int, epoch: int) -> list[torch.Tensor]:
    sampler = make_sampler("weighted", dataset.labels, 1.0, num_samples=48, seed=0)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=workers)
    return [batch["image"] for batch in loader]


def test_augmentation_is_reproducible_and_independent_of_workers() -> None:
    augment = build_augmenter(load_config("quick").augment.model_dump())
    dataset = ChipDataset(_chips(20, 12), np.arange(20), np.repeat([0, 1], [17, 3]), (0.5, 0.25), augment, seed=3)
    in_process = _batches(dataset, workers=0, epoch=0)
    with_workers = _batches(dataset, workers=2, epoch=0)
    for a, b in zip(in_process, with_workers, strict=True):
        torch.testing.assert_close(a, b)
    next_epoch = _batches(dataset, workers=0, epoch=1)
    assert not torch.equal(in_process[0], next_epoch[0])
    assert not torch.equal(dataset[0]["image"], dataset[20]["image"])  # the same item drawn twice differs


def test_memmap_datasets_pickle_as_file_references(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "data", classes={"sedan": 30, "van": 10})
    layout = discover_layout(root)
    packed = pack_dataset(layout, 8, 12, cache_dir=tmp_path / "cache", console=Console(file=io.StringIO()))
    index = packed.train_index
    dataset = PairedChipDataset(packed.train_eo, packed.train_sar, index["eo_row"], index["sar_row"], index["class_id"],
                                packed.norm["eo"], packed.norm["sar"])
    blob = pickle.dumps(dataset)
    assert len(blob) < packed.train_sar.nbytes
    copy = pickle.loads(blob)
    assert isinstance(copy.sar_images, np.memmap)
    for key in (0, 17, 39):
        torch.testing.assert_close(copy[key]["sar"], dataset[key]["sar"])
        torch.testing.assert_close(copy[key]["eo"], dataset[key]["eo"])


def test_augment_config_validation() -> None:
    assert build_augmenter(None) is None and build_augmenter({}) is None
    section = load_config("quick").augment.model_dump()
    assert dataclasses.asdict(AugmentSpec.from_config(section)) == {**dataclasses.asdict(AugmentSpec()), **section}
    with pytest.raises(UserError, match="augment.mixup"):
        build_augmenter({"mixup": 0.2})
    with pytest.raises(UserError, match="augment.shift must be a number"):
        build_augmenter({"shift": -0.1})
    with pytest.raises(UserError, match="augment.hflip must be true or false"):
        build_augmenter({"hflip": "yes"})
    with pytest.raises(UserError, match="augment.scale must be below 1"):
        build_augmenter({"scale": 1.5})


def test_stratified_split() -> None:
    labels = np.repeat([0, 1, 2, 3], [100, 10, 2, 1])
    train, val = stratified_split(labels, 0.15, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [15, 2, 1, 0]
    again = stratified_split(labels, 0.15, seed=0)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, stratified_split(labels, 0.15, seed=1)[1])
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(UserError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_persistent_workers_still_change_augmentation_per_epoch() -> None:
    dataset = ChipDataset(_chips(1, 10), np.arange(1), np.zeros(1), (0.5, 0.25), build_augmenter(GEOMETRY_ONLY))
    sampler = make_sampler("uniform", dataset.labels, 0.0, num_samples=4, seed=0)  # the same item at every position
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)  # the workers' copy of the dataset never sees an epoch
        epochs.append(next(iter(loader))["image"])
    assert not torch.equal(epochs[0], epochs[1])
