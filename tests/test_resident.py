"""Device-resident batches: the DataLoader batch contract, shared pair geometry, reproducibility."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import pytest

from pipeline.data.augment import AugmentSpec, BatchAugmenter, sample_seeds
from pipeline.data.datasets import ChipDataset
from pipeline.data.resident import ResidentBatches
from pipeline.data.samplers import make_sampler

GEOMETRY = BatchAugmenter(AugmentSpec(hflip=True, vflip=True, rot90=True, shift=0.1, scale=0.1, rotate=10.0))


def _pattern(size: int) -> np.ndarray:
    """An asymmetric blob pattern whose appearance does not depend on the pixel size."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.exp(-((x - 0.3) ** 2 + (y - 0.35) ** 2) / 0.01) + 0.6 * np.exp(-((x - 0.7) ** 2 + (y - 0.6) ** 2) / 0.02)
    return (255 * img / img.max()).astype(np.uint8)


def _batches(aug, seed=0, n=12, paired=True, eo_rows=None):
    eo = np.stack([_pattern(16)] * n)
    sar = np.stack([_pattern(32)] * n)
    labels = np.arange(n) % 3
    sampler = make_sampler("uniform", labels, 0.0, num_samples=n, seed=seed)
    rows = np.arange(n)
    arrays = {"eo": (eo, rows if eo_rows is None else eo_rows, (0.0, 1.0), "eo", None),
              "sar": (sar, rows, (0.0, 1.0), "sar", None)}
    if not paired:
        arrays = {"image": arrays["sar"]}
    return ResidentBatches(arrays, labels, sampler, 4, torch.device("cpu"), aug, seed=seed)


def test_batch_contract_matches_the_dataloader_path():
    """Without augmentation a resident batch equals the DataLoader path's items, EO and SAR, values too."""
    batches = list(_batches(None))
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"eo", "sar", "has_eo", "label", "index"}
    assert b["eo"].shape == (4, 1, 16, 16) and b["sar"].shape == (4, 1, 32, 32)
    assert b["eo"].dtype == torch.float32 and b["label"].dtype == torch.int64
    for key, size in (("eo", 16), ("sar", 32)):
        loader_item = ChipDataset(np.stack([_pattern(size)] * 12), np.arange(12), np.arange(12) % 3, (0.0, 1.0))
        for j, item in enumerate(b["index"].tolist()):
            assert torch.allclose(b[key][j], loader_item[item]["image"], atol=1e-6), key
            assert int(b["label"][j]) == int(loader_item[item]["label"])
    single = next(iter(_batches(None, paired=False)))
    assert set(single) == {"image", "label", "index"}


def _photometry_moments(modality: str, cfg: AugmentSpec, resident: bool, n: int = 4096) -> tuple[float, float, float]:
    """Mean, std and kurtosis of augmented pixels of a flat mid-grey chip, over n draws, by one path."""
    chips = np.full((n, 12, 12), 100, np.uint8)
    labels = np.zeros(n, np.int64)
    if resident:
        sampler = make_sampler("uniform", labels, 0.0, num_samples=n, seed=0)
        batches = ResidentBatches({"image": (chips, np.arange(n), (0.0, 1.0), modality, None)}, labels, sampler,
                                  64, torch.device("cpu"), BatchAugmenter(cfg), seed=0)
        pixels = torch.cat([b["image"] for b in batches]).numpy()
    else:
        dataset = ChipDataset(chips, np.arange(n), labels, (0.0, 1.0), augment=BatchAugmenter(cfg), modality=modality,
                              seed=1)  # another seed than the resident path's: independent draws
        sampler = make_sampler("uniform", labels, 0.0, num_samples=n, seed=0)
        pixels = torch.cat([b["image"] for b in DataLoader(dataset, batch_size=64, sampler=sampler)]).numpy()
    mean, std = float(pixels.mean()), float(pixels.std())
    kurtosis = float(((pixels - mean) ** 4).mean() / std**4) if std > 1e-6 else 0.0
    return mean, std, kurtosis


