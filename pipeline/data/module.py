"""A stage's data: the split, datasets, loaders, samplers and normalisation over one packed dataset.

`StageData` owns everything between the packed arrays and a batch, so a stage script asks it for
"validation SAR chips" or "training pairs" instead of assembling them from the layout, the pack and
the config itself. The split is computed once and is the same for every stage (seeded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import distributed
from pipeline.config import Config, TrainConfig
from pipeline.data.augment import AugmentSpec, BatchAugmenter
from pipeline.data.datasets import ChipDataset, PairedChipDataset, stratified_split
from pipeline.data.geometry import ChipGeometry
from pipeline.data.pack import PackedData
from pipeline.data.resident import ResidentBatches
from pipeline.data.samplers import make_sampler
from pipeline.errors import UserError
from pipeline.log import get_logger

log = get_logger(__name__)

MIN_CAPPED_BATCH = 16  # min_steps_per_epoch never lowers a batch below this (batch norm needs a few chips)

MODALITIES = ("eo", "sar")


@dataclass
class StageData:
    """The packed training/test chips of one dataset, with the config that says how to serve them."""

    packed: PackedData
    cfg: Config
    geometry: dict[str, ChipGeometry]
    device: torch.device
    source: str = "the dataset"  # the data root, for messages
    _split: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def labels(self) -> np.ndarray:
        return self.packed.train_index["class_id"].to_numpy()

    def norm(self, modality: str) -> tuple[float, float]:
        n = self.packed.norm[modality]
        return n["mean"], n["std"]

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions in `train_index` of the stratified train / validation split, the same for every stage."""
        if self._split is None:
            d = self.cfg.data
            self._split = stratified_split(self.labels, d.val_fraction, self.seed, d.val_min_per_class, d.val_fold)
        return self._split

    def train_val_rows(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """The split restricted to rows that have a chip of `modality` ("eo" or "sar")."""
        has = self.packed.train_index[f"{modality}_row"].to_numpy() >= 0
        train, val = self.split()
        train, val = train[has[train]], val[has[val]]
        if len(train) == 0:
            raise UserError(f"no {modality.upper()} training chips in {self.source}")
        if len(val) == 0:
            raise UserError(f"the validation split has no {modality.upper()} chips: raise data.val_fraction or add data")
        return train, val

    def val_table(self) -> pd.DataFrame:
        _, val = self.split()
        return self.packed.train_index.iloc[np.sort(val)][["name", "class_id"]]

    def split_digest(self) -> str:
        """sha256 of the validation split (names and classes): equal digests mean the same split."""
        return hashlib.sha256(self.val_table().to_csv(index=False).encode()).hexdigest()

    def class_counts(self, rows: np.ndarray, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels[rows], minlength=num_classes)

    def augmenter(self) -> BatchAugmenter:
        """The one augmentation of both paths, from the (validated) augment section."""
        return BatchAugmenter(AugmentSpec(**self.cfg.augment.model_dump()))

    def _augmenter(self, augment: bool) -> BatchAugmenter | None:
        return self.augmenter() if augment else None

    def chip_dataset(self, modality: str, rows: np.ndarray, augment: bool) -> ChipDataset:
        """Single-modality chips of training `rows` (positions in train_index), augmented or not."""
        index = self.packed.train_index.iloc[rows]
        images = self.packed.train_eo if modality == "eo" else self.packed.train_sar
        return ChipDataset(
            images, index[f"{modality}_row"].to_numpy(), index["class_id"].to_numpy(), norm=self.norm(modality),
            augment=self._augmenter(augment), seed=self.seed, modality=modality, window=self.geometry[modality].window,
        )

    def paired_dataset(self, rows: np.ndarray, augment: bool) -> PairedChipDataset:
        """(EO, SAR) pairs of training `rows`; both chips of a pair get the same geometry."""
        index = self.packed.train_index.iloc[rows]
        return PairedChipDataset(
            self.packed.train_eo, self.packed.train_sar, index["eo_row"].to_numpy(), index["sar_row"].to_numpy(),
            index["class_id"].to_numpy(), eo_norm=self.norm("eo"), sar_norm=self.norm("sar"),
            augment=self._augmenter(augment), seed=self.seed,
            windows=(self.geometry["eo"].window, self.geometry["sar"].window),
        )

    def test_dataset(self, norm: tuple[float, float]) -> ChipDataset:
        """The SAR test chips in test-index order (unknown labels as 0), normalised like the model's training."""
        test = self.packed.test_index
        if len(test) == 0:
            raise UserError(f"no test chips found under {self.source}: nothing to predict")
        labels = test["class_id"].to_numpy()
        return ChipDataset(self.packed.test_sar, test["sar_row"].to_numpy(), np.maximum(labels, 0), norm=norm, augment=None, seed=self.seed)

    def sampler(self, rows: np.ndarray, train_cfg: TrainConfig) -> Sampler:
        """The stage's sampler (weighted / balanced / uniform) over training `rows`, sharded across ranks."""
        return self.sampler_for(self.labels[rows], train_cfg)

    def sampler_for(self, labels: np.ndarray, train_cfg: TrainConfig) -> Sampler:
        """The stage's sampler over items with these labels (e.g. training rows plus pseudo-labelled chips)."""
        return make_sampler(
            train_cfg.sampler.kind, np.asarray(labels), train_cfg.sampler.power,
            num_samples=samples_per_epoch(train_cfg, len(labels)), seed=self.seed,
            rank=distributed.rank(), world_size=distributed.world_size(),
        )

    def train_batches(self, rows: np.ndarray, kind: str, train_cfg: TrainConfig) -> Iterable[dict[str, torch.Tensor]]:
        """Training batches of `rows` with the stage's sampler; kind: "eo" | "sar" (one chip) or "paired".

        With `data.resident` the packed chips are held on the training device and augmented there in
        batches; otherwise a DataLoader over the augmented dataset.
        """
        sampler = self.sampler(rows, train_cfg)
        batch = self.train_batch_size(train_cfg, len(rows))
        if not self.cfg.data.resident:
            dataset = self.paired_dataset(rows, augment=True) if kind == "paired" else self.chip_dataset(kind, rows, augment=True)
            return self.loader(dataset, batch, sampler)
        index = self.packed.train_index.iloc[rows]
        arrays = {}
        for modality in MODALITIES if kind == "paired" else (kind,):
            images = self.packed.train_eo if modality == "eo" else self.packed.train_sar
            key = modality if kind == "paired" else "image"
            arrays[key] = (images, index[f"{modality}_row"].to_numpy(), self.norm(modality), modality,
                           self.geometry[modality].window)
        return ResidentBatches(arrays, index["class_id"].to_numpy(), sampler, batch, self.device, self.augmenter(), self.seed)

    def train_batch_size(self, train_cfg: TrainConfig, n_train: int) -> int:
        """`train_batch_size`, with a log line when min_steps_per_epoch lowered it."""
        batch = train_batch_size(train_cfg, n_train)
        if batch != train_cfg.batch_size:
            log.info(f"batch size {train_cfg.batch_size} -> {batch}: {n_train} training items, "
                     f"min_steps_per_epoch {train_cfg.min_steps_per_epoch}")
        return batch

    def loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None, train: bool = True) -> DataLoader:
        """A DataLoader with the config's workers, pinned memory on CUDA, whole batches when training."""
        if sampler is None and not train and distributed.is_distributed():
            sampler = distributed.ShardSampler(len(dataset))  # each rank scores its share; fit gathers them
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=train and len(dataset) > batch_size, persistent_workers=False,
        )


def train_batch_size(train_cfg: TrainConfig, n_train: int) -> int:
    """The batch size of a training pass over `n_train` items: batch_size, lowered (not below 16) so that each
    process takes at least `min_steps_per_epoch` steps when that is set and steps_per_epoch is not."""
    batch = train_cfg.batch_size
    if train_cfg.min_steps_per_epoch is None or train_cfg.steps_per_epoch is not None:
        return batch
    per_process = n_train // distributed.world_size()
    return max(min(batch, per_process // train_cfg.min_steps_per_epoch), min(batch, MIN_CAPPED_BATCH))


def samples_per_epoch(train_cfg: TrainConfig, n_train: int) -> int:
    """Samples drawn per epoch: steps_per_epoch x batch_size, or one pass over the training rows."""
    if train_cfg.steps_per_epoch:
        return train_cfg.steps_per_epoch * train_cfg.batch_size
    return n_train
