"""Torch datasets over packed uint8 chips: one modality, or EO/SAR pairs with shared geometry.

A dataset is indexed by a draw key (see pipeline.data.samplers): it reads item `key % len(self)`. A
DataLoader fetches a whole batch of keys through `__getitems__`, which augments the batch at once with
pipeline.data.augment.BatchAugmenter (the same code as the device-resident path); each item's draws
are seeded by (seed, epoch, its key), so augmentation is reproducible and the same whatever the batch,
the number of workers or of DDP ranks. `dataset[key]` is a batch of one. Plain indices 0..len-1 are keys too. Memory-mapped arrays travel to
spawned workers as file references, not copies.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.augment import BatchAugmenter, sample_seeds
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
    """Epoch-aware, batch-augmented datasets with memmap-friendly pickling.

    Subclasses say which uint8 chips a batch of items has (`_chips`) and how a batch becomes items
    (`_items`); augmentation and normalisation happen here, once per batch."""

    _array_fields: tuple[str, ...] = ()

    def __init__(self, labels: np.ndarray, augment: BatchAugmenter | None, seed: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.norm: dict[str, tuple[np.float32, np.float32]] = {}  # batch key -> (mean, std)
        self.modality: dict[str, str] = {}  # batch key -> "eo" | "sar"
        self.window: dict[str, int | None] = {}  # batch key -> training window side (None: whole chip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        """The items of a batch of draw keys (DataLoader calls this with a whole batch), augmented together."""
        keys = np.asarray(keys, dtype=np.int64)
        items = keys % len(self)
        chips, present = self._chips(items)
        batch = {key: torch.from_numpy(array).unsqueeze(1).float().mul_(1 / 255) for key, array in chips.items()}
        if self.augment is not None:
            batch = self.augment(batch, self.modality, self.window, sample_seeds(self.seed, self.epoch, keys))
        for key, (mean, std) in self.norm.items():
            batch[key] = (batch[key] - mean) / std
            if key in present:
                batch[key] *= torch.from_numpy(present[key]).view(-1, 1, 1, 1)
        return self._items(batch, items, present)

    @abc.abstractmethod
    def _chips(self, items: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """uint8 chips (n, H, W) per batch key, and a presence mask for keys that may lack a chip."""

    @abc.abstractmethod
    def _items(
        self, batch: dict[str, torch.Tensor], items: np.ndarray, present: dict[str, np.ndarray]
    ) -> list[dict[str, Any]]:
        """The per-item dicts of an augmented, normalised batch (what the DataLoader collates)."""

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
        augment: BatchAugmenter | None = None,
        seed: int = 0,
        modality: str = "sar",
        window: int | None = None,
    ) -> None:
        super().__init__(labels, augment, seed)
        if modality not in ("eo", "sar"):
            raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
        self.images = images
        self.rows = _check_rows("image", rows, images, allow_missing=False)
        if len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} rows but {len(self.labels)} labels")
        self.norm["image"] = _mean_std(norm)
        self.modality["image"] = modality
        self.window["image"] = window  # side of the random training window (None: the whole chip)

    def _chips(self, items: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return {"image": np.asarray(self.images[self.rows[items]])}, {}

    def _items(
        self, batch: dict[str, torch.Tensor], items: np.ndarray, present: dict[str, np.ndarray]
    ) -> list[dict[str, Any]]:
        return [
            {"image": image, "label": torch.tensor(self.labels[item]), "index": int(item)}
            for image, item in zip(batch["image"], items)
        ]


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
        augment: BatchAugmenter | None = None,
        seed: int = 0,
        windows: tuple[int | None, int | None] = (None, None),
    ) -> None:
        super().__init__(labels, augment, seed)
        self.eo_images, self.sar_images = eo_images, sar_images
        self.eo_rows = _check_rows("EO", eo_rows, eo_images, allow_missing=True)
        self.sar_rows = _check_rows("SAR", sar_rows, sar_images, allow_missing=False)
        if not len(self.eo_rows) == len(self.sar_rows) == len(self.labels):
            raise ValueError(f"{len(self.eo_rows)} EO rows, {len(self.sar_rows)} SAR rows, {len(self.labels)} labels")
        self.norm.update(eo=_mean_std(eo_norm), sar=_mean_std(sar_norm))
        self.modality.update(eo="eo", sar="sar")
        self.window.update(eo=windows[0], sar=windows[1])  # random training windows (None: whole chips)
        self._eo_shape = eo_images.shape[1:]

    def _load_pair(self, index: int) -> tuple[np.ndarray | None, np.ndarray]:
        """The uint8 (EO or None, SAR) chips of one item."""
        eo_row = self.eo_rows[index]
        eo = np.asarray(self.eo_images[eo_row]) if eo_row >= 0 else None
        return eo, np.asarray(self.sar_images[self.sar_rows[index]])

    def _chips(self, items: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        pairs = [self._load_pair(int(item)) for item in items]
        has_eo = np.array([eo is not None for eo, _ in pairs], dtype=bool)
        blank = np.zeros(self._eo_shape, np.uint8)
        eo = np.stack([blank if chip is None else chip for chip, _ in pairs])
        return {"eo": eo, "sar": np.stack([sar for _, sar in pairs])}, {"eo": has_eo}

    def _items(
        self, batch: dict[str, torch.Tensor], items: np.ndarray, present: dict[str, np.ndarray]
    ) -> list[dict[str, Any]]:
        return [
            {"eo": eo, "sar": sar, "has_eo": torch.tensor(bool(has_eo)), "label": torch.tensor(self.labels[item]),
             "index": int(item)}
            for eo, sar, has_eo, item in zip(batch["eo"], batch["sar"], present["eo"], items)
        ]


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, min_per_class: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): about val_fraction of each class, >= 1 of every class with >= 2 items.

    `min_per_class` raises a rare class's share to that many validation chips, but never above a third
    of the class, so the tail keeps most of its chips for training while its recall is measured on more
    than a handful (6 chips measure recall in steps of 0.17). `fold` f takes block f of each class's seeded
    permutation (f = 0: the default split): with val_fraction 1/k and no floor, folds 0..k-1 are k-fold
    cross-validation, disjoint up to rounding (a last block that runs past the class wraps to its start)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
        raise UserError(f"data.val_fold must be an integer >= 0, got {fold!r}")
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
        if fold * n_val >= len(members):
            raise UserError(f"data.val_fold {fold}: class {class_id} has {len(members)} training items and {n_val} per "
                            f"validation fold, so folds 0-{(len(members) - 1) // n_val} only")
        val_parts.append(np.take(rng.permutation(members), np.arange(fold * n_val, (fold + 1) * n_val), mode="wrap"))
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val
