"""One augmentation spec, one implementation: both training paths draw every transform from the spec's range.

Each transform is switched on alone and applied many times (fixed seeds, different per path) to a probe
chip on the DataLoader path (ChipDataset through a DataLoader) and on the device-resident path
(ResidentBatches); a statistic recovered from each output (flip rate, quarter turns, shift of a bright
dot, zoom from the distance of two dots, rotation angle of an elongated blob, window offset, contrast
and brightness of a two-level chip, noise std, speckle multiplier, gamma exponent of a ramp) must
follow the distribution the setting means (written here from the settings, not from AugmentSpec's
ranges, so a changed range anywhere fails), on each path, and the two paths' samples must agree
(two-sample Kolmogorov-Smirnov distance).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import load_config
from pipeline.data.augment import AugmentSpec, BatchAugmenter, build_augmenter, sample_seeds
from pipeline.data.datasets import ChipDataset, PairedChipDataset
from pipeline.data.resident import ResidentBatches
from pipeline.data.samplers import make_sampler
from pipeline.errors import UserError

N = 320  # draws per path and transform
BATCH = 64
SEEDS = {"loader": 11, "resident": 23}  # different seeds: the paths are compared as distributions


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only contend on a loaded machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _draw(spec: AugmentSpec, probe: np.ndarray, modality: str, path: str, window: int | None = None) -> np.ndarray:
    """N augmented copies (N, H, W) of the uint8 `probe`, in [0, 1], by one training path."""
    chips, labels = probe[None], np.zeros(N, np.int64)
    rows = np.zeros(N, np.int64)
    sampler = make_sampler("uniform", labels, 0.0, num_samples=N, seed=0)
    augment = BatchAugmenter(spec)
    if path == "loader":
        dataset = ChipDataset(chips, rows, labels, (0.0, 1.0), augment, seed=SEEDS[path], modality=modality,
                              window=window)
        images = torch.cat([b["image"] for b in DataLoader(dataset, batch_size=BATCH, sampler=sampler)])
    else:
        resident = ResidentBatches({"image": (chips, rows, (0.0, 1.0), modality, window)}, labels, sampler, BATCH,
                                   torch.device("cpu"), augment, seed=SEEDS[path])
        images = torch.cat([b["image"] for b in resident])
    assert images.shape[0] == N
    return images[:, 0].numpy().astype(np.float64)


def _blobs(size: int, centres: list[tuple[float, float]], sx: float = 1.5, sy: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    image = sum(np.exp(-((x - cx) ** 2 / (2 * sx**2) + (y - cy) ** 2 / (2 * sy**2))) for cx, cy in centres)
    return np.round(250 * image / image.max()).astype(np.uint8)


def _centroid(image: np.ndarray) -> tuple[float, float]:
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    total = image.sum()
    return float((image * x).sum() / total), float((image * y).sum() / total)


# Statistics: images (N, H, W) -> one number per draw.
def _hflip_rate(images: np.ndarray) -> np.ndarray:
    return (images[:, :, -4].max(1) > images[:, :, 3].max(1)).astype(np.float64)  # the dot was in column 3


def _vflip_rate(images: np.ndarray) -> np.ndarray:
    return (images[:, -3, :].max(1) > images[:, 2, :].max(1)).astype(np.float64)  # the dot was in row 2


def _quarter_turns(images: np.ndarray) -> np.ndarray:
    """Turns (0-3, counter-clockwise) that bring the dot at (row 2, col 4) of a 16-px chip where it is."""
    size = images.shape[-1]
    places = [np.rot90(np.pad(np.ones((1, 1)), ((2, size - 3), (4, size - 5))), k) for k in range(4)]
    return np.array([np.argmax([(image * place).sum() for place in places]) for image in images], np.float64)


def _shift_x(images: np.ndarray) -> np.ndarray:
    """Horizontal move of a centred dot, as a fraction of the chip width."""
    width = images.shape[-1]
    return np.array([_centroid(image)[0] - (width - 1) / 2 for image in images]) / width


def _zoom(images: np.ndarray) -> np.ndarray:
    """Distance between two dots over their distance in the probe (12 px)."""
    half = images.shape[-1] // 2
    return np.array([(_centroid(im[:, half + 1 :])[0] + half + 1 - _centroid(im[:, :half])[0]) / 12 for im in images])


def _angle(images: np.ndarray) -> np.ndarray:
    """Orientation in degrees of an elongated centred blob (horizontal in the probe), from its second moments."""
    y, x = np.mgrid[0 : images.shape[1], 0 : images.shape[2]]
    out = []
    for image in images:
        cx, cy = _centroid(image)
        mu20, mu02 = (image * (x - cx) ** 2).sum(), (image * (y - cy) ** 2).sum()
        mu11 = (image * (x - cx) * (y - cy)).sum()
        out.append(-math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02)))  # image rows point down
    return np.array(out)


def _window_left(images: np.ndarray) -> np.ndarray:
    """Left offset of a 14-px window cut from the 20-px probe whose pixel (r, c) holds 20 r + c."""
    return np.array([divmod(int(round(image[0, 0] * 255)), 20)[1] for image in images], np.float64)


def _contrast(images: np.ndarray) -> np.ndarray:
    return (images[:, :, 8:].mean((1, 2)) - images[:, :, :8].mean((1, 2))) / ((153 - 77) / 255)


def _brightness(images: np.ndarray) -> np.ndarray:
    return images[:, :, :8].mean((1, 2)) - _contrast(images) * 77 / 255


def _noise_std(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).std(1)


def _speckle(images: np.ndarray) -> np.ndarray:
    """Per-pixel multipliers of a flat 128 chip (one number per pixel, pooled over draws)."""
    return (images / (128 / 255)).ravel()


def _gamma(images: np.ndarray) -> np.ndarray:
    ramp = np.linspace(20, 235, 16).round() / 255
    return np.array([np.median(np.log(image.mean(0)) / np.log(ramp)) for image in images])


def _uniform(low: float, high: float) -> dict[str, float]:
    return {"mean": (low + high) / 2, "std": (high - low) / math.sqrt(12), "min": low, "max": high}


SPEC = AugmentSpec.from_config(load_config("tiny").augment.model_dump() | {"rotate": 20.0, "eo_noise": 0.05})
RAMP = np.tile(np.linspace(20, 235, 16).round().astype(np.uint8), (16, 1))
TWO_LEVELS = np.concatenate([np.full((16, 8), 77, np.uint8), np.full((16, 8), 153, np.uint8)], axis=1)
DOT = _blobs(16, [(3, 2)], 0.3, 0.3)
DOT_TURN = _blobs(16, [(4, 2)], 0.3, 0.3)
WINDOW_PROBE = np.arange(400).reshape(20, 20).astype(np.uint8)

S = SPEC  # the settings whose meaning the expected distributions spell out below
FLAT = np.full((16, 16), 128, np.uint8)
SPECKLE_HALF_WIDTH = math.sqrt(3) * S.sar_speckle  # uniform multiplier with std sar_speckle

# transform: (settings switched on, probe, modality, window, statistic, expected moments, tolerances)
CASES = {
    "hflip": ({"hflip": True}, DOT, "eo", None, _hflip_rate, {"mean": 0.5}, {"mean": 0.08}),
    "vflip": ({"vflip": True}, DOT, "sar", None, _vflip_rate, {"mean": 0.5}, {"mean": 0.08}),
    "rot90": ({"rot90": True}, DOT_TURN, "sar", None, _quarter_turns, {"mean": 1.5, "std": math.sqrt(1.25)},
              {"mean": 0.15, "std": 0.08}),
    "shift": ({"shift": S.shift}, _blobs(21, [(10, 10)]), "sar", None, _shift_x, _uniform(-S.shift, S.shift),
              {"mean": 0.008, "std": 0.1 * S.shift, "min": 0.15 * S.shift, "max": 0.15 * S.shift}),
    "scale": ({"scale": S.scale}, _blobs(31, [(9, 15), (21, 15)]), "sar", None, _zoom,
              _uniform(1 - S.scale, 1 + S.scale),
              {"mean": 0.01, "std": 0.1 * S.scale, "min": 0.15 * S.scale, "max": 0.15 * S.scale}),
    "rotate": ({"rotate": S.rotate}, _blobs(31, [(15, 15)], 5.0, 1.5), "eo", None, _angle,
               _uniform(-S.rotate, S.rotate), {"mean": 1.5, "std": 0.1 * S.rotate, "min": 2.0, "max": 2.0}),
    "window": ({}, WINDOW_PROBE, "sar", 14, _window_left, {"mean": 3.0, "std": math.sqrt(38 / 12), "min": 0, "max": 6},
               {"mean": 0.3, "std": 0.15, "min": 0, "max": 0}),  # offset round(6 u): 0 and 6 half as likely
    "eo_contrast": ({"eo_brightness_contrast": S.eo_brightness_contrast}, TWO_LEVELS, "eo", None, _contrast,
                    _uniform(1 - S.eo_brightness_contrast, 1 + S.eo_brightness_contrast),
                    {"mean": 0.02, "std": 0.012, "min": 0.02, "max": 0.02}),
    "eo_brightness": ({"eo_brightness_contrast": S.eo_brightness_contrast}, TWO_LEVELS, "eo", None, _brightness,
                      _uniform(-S.eo_brightness_contrast, S.eo_brightness_contrast),
                      {"mean": 0.02, "std": 0.012, "min": 0.02, "max": 0.02}),
    "eo_noise": ({"eo_noise": S.eo_noise}, FLAT, "eo", None, _noise_std, _uniform(0.0, S.eo_noise),
                 {"mean": 0.003, "std": 0.002, "min": 0.004, "max": 0.005}),
    "sar_speckle": ({"sar_speckle": S.sar_speckle}, FLAT, "sar", None, _speckle,
                    _uniform(1 - SPECKLE_HALF_WIDTH, 1 + SPECKLE_HALF_WIDTH),
                    {"mean": 0.005, "std": 0.005, "min": 0.01, "max": 0.01}),
    "sar_gamma": ({"sar_gamma": S.sar_gamma}, RAMP, "sar", None, _gamma, _uniform(1 - S.sar_gamma, 1 + S.sar_gamma),
                  {"mean": 0.02, "std": 0.012, "min": 0.02, "max": 0.02}),
}


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _moments(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


@pytest.mark.parametrize("name", list(CASES))
def test_both_paths_draw_each_transform_from_the_spec_range(name: str) -> None:
    settings, probe, modality, window, statistic, expected, tolerance = CASES[name]
    spec = AugmentSpec.from_config(settings)
    samples = {path: statistic(_draw(spec, probe, modality, path, window)) for path in SEEDS}
    for path, values in samples.items():
        moments = _moments(values)
        for key, target in expected.items():
            assert abs(moments[key] - target) <= tolerance[key], (name, path, key, moments, expected)
    if len(np.unique(samples["loader"])) > 8:  # a continuous statistic: compare the two distributions
        assert _ks_distance(samples["loader"], samples["resident"]) < 0.2, name


def test_a_changed_range_on_one_path_is_caught() -> None:
    """The check above fails when one path draws from another range (here gamma 0.3 instead of 0.2)."""
    settings, probe, modality, window, statistic, expected, tolerance = CASES["sar_gamma"]
    wider = statistic(_draw(AugmentSpec(sar_gamma=0.3), probe, modality, "resident", window))
    normal = statistic(_draw(AugmentSpec(sar_gamma=0.2), probe, modality, "loader", window))
    moments = _moments(wider)
    assert any(abs(moments[key] - target) > tolerance[key] for key, target in expected.items())
    assert _moments(normal)["min"] > moments["min"] + 0.05  # and the other path still draws from the narrower range


def test_same_keys_get_the_same_augmentation_on_both_paths() -> None:
    """A batch of the same draw keys, seed and epoch is augmented alike by the loader and the resident path."""
    rng = np.random.default_rng(0)
    n = 24
    eo, sar = rng.integers(0, 256, (n, 20, 20), dtype=np.uint8), rng.integers(0, 256, (n, 36, 36), dtype=np.uint8)
    labels, eo_rows = np.arange(n) % 3, np.where(np.arange(n) % 5 == 0, -1, np.arange(n))
    augment = BatchAugmenter(dataclasses.replace(SPEC, eo_brightness_contrast=0.2, sar_speckle=0.15, sar_gamma=0.2))
    sampler = make_sampler("weighted", labels, 1.0, num_samples=n, seed=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        dataset = PairedChipDataset(eo, sar, eo_rows, np.arange(n), labels, (0.4, 0.2), (0.3, 0.25), augment, seed=1,
                                    windows=(16, 32))
        dataset.set_epoch(epoch)
        arrays = {"eo": (eo, eo_rows, (0.4, 0.2), "eo", 16), "sar": (sar, np.arange(n), (0.3, 0.25), "sar", 32)}
        resident = ResidentBatches(arrays, labels, sampler, 8, torch.device("cpu"), augment, seed=1)
        resident.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, drop_last=True)
        for a, b in zip(loader, resident, strict=True):
            assert set(a) == set(b)
            for key in a:
                torch.testing.assert_close(a[key].to(b[key].dtype), b[key], atol=1e-5, rtol=0, msg=key)


def test_a_keys_augmentation_does_not_depend_on_its_batch() -> None:
    """A draw key is augmented alike alone, in any batch, on either path: what DDP's per-rank shares need."""
    rng = np.random.default_rng(1)
    eo, sar = rng.integers(0, 256, (6, 20, 20), dtype=np.uint8), rng.integers(0, 256, (6, 36, 36), dtype=np.uint8)
    augment = BatchAugmenter(dataclasses.replace(SPEC, eo_brightness_contrast=0.2, sar_speckle=0.15, sar_gamma=0.2))
    dataset = PairedChipDataset(eo, sar, np.arange(6), np.arange(6), np.zeros(6), (0, 1), (0, 1), augment, seed=4,
                                windows=(16, 32))
    whole = dataset.__getitems__([3, 10, 7, 25])
    for part in (dataset.__getitems__([25, 3]), [dataset[25], dataset[3]]):
        for key in ("eo", "sar"):
            torch.testing.assert_close(part[0][key], whole[3][key])
            torch.testing.assert_close(part[1][key], whole[0][key])
    assert not torch.equal(dataset[1]["sar"], dataset[7]["sar"])  # keys 1 and 7: one item drawn twice differs