@pytest.mark.parametrize("modality,cfg", [
    ("eo", AugmentSpec(eo_brightness_contrast=0.2, eo_noise=0.05)),
    ("sar", AugmentSpec(sar_speckle=0.2, sar_gamma=0.2)),
    ("sar", AugmentSpec(sar_speckle=0.3)),
])
def test_both_paths_draw_the_same_photometry(modality, cfg):
    """Same parameters -> the same pixel moments in the loader and the resident path, per modality.

    Kurtosis tells the noise shapes apart (uniform speckle 1.8, Gaussian 3.0) where mean and std cannot."""
    loader = _photometry_moments(modality, cfg, resident=False)
    resident = _photometry_moments(modality, cfg, resident=True)
    assert loader[1] > 0.02
    assert abs(loader[0] - resident[0]) < 0.01, (loader, resident)
    assert abs(loader[1] - resident[1]) < 0.1 * loader[1], (loader, resident)
    assert abs(loader[2] - resident[2]) < 0.15 * loader[2], (loader, resident)


def test_single_modality_batches_get_their_own_photometry():
    """An EO-only batch keyed "image" gets EO photometry: SAR settings leave it untouched, and vice versa."""
    sar_only, eo_only = AugmentSpec(sar_speckle=0.3, sar_gamma=0.3), AugmentSpec(eo_noise=0.05)
    assert _photometry_moments("eo", sar_only, resident=True, n=256)[1] < 1e-6
    assert _photometry_moments("sar", eo_only, resident=True, n=256)[1] < 1e-6
    assert _photometry_moments("eo", eo_only, resident=True, n=256)[1] > 0.01


def test_window_crops_match_the_loader_path():
    """Resident random windows are crops of the packed chip (no resampling) at offsets within the margin."""
    image = np.arange(400, dtype=np.uint8).reshape(20, 20)
    chips = np.stack([image] * 16)
    labels = np.zeros(16, np.int64)
    sampler = make_sampler("uniform", labels, 0.0, num_samples=16, seed=0)
    batches = ResidentBatches({"image": (chips, np.arange(16), (0.0, 1.0), "sar", 14)}, labels, sampler, 16,
                              torch.device("cpu"), BatchAugmenter(AugmentSpec()), seed=0)
    offsets = set()
    for window in next(iter(batches))["image"][:, 0]:
        window = torch.round(window * 255).long().numpy()
        assert window.shape == (14, 14)
        top, left = divmod(int(window[0, 0]), 20)
        np.testing.assert_array_equal(window, image[top : top + 14, left : left + 14])
        offsets.add((top, left))
    assert len(offsets) > 5


def test_pairs_share_geometry_across_chip_sizes():
    for b in _batches(GEOMETRY):
        eo_small = b["eo"]
        sar_down = F.interpolate(b["sar"], size=(16, 16), mode="area")
        # The same geometry at two resolutions: after downsampling, the SAR chip matches the EO chip.
        err = (eo_small - sar_down).abs().mean(dim=(1, 2, 3))
        assert (err < 0.03).all(), err  # mismatched pairs differ by 0.04-0.14


def test_missing_eo_gives_zeros_and_flag():
    b = next(iter(_batches(None, eo_rows=np.array([-1, 0, 1, 2] * 3))))
    present = b["has_eo"]
    assert not present.all() and present.any()
    assert (b["eo"][~present] == 0).all()


def test_reproducible_for_a_seed_and_different_across_epochs():
    a1, a2 = _batches(GEOMETRY), _batches(GEOMETRY)
    assert all(torch.equal(x["sar"], y["sar"]) for x, y in zip(a1, a2))
    a2.set_epoch(1)
    a2.sampler.set_epoch(1)
    assert not all(torch.equal(x["sar"], y["sar"]) for x, y in zip(a1, a2))


def test_quarter_turns_are_exact_rotations():
    """rot90 alone gives exact copies of the chip turned 0-3 times, each turn about equally often."""
    img = torch.from_numpy(_pattern(10)).float()[None, None].repeat(64, 1, 1, 1) / 255
    turn = BatchAugmenter(AugmentSpec(rot90=True))
    out = turn({"image": img}, {"image": "sar"}, {"image": None}, sample_seeds(0, 0, range(64)))["image"]
    turns = []
    for i in range(64):
        errors = [float((out[i, 0] - torch.rot90(img[i, 0], k, dims=(0, 1))).abs().max()) for k in range(4)]
        assert min(errors) < 1e-3
        turns.append(int(np.argmin(errors)))
    assert np.bincount(turns, minlength=4).min() >= 8
