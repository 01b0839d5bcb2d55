"""Training augmentation: one specification (AugmentSpec) and one batched implementation (BatchAugmenter).

Both training paths use the same code: the DataLoader path (pipeline.data.datasets) augments each
batch of draw keys in the dataset's `__getitems__`, the device-resident path (pipeline.data.resident)
augments each batch on the device. A batch's random draws are seeded by (seed, epoch, its draw keys),
so the same batch gets the same augmentation on either path, whatever the number of workers.

Per sample: one geometry shared by the chips of a pair (flips, quarter turns, then shift / zoom /
small rotation about the centre with reflected borders, all relative to the chip size so an EO chip of
32 px and its SAR partner of 56 px move together), then the random training window (the translation
augmentation of pipeline.data.geometry: a packed chip of side P gives a window of side W at the same
relative position for both chips; evaluation takes the centre window inside the model), then
photometry drawn apart per modality: EO contrast x brightness and Gaussian noise, SAR multiplicative
speckle and gamma. Chips are float [0, 1] tensors (n, 1, H, W); the result is clamped to [0, 1].

kornia.augmentation does every transform whose sampling is exactly what the setting means (flips,
shift/zoom/rotation, contrast, brightness, gamma); the few hand-written ones (quarter turns, window crop,
speckle, Gaussian noise with a per-sample std) say why next to their code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import kornia.augmentation as K
import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError

MODALITIES = ("eo", "sar")
GEOMETRY_SETTINGS = ("hflip", "vflip", "rot90", "shift", "scale", "rotate")  # shared by both chips of a pair
PHOTOMETRY_SETTINGS = {"eo": ("eo_brightness_contrast", "eo_noise"), "sar": ("sar_speckle", "sar_gamma")}
_BELOW_ONE = ("shift", "scale", "sar_gamma", "sar_speckle")
_AT_MOST_ONE = ("eo_brightness_contrast",)  # a contrast factor 1 - v must stay >= 0


@dataclass(frozen=True)
class AugmentSpec:
    """The `augment` section of a profile: which transforms act on which modality, with which ranges.

    0 / false switches a transform off. The `*_range` properties are the one place a setting becomes a
    sampling range; BatchAugmenter reads nothing else.
    """

    hflip: bool = False  # p = 0.5
    vflip: bool = False  # p = 0.5
    rot90: bool = False  # 0, 1, 2 or 3 counter-clockwise quarter turns, equally likely
    shift: float = 0.0  # max translation, fraction of the chip size
    scale: float = 0.0  # max relative zoom in/out
    rotate: float = 0.0  # max extra rotation in degrees
    eo_brightness_contrast: float = 0.0  # x * U(1-v, 1+v) + U(-v, v)
    eo_noise: float = 0.0  # max std of additive Gaussian noise on [0, 1] EO (std drawn per sample)
    sar_speckle: float = 0.0  # std of the uniform multiplicative noise on SAR
    sar_gamma: float = 0.0  # gamma drawn from [1 - g, 1 + g]

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "AugmentSpec":
        """The spec of an `augment` config section (None or {}: everything off); bad values raise UserError."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in (section or {}).items():
            if key not in known:
                raise UserError(f"augment.{key} is not an augmentation setting: expected one of {', '.join(known)}")
            if known[key] == "bool":
                if not isinstance(value, bool):
                    raise UserError(f"augment.{key} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value:
                raise UserError(f"augment.{key} must be a number >= 0, got {value!r}")
            values[key] = value
        spec = cls(**values)
        for key in _BELOW_ONE:
            if getattr(spec, key) >= 1:
                raise UserError(f"augment.{key} must be below 1, got {getattr(spec, key)}")
        for key in _AT_MOST_ONE:
            if getattr(spec, key) > 1:
                raise UserError(f"augment.{key} must be at most 1, got {getattr(spec, key)}")
        return spec

    @property
    def has_geometry(self) -> bool:
        return any(getattr(self, key) for key in GEOMETRY_SETTINGS)

    def transforms(self, modality: str) -> tuple[str, ...]:
        """The settings switched on for chips of `modality` ('eo' or 'sar'), in the order they apply."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
        return tuple(key for key in (*GEOMETRY_SETTINGS, *PHOTOMETRY_SETTINGS[modality]) if getattr(self, key))

    # The sampling ranges (uniform between the two ends).
    @property
    def shift_range(self) -> tuple[float, float]:
        """Translation, fraction of the chip side."""
        return (-self.shift, self.shift)

    @property
    def zoom_range(self) -> tuple[float, float]:
        return (1 - self.scale, 1 + self.scale)

    @property
    def angle_range(self) -> tuple[float, float]:
        """Extra rotation in degrees."""
        return (-self.rotate, self.rotate)

    @property
    def contrast_range(self) -> tuple[float, float]:
        return (1 - self.eo_brightness_contrast, 1 + self.eo_brightness_contrast)

    @property
    def brightness_range(self) -> tuple[float, float]:
        """Added to [0, 1] EO."""
        return (-self.eo_brightness_contrast, self.eo_brightness_contrast)

    @property
    def noise_std_range(self) -> tuple[float, float]:
        return (0.0, self.eo_noise)

    @property
    def speckle_range(self) -> tuple[float, float]:
        """Per-pixel multiplier: uniform with std sar_speckle (half-width sqrt(3) std, kept below 1)."""
        half_width = min(self.sar_speckle * math.sqrt(3), 0.99)
        return (1 - half_width, 1 + half_width)

    @property
    def gamma_range(self) -> tuple[float, float]:
        return (1 - self.sar_gamma, 1 + self.sar_gamma)


def batch_seed(seed: int, epoch: int, keys: Sequence[int] | np.ndarray) -> int:
    """The seed of one batch's augmentation: a hash of (seed, epoch, its draw keys)."""
    entropy = [int(seed), int(epoch), *np.asarray(keys, dtype=np.int64).tolist()]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def window_positions(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n, 2) window positions (x, y) in [0, 1], shared by the chips of one sample."""
    return torch.rand(n, 2, generator=generator, device=device)


def crop_windows(images: Tensor, window: int | None, positions: Tensor) -> Tensor:
    """Per-sample window x window crops of (n, 1, H, W) images at relative `positions` (all of it if not larger).

    Hand-written: kornia's RandomCrop draws pixel offsets for one input size, and the two chips of a pair
    (two sizes) need one relative position."""
    n, _, h, w = images.shape
    if window is None or (h <= window and w <= window):
        return images
    steps = torch.arange(window, device=images.device)
    top = (positions[:, 1] * max(h - window, 0)).round().long()
    left = (positions[:, 0] * max(w - window, 0)).round().long()
    rows = (top[:, None] + steps)[:, :, None]
    cols = (left[:, None] + steps)[:, None, :]
    return images[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def quarter_turns(images: Tensor, turns: Tensor) -> Tensor:
    """(n, 1, S, S) square images turned `turns[i]` (0-3) times 90 degrees counter-clockwise, exactly.

    Hand-written: kornia's RandomRotation90 resamples with a bilinear warp (slower, not bit-exact) and
    rounds a continuous draw, which makes 0 and 3 turns half as likely as 1 and 2 for times=(0, 3)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"quarter turns need square chips, got {tuple(images.shape[-2:])}")
    out = images.clone()
    turns = turns.to(images.device)
    for k in (1, 2, 3):
        picked = (turns == k).nonzero().flatten()
        if len(picked):
            out[picked] = torch.rot90(images[picked], k, dims=(-2, -1))
    return out


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, one intra-op thread for the batch's small ops: more only contend (README, Augmentation)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _resized_affine(params: dict[str, Tensor], shape: torch.Size) -> dict[str, Tensor]:
    """RandomAffine `params` drawn for one chip size, made to mean the same relative transform at `shape`."""
    reference = params["forward_input_shape"]
    h, w = shape[-2:]
    ratio = torch.tensor([w / float(reference[-1]), h / float(reference[-2])], dtype=params["translations"].dtype)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=params["center"].dtype)
    return {**params, "translations": params["translations"] * ratio, "center": centre.expand_as(params["center"]),
            "forward_input_shape": torch.tensor(list(shape), dtype=reference.dtype)}


