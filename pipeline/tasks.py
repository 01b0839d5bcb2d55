"""Training tasks for the one loop in pipeline.train: what is trained, its loss, its validation logits.

- `ClassifierTask`: one model on one modality (EO pretraining; SAR training without a teacher).
- `DistillTask`: SAR student on paired chips, frozen EO teacher (KL on softened logits + features).
- `HeadTask`: only the classification head, on cached embeddings (the backbone is frozen and absent).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from pipeline.losses import DistillationLoss, OutlierExposure, forward_with_outliers
from pipeline.models import ChipClassifier


class ClassifierTask:
    """Supervised training of `model` on batches {"image", "label"} (or {key, "label"})."""

    def __init__(
        self, model: ChipClassifier, loss: nn.Module, image_key: str = "image", outlier_exposure: OutlierExposure | None = None
    ) -> None:
        self.model = model
        self.loss_fn = loss
        self.image_key = image_key
        self.outlier_exposure = outlier_exposure

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def saved_module(self) -> nn.Module:
        return self.model

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits, oe = forward_with_outliers(module or self.model, batch[self.image_key], batch["label"], self.outlier_exposure)
        loss = self.loss_fn(logits, batch["label"])
        if oe is None:
            return loss, {}
        return loss + oe, {"oe": oe.detach()}

    def logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.model(batch[self.image_key]), batch["label"]

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


class _StudentWithProjection(nn.Module):
    """The student and its feature projection as one module, so DDP and the optimizer see both."""

    def __init__(self, student: ChipClassifier, criterion: DistillationLoss) -> None:
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, sar: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.student.embed(sar)
        return self.student.head(emb), emb


class DistillTask:
    """SAR student learns labels + the frozen EO teacher's softened distribution and features."""

    def __init__(
        self, student: ChipClassifier, teacher: ChipClassifier, criterion: DistillationLoss,
        outlier_exposure: OutlierExposure | None = None,
    ) -> None:
        self.outlier_exposure = outlier_exposure
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.wrapper = _StudentWithProjection(student, criterion)

    @property
    def module(self) -> nn.Module:
        return self.wrapper

    @property
    def saved_module(self) -> nn.Module:
        return self.student

    def train_mode(self) -> None:
        self.wrapper.train()
        self.teacher.eval()

    def loss(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        (logits, emb), oe = forward_with_outliers(module or self.wrapper, batch["sar"], batch["label"], self.outlier_exposure)
        t_emb = t_logits = None
        if self.wrapper.criterion.uses_teacher:  # kd_weight and feature_weight 0: the teacher's forward is skipped
            with torch.no_grad():
                t_emb = self.teacher.embed(batch["eo"])
                t_logits = self.teacher.head(t_emb)
        total, parts = self.wrapper.criterion(logits, emb, t_logits, t_emb, batch["label"], batch["has_eo"])
        if oe is not None:
            total, parts = total + oe, {**parts, "oe": oe.detach()}
        return total, parts

    def logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.student(batch["sar"]), batch["label"]

    def state_dict(self) -> dict[str, Tensor]:
        return self.student.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.student.load_state_dict(state)


class HeadTask:
    """Only the head trains; the backbone is frozen (no grad, eval mode so batch-norm statistics stay).

    Batches carry cached embeddings {"emb", "label"} (fast path) or chips {"image", "label"}, which
    are embedded on the fly without gradient (augmented path).
    """

    def __init__(self, model: ChipClassifier, loss: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)

    @property
    def module(self) -> nn.Module:
        return self.model.classifier

    @property
    def saved_module(self) -> nn.Module:
        return self.model

    def train_mode(self) -> None:
        self.model.eval()
        self.model.classifier.train()

    def _embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        if "emb" in batch:
            return batch["emb"]
        with torch.no_grad():
            return self.model.embed(batch["image"])

    def loss(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits = (module or self.model.classifier)(self._embeddings(batch))
        return self.loss_fn(logits, batch["label"]), {}

    def logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.model.classifier(self._embeddings(batch)), batch["label"]

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


class EmbeddingDataset(torch.utils.data.Dataset):
    """Cached embeddings with labels: items {"emb", "label", "index"}; keys are taken modulo the length."""

    def __init__(self, embeddings: Tensor, labels: Tensor) -> None:
        self.embeddings = embeddings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> dict[str, Tensor | int]:
        i = key % len(self.labels)  # samplers yield draw keys: item + n_items * draw
        return {"emb": self.embeddings[i], "label": self.labels[i], "index": i}


@torch.no_grad()
def embed_dataset(
    model: ChipClassifier, dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device,
    image_key: str = "image", epochs: Iterable[int] = (0,),
) -> tuple[Tensor, Tensor]:
    """Embeddings (CPU float32) and labels of every item, once per epoch in `epochs` (augmented copies)."""
    model.eval()
    embs, labels = [], []
    for epoch in epochs:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for batch in loader:
            x = batch[image_key].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embs.append(model.embed(x).float().cpu())
            labels.append(batch["label"])
    return torch.cat(embs), torch.cat(labels)
