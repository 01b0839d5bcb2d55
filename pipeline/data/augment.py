"""Training augmentation: one specification (AugmentSpec) and one batched implementation (BatchAugmenter).

Both training paths use the same code: the DataLoader path (pipeline.data.datasets) augments each
batch of draw keys in the dataset's `__getitems__`, the device-resident path (pipeline.data.resident)
augments each batch on the device. Each sample's draws come from its own seed, a hash of (seed, epoch,
draw key): a key gets the same augmentation on either path, in any batch, with any number of workers
or DDP ranks (on a GPU the per-pixel noise is the one exception, see _noise_field).

Per sample: one geometry shared by the chips of a pair (flips, quarter turns, then shift / zoom /
small rotation about the centre with reflected borders, all relative to the chip size so an EO chip of
32 px and its SAR partner of 56 px move together), then the random training window (the translation
augmentation of pipeline.data.geometry: a packed chip of side P gives a window of side W at the same
relative position for both chips; evaluation takes the centre window inside the model), then
photometry drawn apart per modality: EO contrast x brightness and Gaussian noise, SAR multiplicative
speckle and gamma. Chips are float [0, 1] tensors (n, 1, H, W); the result is clamped to [0, 1].

kornia.augmentation applies the transforms it has exactly (flips, shift/zoom/rotation, contrast,
brightness, gamma) with parameters drawn here per sample; the few hand-written ones (quarter turns,
window crop, speckle, Gaussian noise with a per-sample std) say why next to their code.
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, keys: Sequence[int] | np.ndarray) -> np.ndarray:
    """One uint64 seed per draw key: a sample's augmentation depends on (seed, epoch, key) only, never on
    the other samples of its batch (so DDP ranks' shares of a batch are augmented like the whole batch)."""
    base = np.random.SeedSequence((int(seed), int(epoch))).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):
        return _mix64(base + _mix64(np.asarray(keys, dtype=np.int64).astype(np.uint64) + _GOLDEN))