class BatchAugmenter:
    """Applies an AugmentSpec to batches of chips, per sample; the one implementation of both paths."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec
        self._flips: list[K.AugmentationBase2D] = []
        if spec.hflip:
            self._flips.append(K.RandomHorizontalFlip(p=0.5))
        if spec.vflip:
            self._flips.append(K.RandomVerticalFlip(p=0.5))
        self._affine: K.RandomAffine | None = None  # shift, zoom and rotation about the centre, after the turns
        if spec.shift or spec.scale or spec.rotate:
            self._affine = K.RandomAffine(
                degrees=spec.angle_range, translate=(spec.shift, spec.shift) if spec.shift else None,
                scale=spec.zoom_range if spec.scale else None, padding_mode="reflection", p=1.0,
            )
        # Contrast then brightness, unclipped in between: x * a + b, as the spec says.
        eo: list[K.AugmentationBase2D] = []
        if spec.eo_brightness_contrast:
            eo.append(K.RandomContrast(contrast=spec.contrast_range, clip_output=False, p=1.0))
            brightness = tuple(1 + b for b in spec.brightness_range)  # kornia adds factor - 1
            eo.append(K.RandomBrightness(brightness=brightness, clip_output=False, p=1.0))
        sar: list[K.AugmentationBase2D] = []
        if spec.sar_gamma:
            sar.append(K.RandomGamma(gamma=spec.gamma_range, gain=(1.0, 1.0), p=1.0))
        self._photometry = {"eo": eo, "sar": sar}

    def __call__(
        self, chips: Mapping[str, Tensor], modality: Mapping[str, str], window: Mapping[str, int | None], seed: int
    ) -> dict[str, Tensor]:
        """Augment float [0, 1] chips (n, 1, H, W) of each key with one geometry and window position per sample.

        `modality[key]` ('eo' or 'sar') picks the key's photometry; `window[key]` its window side (None:
        no crop). Every draw follows `seed`: kornia's from the global CPU generator inside a forked RNG
        state, the hand-written ones from a generator on the chips' device."""
        keys = list(chips)
        if not keys:
            return {}
        first = chips[keys[0]]
        n, device = first.shape[0], first.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        positions = window_positions(n, generator, device)
        out: dict[str, Tensor] = {}
        with torch.random.fork_rng(devices=[]), _one_cpu_thread(device):
            torch.manual_seed(seed)
            flips = [(module, module.forward_parameters(first.shape)) for module in self._flips]
            turns = torch.randint(0, 4, (n,)) if self.spec.rot90 else None
            affine = self._affine.forward_parameters(first.shape) if self._affine is not None else None
            for key in keys:
                images = chips[key]
                for module, params in flips:
                    images = module(images, params=params)
                if turns is not None:
                    images = quarter_turns(images, turns)
                if affine is not None:
                    images = self._affine(images, params=_resized_affine(affine, images.shape))
                images = crop_windows(images, window[key], positions)
                out[key] = self._photometry_of(images, modality[key], generator).clamp_(0, 1)
        return out

    def _photometry_of(self, images: Tensor, modality: str, generator: torch.Generator) -> Tensor:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
        spec, n, device = self.spec, images.shape[0], images.device
        if modality == "sar" and spec.sar_speckle:
            # Hand-written: kornia has no multiplicative (speckle) noise.
            low, high = spec.speckle_range
            images = images * (low + (high - low) * torch.rand(images.shape, generator=generator, device=device))
        for module in self._photometry[modality]:
            images = module(images)
        if modality == "eo" and spec.eo_noise:
            # Hand-written: kornia's RandomGaussianNoise has one std for all samples; here it is drawn per sample.
            low, high = spec.noise_std_range
            sigma = low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator, device=device)
            images = images + sigma * torch.randn(images.shape, generator=generator, device=device)
        return images


def build_augmenter(section: Mapping[str, Any] | None) -> BatchAugmenter | None:
    """A BatchAugmenter for the `augment` config section; None when the section is empty or null."""
    if not section:
        return None
    return BatchAugmenter(AugmentSpec.from_config(section))
