"""Packed training chips held on the training device, batched and augmented there (torch ops).

On a GPU the DataLoader path (one Python call per chip, albumentations on the CPU) cannot feed a small
model on 55x55 chips; here the uint8 arrays are copied to the device once (full scale: ~1.4 GB SAR +
~0.4 GB EO) and every batch is gathered, augmented and normalised with a few batched tensor ops.
It works on the CPU too (same code, tensors in RAM), which is how the tests run it.

The augmentation follows the `augment` section like pipeline.data.augment, but batched: one affine
matrix per sample (flips, quarter turns, shift, zoom, small rotation) applied with grid_sample in
normalised coordinates, so an EO chip and its SAR partner of another size move together, then the random
training window (same relative position for both chips of a pair); photometry per modality (EO
brightness/contrast and Gaussian noise, SAR uniform multiplicative speckle and gamma), drawn from the
same distributions as the loader path (tests/test_resident.py checks the moments).
Random draws come from a torch.Generator seeded by (seed, epoch, batch), so a run is reproducible.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.augment import AugmentConfig, speckle_half_width

Norm = tuple[float, float]
# A batch key's chips: (packed uint8 array, rows of the items in it, (mean, std), modality, window side).
ResidentArray = tuple[np.ndarray, np.ndarray, Norm, str, "int | None"]


def _generator(device: torch.device, seed: int, epoch: int, batch: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence((seed, epoch, batch)).generate_state(1, np.uint64)[0] >> 1))
    return gen


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def affine_matrices(cfg: AugmentConfig, n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, 2, 3) matrices for F.affine_grid mapping output to input coordinates in [-1, 1]."""
    u = torch.rand(n, 7, generator=gen, device=device)  # crop positions are drawn apart (crop_positions)
    sx = torch.where((u[:, 0] < 0.5) & cfg.hflip, -1.0, 1.0)
    sy = torch.where((u[:, 1] < 0.5) & cfg.vflip, -1.0, 1.0)
    turns = (u[:, 2] * 4).floor() if cfg.rot90 else torch.zeros(n, device=device)
    angle = turns * (math.pi / 2) + (2 * u[:, 3] - 1) * math.radians(cfg.rotate)
    zoom = 1 + (2 * u[:, 4] - 1) * cfg.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, 0, 2] = (2 * u[:, 5] - 1) * cfg.shift * 2
    theta[:, 1, 2] = (2 * u[:, 6] - 1) * cfg.shift * 2
    return theta


def warp(images: Tensor, theta: Tensor) -> Tensor:
    """Apply per-sample affine matrices to (n, 1, H, W) images (bilinear, reflected borders)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop_positions(n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, 2) window positions (x, y) in [0, 1], shared by the chips of one sample."""
    return torch.rand(n, 2, generator=gen, device=device)


def crop_windows(images: Tensor, window: int | None, positions: Tensor) -> Tensor:
    """Per-sample window x window crops of (n, 1, H, W) images at relative `positions` (see augment.crop_window)."""
    n, _, h, w = images.shape
    if window is None or (h <= window and w <= window):
        return images
    steps = torch.arange(window, device=images.device)
    top = (positions[:, 1] * max(h - window, 0)).round().long()
    left = (positions[:, 0] * max(w - window, 0)).round().long()
    rows = (top[:, None] + steps)[:, :, None]
    cols = (left[:, None] + steps)[:, None, :]
    return images[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def photometry(images: Tensor, modality: str, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Per-modality photometric noise on [0, 1] images, clamped back to [0, 1]."""
    n, device = images.shape[0], images.device
    shape = (n, 1, 1, 1)
    if modality == "eo":
        if cfg.eo_brightness_contrast:
            v = cfg.eo_brightness_contrast
            contrast = _uniform(n, 1 - v, 1 + v, gen, device).view(shape)
            brightness = _uniform(n, -v, v, gen, device).view(shape)
            images = images * contrast + brightness
        if cfg.eo_noise:
            sigma = _uniform(n, 0.0, cfg.eo_noise, gen, device).view(shape)
            images = images + sigma * torch.randn(images.shape, generator=gen, device=device)
    else:
        if cfg.sar_speckle:
            half = speckle_half_width(cfg)
            images = images * (1 + half * (2 * torch.rand(images.shape, generator=gen, device=device) - 1))
        if cfg.sar_gamma:
            gamma = _uniform(n, 1 - cfg.sar_gamma, 1 + cfg.sar_gamma, gen, device).view(shape)
            images = images.clamp(0, 1) ** gamma
    return images.clamp(0, 1)


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
        augment: AugmentConfig | None,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.device, self.augment, self.seed = device, augment, seed
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), drop_last
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
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
        keys = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64), device=self.device)
        n_items = len(self.labels)
        for b in range(len(self)):
            batch_keys = keys[b * self.batch_size : (b + 1) * self.batch_size]
            items = batch_keys % n_items
            gen = _generator(self.device, self.seed, self.epoch, b)
            theta = affine_matrices(self.augment, len(items), gen, self.device) if self.augment else None
            positions = crop_positions(len(items), gen, self.device) if self.augment else None
            batch: dict[str, Tensor] = {"label": self.labels[items], "index": items}
            for key in self.chips:
                chips, present = self._chips(key, items)
                if self.augment is not None:
                    chips = crop_windows(warp(chips, theta), self.window[key], positions)
                    chips = photometry(chips, self.modality[key], self.augment, gen)
                mean, std = self.norm[key]
                chips = (chips - mean) / std
                if key == "eo":  # a pair's EO chip (single-modality batches use "image")
                    chips = chips * present.view(-1, 1, 1, 1)
                    batch["has_eo"] = present
                batch[key] = chips
            yield batch