def sample_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(n, count) uniforms in [0, 1): the first `count` outputs of a SplitMix64 stream per seed (vectorised)."""
    with np.errstate(over="ignore"):
        steps = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        z = _mix64(np.asarray(seeds, dtype=np.uint64)[:, None] + steps[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


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


def _noise_field(shape: torch.Size, seeds: np.ndarray, device: torch.device, gaussian: bool) -> Tensor:
    """Per-pixel noise (uniform [0, 1) or standard normal) of `shape`, one stream per sample seed on the CPU.

    On another device one batched draw seeded by all the batch's seeds (per-sample streams would cost a
    kernel launch per chip): there the noise pixels, unlike every other draw, depend on the batch."""
    draw = torch.randn if gaussian else torch.rand
    if device.type == "cpu":
        out = torch.empty(shape)
        for i, seed in enumerate(seeds.tolist()):
            draw(shape[1:], generator=torch.Generator().manual_seed(seed), out=out[i])
        return out
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.bitwise_xor.reduce(np.asarray(seeds, dtype=np.uint64)) >> np.uint64(1)))
    return draw(shape, generator=generator, device=device)


# Columns of a sample's uniforms (fixed whatever is switched on, so one setting never moves another's draws).
_U_HFLIP, _U_VFLIP, _U_TURNS, _U_SHIFT_X, _U_SHIFT_Y, _U_ZOOM, _U_ANGLE, _U_CROP_X, _U_CROP_Y = range(9)
_U_CONTRAST, _U_BRIGHTNESS, _U_NOISE_STD, _U_GAMMA, _U_NOISE_SEED, _U_SPECKLE_SEED = range(9, 15)
_N_UNIFORMS = 15


def _spread(u: np.ndarray, low: float, high: float) -> Tensor:
    """Uniforms in [0, 1) mapped onto [low, high), as a float32 CPU tensor."""
    return torch.from_numpy(low + (high - low) * u).float()


def _stream_seeds(u: np.ndarray) -> np.ndarray:
    """Integer seeds (53 bits) for per-sample noise streams, from one column of uniforms."""
    return (u * 2.0**53).astype(np.int64)


class BatchAugmenter:
    """Applies an AugmentSpec to batches of chips, per sample; the one implementation of both paths.

    Every sample's parameters are drawn here from its own seed (see sample_seeds) and mapped onto the
    spec's ranges; kornia.augmentation applies them (flips, RandomAffine, contrast, brightness, gamma)
    through its `params=` argument. kornia's own samplers are not used: they draw a whole batch from the
    global generator, so a sample's draw would depend on the rest of its batch.
    """

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec
        self._hflip = K.RandomHorizontalFlip(p=0.5)
        self._vflip = K.RandomVerticalFlip(p=0.5)
        self._affine = K.RandomAffine(degrees=0.0, padding_mode="reflection", p=1.0)  # shift, zoom, rotation
        # Contrast then brightness, unclipped in between: x * a + b, as the spec says.
        self._contrast = K.RandomContrast(clip_output=False, p=1.0)
        self._brightness = K.RandomBrightness(clip_output=False, p=1.0)
        self._gamma = K.RandomGamma(p=1.0)

    def __call__(
        self, chips: Mapping[str, Tensor], modality: Mapping[str, str], window: Mapping[str, int | None],
        seeds: np.ndarray,
    ) -> dict[str, Tensor]:
        """Augment float [0, 1] chips (n, 1, H, W) of each key with one geometry and window position per sample.

        `modality[key]` ('eo' or 'sar') picks the key's photometry; `window[key]` its window side (None:
        no crop); `seeds` (n uint64, from sample_seeds) the samples' draws."""
        keys = list(chips)
        if not keys:
            return {}
        n, device = chips[keys[0]].shape[0], chips[keys[0]].device
        seeds = np.asarray(seeds, dtype=np.uint64)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} samples")
        u = sample_uniforms(seeds, _N_UNIFORMS)
        positions = torch.from_numpy(u[:, [_U_CROP_X, _U_CROP_Y]]).float().to(device)
        out: dict[str, Tensor] = {}
        with _one_cpu_thread(device):
            for key in keys:
                images = self._geometry(chips[key], u)
                images = crop_windows(images, window[key], positions)
                out[key] = self._photometry_of(images, modality[key], u).clamp_(0, 1)
        return out

    def _geometry(self, images: Tensor, u: np.ndarray) -> Tensor:
        """Flips, quarter turns, then shift / zoom / rotation about the centre, relative to the chip's size."""
        spec, shape = self.spec, images.shape
        size = torch.tensor(list(shape), dtype=torch.long)
        if spec.hflip:
            images = self._hflip(images, params={"batch_prob": torch.from_numpy(u[:, _U_HFLIP] < 0.5),
                                                 "forward_input_shape": size})
        if spec.vflip:
            images = self._vflip(images, params={"batch_prob": torch.from_numpy(u[:, _U_VFLIP] < 0.5),
                                                 "forward_input_shape": size})
        if spec.rot90:
            images = quarter_turns(images, torch.from_numpy(np.floor(4 * u[:, _U_TURNS])).long())
        if spec.shift or spec.scale or spec.rotate:
            n, h, w = shape[0], shape[-2], shape[-1]
            shift = torch.stack([_spread(u[:, _U_SHIFT_X], *spec.shift_range) * w,
                                 _spread(u[:, _U_SHIFT_Y], *spec.shift_range) * h], dim=1)
            zoom = _spread(u[:, _U_ZOOM], *spec.zoom_range)
            params = {
                "translations": shift, "center": torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(n, 2),
                "scale": torch.stack([zoom, zoom], dim=1), "angle": _spread(u[:, _U_ANGLE], *spec.angle_range),
                "shear_x": torch.zeros(n), "shear_y": torch.zeros(n), "batch_prob": torch.ones(n, dtype=torch.bool),
                "forward_input_shape": size,
            }
            images = self._affine(images, params=params)
        return images

    def _photometry_of(self, images: Tensor, modality: str, u: np.ndarray) -> Tensor:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'eo' or 'sar', got {modality!r}")
        spec, n, device = self.spec, images.shape[0], images.device
        size = torch.tensor(list(images.shape), dtype=torch.long)
        ones = torch.ones(n, dtype=torch.bool)
        if modality == "sar" and spec.sar_speckle:
            # Hand-written: kornia has no multiplicative (speckle) noise.
            low, high = spec.speckle_range
            field = _noise_field(images.shape, _stream_seeds(u[:, _U_SPECKLE_SEED]), device, gaussian=False)
            images = images * (low + (high - low) * field.to(device))
        if modality == "sar" and spec.sar_gamma:
            params = {"gamma_factor": _spread(u[:, _U_GAMMA], *spec.gamma_range), "gain_factor": torch.ones(n),
                      "batch_prob": ones, "forward_input_shape": size}
            images = self._gamma(images, params=params)
        if modality == "eo" and spec.eo_brightness_contrast:
            contrast = _spread(u[:, _U_CONTRAST], *spec.contrast_range)
            images = self._contrast(images, params={"contrast_factor": contrast, "batch_prob": ones,
                                                    "forward_input_shape": size})
            brightness = 1 + _spread(u[:, _U_BRIGHTNESS], *spec.brightness_range)  # kornia adds factor - 1
            images = self._brightness(images, params={"brightness_factor": brightness, "batch_prob": ones,
                                                      "forward_input_shape": size})
        if modality == "eo" and spec.eo_noise:
            # Hand-written: kornia's RandomGaussianNoise has one std for all samples; here it is drawn per sample.
            sigma = _spread(u[:, _U_NOISE_STD], *spec.noise_std_range).to(device).view(n, 1, 1, 1)
            field = _noise_field(images.shape, _stream_seeds(u[:, _U_NOISE_SEED]), device, gaussian=True)
            images = images + sigma * field.to(device)
        return images


def build_augmenter(section: Mapping[str, Any] | None) -> BatchAugmenter | None:
    """A BatchAugmenter for the `augment` config section; None when the section is empty or null."""
    if not section:
        return None
    return BatchAugmenter(AugmentSpec.from_config(section))
