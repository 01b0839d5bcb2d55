"""Packed training chips held on the training device, batched and augmented there (torch ops).

On a GPU the DataLoader path (one Python call per chip on the CPU) cannot feed a small model on 55x55
chips; here the uint8 arrays are copied to the device once (full scale: ~1.4 GB SAR + ~0.4 GB EO) and
every batch is gathered, augmented and normalised with a few batched tensor ops. It works on the CPU
too (same code, tensors in RAM), which is how the tests run it.

Augmentation is pipeline.data.augment.BatchAugmenter, the same code and the same per-sample seeding by
(seed, epoch, draw key) as the DataLoader path, so a key is augmented alike on both paths
(tests/test_augment.py checks it, and that every transform draws the spec's distribution).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.data.augment import BatchAugmenter, sample_seeds

Norm = tuple[float, float]
# A batch key's chips: (packed uint8 array, rows of the items in it, (mean, std), modality, window side).
ResidentArray = tuple[np.ndarray, np.ndarray, Norm, str, "int | None"]


class ResidentBatches:
    """An iterable of training batches like a DataLoader's, from chips held on `device`.

    `arrays` maps a batch key ("image", or "eo" and "sar" for pairs) to a ResidentArray (packed uint8
    array, rows of the items in it, (mean, std), modality "eo"/"sar", training window side or None);
    rows of -1 mean "no chip" (an EO-less pair: zeros, has_eo False).
    `sampler` yields draw keys (item = key % n_items), as the samplers in pipeline.data.samplers do.
    """

    def __init__(
        self,
        arrays: dict[str, ResidentArray],
        labels: np.ndarray,
        sampler: torch.utils.data.Sampler,
        batch_size: int,
        device: torch.device,
        augment: BatchAugmenter | None,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.device, self.augment, self.seed = device, augment, seed
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), drop_last
        self.labels = torch.tensor(np.asarray(labels, dtype=np.int64), device=device)  # a copy: labels may be read-only
        self.epoch = 0
        self.chips: dict[str, Tensor] = {}
        self.rows: dict[str, Tensor] = {}
        self.norm: dict[str, Norm] = {}
        self.modality: dict[str, str] = {}
        self.window: dict[str, int | None] = {}
        for key, (images, rows, norm, modality, window) in arrays.items():
            if modality not in ("eo", "sar"):
                raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
            self.modality[key], self.window[key] = modality, window
            rows = np.asarray(rows, dtype=np.int64)
            used = np.unique(rows[rows >= 0])
            # Only the chips these items use travel to the device; rows are renumbered into them.
            self.chips[key] = torch.from_numpy(np.ascontiguousarray(images[used])).to(device)
            self.rows[key] = torch.as_tensor(np.where(rows >= 0, np.searchsorted(used, rows), -1), device=device)
            self.norm[key] = (float(norm[0]), float(norm[1]))
        self.paired = "eo" in arrays and "sar" in arrays

    @property
    def dataset(self) -> "ResidentBatches":
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _chips(self, key: str, items: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows[key][items]
        present = rows >= 0
        chips = self.chips[key][rows.clamp(min=0)].unsqueeze(1).float().mul_(1 / 255)
        return chips * present.view(-1, 1, 1, 1), present

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        keys = np.fromiter(iter(self.sampler), dtype=np.int64)
        device_keys = torch.as_tensor(keys, device=self.device)
        n_items = len(self.labels)
        for b in range(len(self)):
            batch_keys = keys[b * self.batch_size : (b + 1) * self.batch_size]
            items = device_keys[b * self.batch_size : (b + 1) * self.batch_size] % n_items
            batch: dict[str, Tensor] = {"label": self.labels[items], "index": items}
            chips, present = {}, {}
            for key in self.chips:
                chips[key], present[key] = self._chips(key, items)
            if self.augment is not None:
                chips = self.augment(chips, self.modality, self.window, sample_seeds(self.seed, self.epoch, batch_keys))
            for key in self.chips:
                mean, std = self.norm[key]
                images = (chips[key] - mean) / std
                if key == "eo":  # a pair's EO chip (single-modality batches use "image")
                    images = images * present[key].view(-1, 1, 1, 1)
                    batch["has_eo"] = present[key]
                batch[key] = images
            yield batch
