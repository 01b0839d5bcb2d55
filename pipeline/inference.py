"""TTA forward over a whole dataset: class scores, raw logits and embeddings of every chip.

Used by the infer stage on the test chips and by OOD fitting/selection on the training split, so
that both see exactly the same TTA averaging.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.tta import predict_tta


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Any, cfg: dict, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTA class scores, raw logits and embeddings of every chip of `dataset`, streamed in batches
    (sharded across ranks, gathered), in dataset order. `cfg` is the infer section (batch_size, tta).
    Class scores decide labels (mean logits or log mean probabilities, as `infer.tta.average` says);
    the mean raw logits are what logit OOD scores are computed from."""
    sampler = distributed.ShardSampler(len(dataset)) if distributed.is_distributed() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg["batch_size"]), sampler=sampler, shuffle=False)
    tta = cfg["tta"]
    scores, logits, embs, index = [], [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = predict_tta(model, x, list(tta["views"]), [float(s) for s in tta["scales"]], str(tta["average"]))
        scores.append(out.class_scores.float().cpu())
        logits.append(out.logits.float().cpu())
        embs.append(out.embeddings.float().cpu())
        index.append(torch.as_tensor(batch["index"]))
    scores_np = torch.cat(scores).numpy().astype(np.float64)
    logits_np = torch.cat(logits).numpy().astype(np.float64)
    embs_np = torch.cat(embs).numpy().astype(np.float32)
    index_np = torch.cat(index).numpy().astype(np.int64)
    if distributed.is_distributed():
        scores_np, logits_np, embs_np, index_np = distributed.all_gather_arrays(scores_np, logits_np, embs_np, index_np)
    order = np.argsort(index_np, kind="stable")
    return scores_np[order], logits_np[order], embs_np[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
