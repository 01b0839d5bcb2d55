"""Chip geometry: how a chip of any size becomes the model's input window, per modality.

`fit` says how a decoded chip is brought to the packed size: `resize` resamples it (today's classic
choice; it changes the object's scale when chip sizes differ), `crop` centre-crops larger chips and
reflect-pads smaller ones without resampling (every object keeps its physical size), `pad` does the same
with black padding. The packed chip is the model window plus a translation margin on each side: training
draws a random window from it (per-sample random crops, the A-ConvNets trick), evaluation takes the
centre window (done inside the model, see pipeline.models.ChipInput).

A window of `auto` is a fraction of the median chip side, measured on a sample of image headers, at most
`<m>_auto_max` pixels, so one profile serves ~55-px competition chips (whole chip) and 128-px MSTAR chips
(the 88-px A-ConvNets window) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.config import DataConfig

FITS = ("resize", "crop", "pad")
HEADER_SAMPLE = 400  # image headers read to measure the median chip side


@dataclass(frozen=True)
class ChipGeometry:
    """One modality's geometry: packed chip side, model window side, and how chips are fitted."""

    packed: int
    window: int
    fit: str

    @property
    def margin(self) -> int:
        return (self.packed - self.window) // 2

    def as_dict(self) -> dict[str, Any]:
        return {"packed": self.packed, "window": self.window, "fit": self.fit}


def median_side(paths: Iterable[Path | str | None], sample: int = HEADER_SAMPLE) -> int | None:
    """Median of max(h, w) over evenly spaced image headers (None when there are no images)."""
    from PIL import Image

    paths = [p for p in paths if p is not None]
    if not paths:
        return None
    picks = np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(np.int64))
    sides = []
    for i in picks:
        try:
            with Image.open(paths[i]) as image:
                sides.append(max(image.size))
        except (OSError, ValueError):
            continue  # unreadable files are reported by the packer
    return int(np.median(sides)) if sides else None


def resolve_geometry(data_cfg: DataConfig, modality: str, paths: Iterable[Path | str | None]) -> ChipGeometry:
    """The `data.<modality>_size/_fit/_margin` settings (validated by the schema) made concrete for this dataset's chips."""
    g = data_cfg.geometry_keys(modality)
    if g["size"] == "auto":
        median = median_side(paths)
        window = max(8, int(round(g["auto_fraction"] * median))) if median else 32
        if g["auto_max"] is not None:
            window = min(window, g["auto_max"])
    else:
        window = int(g["size"])
    margin = float(g["margin"])
    pixels = int(round(margin * window)) if margin < 1 else int(margin)
    return ChipGeometry(packed=window + 2 * pixels, window=window, fit=g["fit"])
