"""Training augmentation: geometry shared by chips of different sizes, photometry per modality.

Geometric parameters (flips, 90-degree turns, shift and zoom as fractions of the chip, a small
rotation, and the position of the training window inside the packed chip) are sampled once per sample
and applied to each chip at its own size, so an EO chip of 32 px and its SAR partner of 56 px move
together. The window crop is the translation augmentation of pipeline.data.geometry: a packed chip
of side P gives a random window of side W (the model's input); evaluation takes the centre window. Photometric changes (albumentations) are drawn
independently per modality: brightness/contrast and Gaussian noise on EO, multiplicative speckle and
a random gamma on SAR. Every draw comes from the numpy Generator the caller passes in.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from pipeline.errors import UserError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never look for updates over the network
import albumentations as A  # noqa: E402


@dataclass(frozen=True)
class AugmentConfig:
    """The `augment` section of a profile; 0 / false switches a transform off."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    shift: float = 0.0  # max translation, fraction of the chip size
    scale: float = 0.0  # max relative zoom in/out
    rotate: float = 0.0  # max extra rotation in degrees
    eo_brightness_contrast: float = 0.0
    eo_noise: float = 0.0  # max std of additive Gaussian noise on [0, 1] EO
    sar_speckle: float = 0.0  # std of the multiplicative noise on SAR
    sar_gamma: float = 0.0  # gamma drawn from [1 - g, 1 + g]

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "AugmentConfig":
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise UserError(f"augment.{key} is not an augmentation setting: expected one of {', '.join(known)}")
            if known[key] == "bool":
                if not isinstance(value, bool):
                    raise UserError(f"augment.{key} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value:
                raise UserError(f"augment.{key} must be a number >= 0, got {value!r}")
            values[key] = value
        config = cls(**values)
        for key in ("scale", "sar_gamma", "sar_speckle"):
            if getattr(config, key) >= 1:
                raise UserError(f"augment.{key} must be below 1, got {getattr(config, key)}")
        return config

    @property
    def has_geometry(self) -> bool:
        return bool(self.hflip or self.vflip or self.rot90 or self.shift or self.scale or self.rotate)


@dataclass(frozen=True)
class Geometry:
    """One sample's geometric transform, relative to the chip size so it fits any size."""

    hflip: bool = False
    vflip: bool = False
    quarter_turns: int = 0  # counter-clockwise 90-degree turns
    shift_x: float = 0.0  # fraction of the width
    shift_y: float = 0.0  # fraction of the height
    scale: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise
    crop_x: float = 0.5  # window position in [0, 1] along the width (0.5 = centred)
    crop_y: float = 0.5  # window position in [0, 1] along the height

    @property
    def has_affine(self) -> bool:
        return self.shift_x != 0 or self.shift_y != 0 or self.scale != 1 or self.angle != 0


def sample_geometry(config: AugmentConfig, rng: np.random.Generator) -> Geometry:
    """Draw one Geometry; a switched-off transform keeps its identity value."""
    u = rng.random(9)  # a fixed number of draws whatever is switched on
    return Geometry(
        hflip=bool(config.hflip and u[0] < 0.5),
        vflip=bool(config.vflip and u[1] < 0.5),
        quarter_turns=int(u[2] * 4) if config.rot90 else 0,
        shift_x=float((2 * u[3] - 1) * config.shift),
        shift_y=float((2 * u[4] - 1) * config.shift),
        scale=float(1 + (2 * u[5] - 1) * config.scale),
        angle=float((2 * u[6] - 1) * config.rotate),
        crop_x=float(u[7]),
        crop_y=float(u[8]),
    )


def window_offset(side: int, window: int, position: float) -> int:
    """Top/left offset of a `window` inside `side` pixels at relative `position` in [0, 1]."""
    return int(round(position * max(side - window, 0)))


def crop_window(image: np.ndarray, window: int | None, geometry: Geometry) -> np.ndarray:
    """The window x window part of `image` at the geometry's crop position (all of it if not larger)."""
    h, w = image.shape[:2]
    if window is None or (h <= window and w <= window):
        return image
    top, left = window_offset(h, window, geometry.crop_y), window_offset(w, window, geometry.crop_x)
    return np.ascontiguousarray(image[top : top + window, left : left + window])


def apply_geometry(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Apply flips, quarter turns, then shift/zoom/rotation about the centre (reflected borders)."""
    if geometry.hflip:
        image = image[:, ::-1]
    if geometry.vflip:
        image = image[::-1, :]
    if geometry.quarter_turns:
        image = np.rot90(image, geometry.quarter_turns)
    image = np.ascontiguousarray(image)
    if not geometry.has_affine:
        return image
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), geometry.angle, geometry.scale)
    matrix[0, 2] += geometry.shift_x * w
    matrix[1, 2] += geometry.shift_y * h
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _eo_photometry(config: AugmentConfig) -> A.Compose | None:
    steps: list[A.BasicTransform] = []
    if config.eo_brightness_contrast:
        limit = config.eo_brightness_contrast
        steps.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=1.0))
    if config.eo_noise:
        steps.append(A.GaussNoise(std_range=(0.0, config.eo_noise), p=1.0))
    return A.Compose(steps) if steps else None


def speckle_half_width(config: AugmentConfig) -> float:
    """Speckle is a multiplier drawn uniformly from [1 - h, 1 + h] with std sar_speckle (both paths)."""
    return min(config.sar_speckle * math.sqrt(3), 0.99)


def _sar_photometry(config: AugmentConfig) -> A.Compose | None:
    steps: list[A.BasicTransform] = []
    if config.sar_speckle:
        half_width = speckle_half_width(config)
        steps.append(A.MultiplicativeNoise(multiplier=(1 - half_width, 1 + half_width), elementwise=True, p=1.0))
    if config.sar_gamma:
        g = config.sar_gamma
        steps.append(A.RandomGamma(gamma_limit=(100 * (1 - g), 100 * (1 + g)), p=1.0))
    return A.Compose(steps) if steps else None


class Augmenter:
    """Samples a Geometry per sample and augments uint8 chips into float32 [0, 1] chips."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        self._photometry = {"eo": _eo_photometry(config), "sar": _sar_photometry(config)}

    def sample_geometry(self, rng: np.random.Generator) -> Geometry:
        return sample_geometry(self.config, rng)

    def __call__(
        self, chip: np.ndarray, geometry: Geometry, rng: np.random.Generator, modality: str, window: int | None = None
    ) -> np.ndarray:
        """Augment one uint8 chip of `modality` ('eo' or 'sar') with `geometry`, cut to `window`; float32 in [0, 1]."""
        image = crop_window(apply_geometry(chip, geometry), window, geometry).astype(np.float32) * np.float32(1 / 255)
        photometry = self._photometry[modality]
        if photometry is not None:
            photometry.set_random_state(rng, random.Random(int(rng.integers(2**63))))
            image = np.clip(photometry(image=image)["image"], 0.0, 1.0, dtype=np.float32)
        return image


def build_augmenter(aug_cfg: dict[str, Any] | None) -> Augmenter | None:
    """An Augmenter for the `augment` config section; None when the section is empty or null."""
    if not aug_cfg:
        return None
    return Augmenter(AugmentConfig.from_dict(aug_cfg))
