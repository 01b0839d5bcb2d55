"""Device-resident batches: the DataLoader batch contract, shared pair geometry, reproducibility."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.augment import AugmentConfig
from pipeline.data.resident import ResidentBatches, affine_matrices, warp
from pipeline.data.samplers import make_sampler

GEOMETRY = AugmentConfig(hflip=True, vflip=True, rot90=True, shift=0.1, scale=0.1, rotate=10.0)


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
    arrays = {"eo": (eo, rows if eo_rows is None else eo_rows, (0.0, 1.0)), "sar": (sar, rows, (0.0, 1.0))}
    if not paired:
        arrays = {"image": arrays["sar"]}
    return ResidentBatches(arrays, labels, sampler, 4, torch.device("cpu"), aug, seed=seed)


def test_batch_contract_matches_the_dataloader_path():
    batches = list(_batches(None))
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"eo", "sar", "has_eo", "label", "index"}
    assert b["eo"].shape == (4, 1, 16, 16) and b["sar"].shape == (4, 1, 32, 32)
    assert b["eo"].dtype == torch.float32 and b["label"].dtype == torch.int64
    assert torch.allclose(b["sar"][0, 0], torch.from_numpy(_pattern(32)).float() / 255)
    single = next(iter(_batches(None, paired=False)))
    assert set(single) == {"image", "label", "index"}


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


def test_quarter_turn_matrices_are_exact_rotations():
    gen = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(rot90=True)
    theta = affine_matrices(cfg, 64, gen, torch.device("cpu"))
    img = torch.from_numpy(_pattern(10)).float()[None, None].repeat(64, 1, 1, 1)
    out = warp(img, theta)
    for i in range(64):
        candidates = [torch.rot90(img[i, 0], k, dims=(0, 1)) for k in range(4)]
        assert min(float((out[i, 0] - c).abs().max()) for c in candidates) < 1e-3
