"""Torch datasets over packed uint8 chips: one modality, or EO/SAR pairs with shared geometry.

A dataset is indexed by a draw key (see pipeline.data.samplers): it reads item `key % len(self)` and
seeds that draw's augmentation with np.random.default_rng((seed, epoch, key)), so augmentation is
reproducible and the same whatever the number of DataLoader workers. Plain indices 0..len-1 are keys
too. Memory-mapped arrays travel to spawned workers as file references, not copies.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.augment import Augmenter
from pipeline.errors import UserError

Norm = tuple[float, float] | Mapping[str, float]


def _mean_std(norm: Norm) -> tuple[np.float32, np.float32]:
    mean, std = (norm["mean"], norm["std"]) if isinstance(norm, Mapping) else norm
    return np.float32(mean), np.float32(std)


class _MemmapFile:
    """A picklable reference to a whole read-only .npy memmap; reopened on unpickling."""

    def __init__(self, array: np.memmap) -> None:
        self.filename, self.offset = array.filename, array.offset
        self.shape, self.dtype = array.shape, array.dtype
        self.order = "C" if array.flags.c_contiguous else "F"

    def open(self) -> np.memmap:
        return np.memmap(
            self.filename, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape, order=self.order
        )


def _picklable(array: np.ndarray) -> Any:
    """The array itself, or a file reference when it is a whole memmap (avoids copying it to workers)."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename and array.size:
        return _MemmapFile(array)
    return array


class _EpochSeeded(Dataset):
    """Epoch-aware per-draw random generators and memmap-friendly pickling."""

    _array_fields: tuple[str, ...] = ()

    def __init__(self, labels: np.ndarray, augment: Augmenter | None, seed: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def _rng(self, key: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, key))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._array_fields:
            state[name] = _picklable(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self._array_fields:
            if isinstance(state[name], _MemmapFile):
                state[name] = state[name].open()
        self.__dict__.update(state)


def _normalised(image: np.ndarray, mean: np.float32, std: np.float32) -> torch.Tensor:
    """(1, H, W) float32 tensor of (image - mean) / std; uint8 input is scaled to [0, 1] first."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) * np.float32(1 / 255)
    return torch.from_numpy(((image - mean) / std)[None])


def _check_rows(name: str, rows: np.ndarray, images: np.ndarray, allow_missing: bool) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    low = -1 if allow_missing else 0
    if len(rows) and (rows.min() < low or rows.max() >= len(images)):
        raise ValueError(f"{name} rows must lie in [{low}, {len(images)}), got [{rows.min()}, {rows.max()}]")
    return rows


class ChipDataset(_EpochSeeded):
    """One modality: {"image": (1, H, W) float32 normalised, "label": int64, "index": item}."""

    _array_fields = ("images",)

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        norm: Norm,
        augment: Augmenter | None = None,
        seed: int = 0,
        modality: str = "sar",
        window: int | None = None,
    ) -> None:
        super().__init__(labels, augment, seed)
        self.window = window  # side of the random training window (None: the whole chip)
        if modality not in ("eo", "sar"):
            raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
        self.images = images
        self.rows = _check_rows("image", rows, images, allow_missing=False)
        if len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} rows but {len(self.labels)} labels")
        self.mean, self.std = _mean_std(norm)
        self.modality = modality

    def __getitem__(self, key: int) -> dict[str, Any]:
        index = key % len(self)
        chip = np.asarray(self.images[self.rows[index]])
        if self.augment is not None:
            rng = self._rng(key)
            chip = self.augment(chip, self.augment.sample_geometry(rng), rng, self.modality, self.window)
        return {
            "image": _normalised(chip, self.mean, self.std),
            "label": torch.tensor(self.labels[index]),
            "index": index,
        }


class PairedChipDataset(_EpochSeeded):
    """EO/SAR pairs: {"eo", "sar", "has_eo", "label", "index"}; one geometry per pair, photometry apart.

    An item without EO (eo_row -1) gets an all-zero EO tensor and has_eo False.
    """

    _array_fields = ("eo_images", "sar_images")

    def __init__(
        self,
        eo_images: np.ndarray,
        sar_images: np.ndarray,
        eo_rows: np.ndarray,
        sar_rows: np.ndarray,
        labels: np.ndarray,
        eo_norm: Norm,
        sar_norm: Norm,
        augment: Augmenter | None = None,
        seed: int = 0,
        windows: tuple[int | None, int | None] = (None, None),
    ) -> None:
        super().__init__(labels, augment, seed)
        self.eo_images, self.sar_images = eo_images, sar_images
        self.eo_window, self.sar_window = windows  # random training windows (None: whole chips)
        self.eo_rows = _check_rows("EO", eo_rows, eo_images, allow_missing=True)
        self.sar_rows = _check_rows("SAR", sar_rows, sar_images, allow_missing=False)
        if not len(self.eo_rows) == len(self.sar_rows) == len(self.labels):
            raise ValueError(f"{len(self.eo_rows)} EO rows, {len(self.sar_rows)} SAR rows, {len(self.labels)} labels")
        self.eo_mean, self.eo_std = _mean_std(eo_norm)
        self.sar_mean, self.sar_std = _mean_std(sar_norm)
        eo_shape = eo_images.shape[1:] if augment is None or self.eo_window is None else (self.eo_window,) * 2
        self._eo_zeros = torch.zeros((1, *eo_shape), dtype=torch.float32)

    def _load_pair(self, index: int) -> tuple[np.ndarray | None, np.ndarray]:
        """The uint8 (EO or None, SAR) chips of one item."""
        eo_row = self.eo_rows[index]
        eo = np.asarray(self.eo_images[eo_row]) if eo_row >= 0 else None
        return eo, np.asarray(self.sar_images[self.sar_rows[index]])

    def __getitem__(self, key: int) -> dict[str, Any]:
        index = key % len(self)
        eo, sar = self._load_pair(index)
        if self.augment is not None:
            rng = self._rng(key)
            geometry = self.augment.sample_geometry(rng)
            sar = self.augment(sar, geometry, rng, "sar", self.sar_window)
            if eo is not None:
                eo = self.augment(eo, geometry, rng, "eo", self.eo_window)
        return {
            "eo": self._eo_zeros.clone() if eo is None else _normalised(eo, self.eo_mean, self.eo_std),
            "sar": _normalised(sar, self.sar_mean, self.sar_std),
            "has_eo": torch.tensor(eo is not None),
            "label": torch.tensor(self.labels[index]),
            "index": index,
        }


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, min_per_class: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): about val_fraction of each class, >= 1 of every class with >= 2 items.

    `min_per_class` raises a rare class's share to that many validation chips, but never above a third
    of the class, so the tail keeps most of its chips for training while its recall is measured on more
    than a handful (6 chips measure recall in steps of 0.17)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) or min_per_class < 0:
        raise UserError(f"data.val_min_per_class must be an integer >= 0, got {min_per_class!r}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val_parts = []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if val_fraction == 0 or len(members) < 2:
            continue
        n_val = max(1, int(round(len(members) * val_fraction)), min(int(min_per_class), len(members) // 3))
        n_val = min(n_val, len(members) - 1)
        val_parts.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val