def test_cpu_threads_are_restored_and_non_square_turns_refused() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chips = {"image": torch.rand(4, 1, 8, 8)}
        speckle = BatchAugmenter(AugmentSpec(sar_speckle=0.1))
        speckle(chips, {"image": "sar"}, {"image": None}, sample_seeds(0, 0, range(4)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="square"):
        BatchAugmenter(AugmentSpec(rot90=True))({"image": torch.rand(4, 1, 8, 6)}, {"image": "sar"}, {"image": None},
                                               sample_seeds(0, 0, range(4)))


def test_spec_lists_the_transforms_of_each_modality() -> None:
    spec = AugmentSpec.from_config(load_config("tiny").augment.model_dump())
    assert spec.transforms("eo") == ("hflip", "vflip", "rot90", "shift", "scale", "eo_brightness_contrast", "eo_noise")
    assert spec.transforms("sar") == ("hflip", "vflip", "rot90", "shift", "scale", "sar_speckle", "sar_gamma")
    quick = AugmentSpec.from_config(load_config("quick").augment.model_dump())
    assert not quick.has_geometry and quick.transforms("sar") == ("sar_speckle", "sar_gamma")
    assert AugmentSpec.from_config(None) == AugmentSpec() and build_augmenter({}) is None
    assert SPEC.speckle_range == pytest.approx((1 - 0.15 * math.sqrt(3), 1 + 0.15 * math.sqrt(3)))
    with pytest.raises(UserError, match="augment.shift must be below 1"):
        AugmentSpec.from_config({"shift": 1.0})
    with pytest.raises(UserError, match="augment.eo_brightness_contrast must be at most 1"):
        AugmentSpec.from_config({"eo_brightness_contrast": 1.5})
    with pytest.raises(ValueError, match="modality"):
        spec.transforms("ir")
