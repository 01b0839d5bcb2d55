"""Chip geometry and the model's input adapter: crop/pad without resampling, auto windows, intensity."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import DataConfig, validate_config
from pipeline.data.geometry import ChipGeometry, resolve_geometry
from pipeline.data.pack import crop_or_pad_chip, fit_chip
from pipeline.errors import UserError
from pipeline.models import ChipInput, create_model, model_from_spec, model_spec

DATA = {"eo_size": "auto", "eo_fit": "crop", "eo_margin": 0, "eo_auto_fraction": 1.0,
        "sar_size": "auto", "sar_fit": "crop", "sar_margin": 0.1, "sar_auto_fraction": 0.5, "sar_auto_max": None}


def data_cfg(**changes: object) -> DataConfig:
    """The data section with these geometry settings; bad values fail at load, with the dotted key."""
    return validate_config({"data": {**DATA, **changes}}).data


def test_crop_keeps_pixels_and_pads_small_chips() -> None:
    image = np.arange(100, dtype=np.uint8).reshape(10, 10)
    np.testing.assert_array_equal(fit_chip(image, 6, "crop"), image[2:8, 2:8])  # centre, not resampled
    padded = crop_or_pad_chip(image[:4, :4], 8, "reflect")
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[2:6, 2:6], image[:4, :4])
    black = fit_chip(image[:4, :4], 8, "pad")
    assert black.shape == (8, 8) and black[0].sum() == 0 and black[2:6, 2:6].tolist() == image[:4, :4].tolist()
    assert crop_or_pad_chip(np.full((2, 2), 7, np.uint8), 9, "reflect").shape == (9, 9)  # reflection many times
    assert fit_chip(image, 5, "resize").shape == (5, 5)


def _write(folder: Path, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((size, size), np.uint8))
        paths.append(path)
    return paths


def test_auto_window_is_a_fraction_of_the_median_chip(tmp_path: Path) -> None:
    sar = _write(tmp_path / "sar", [120, 128, 128, 130, 192])
    geometry = resolve_geometry(data_cfg(), "sar", sar)
    assert geometry == ChipGeometry(packed=64 + 2 * 6, window=64, fit="crop")  # 0.5 x 128; margin 0.1 x 64
    eo = _write(tmp_path / "eo", [31, 31, 32])
    assert resolve_geometry(data_cfg(), "eo", [None, *eo]) == ChipGeometry(packed=31, window=31, fit="crop")
    capped = resolve_geometry(data_cfg(sar_auto_fraction=1.0, sar_auto_max=88), "sar", sar)
    assert capped.window == 88  # 128-px chips: the cap; smaller chips keep their whole median side
    assert resolve_geometry(data_cfg(sar_auto_fraction=1.0, sar_auto_max=88), "sar", eo).window == 31
    with pytest.raises(UserError, match="data.sar_auto_max"):
        data_cfg(sar_auto_max=2)
    fixed = resolve_geometry(data_cfg(sar_size=40, sar_margin=3), "sar", sar)
    assert (fixed.window, fixed.packed, fixed.margin) == (40, 46, 3)
    with pytest.raises(UserError, match="data.sar_fit"):
        data_cfg(sar_fit="stretch")
    with pytest.raises(UserError, match="data.sar_size"):
        data_cfg(sar_size=-3)


def test_chip_input_centre_crops_and_standardises() -> None:
    x = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(2, 1, 12, 12)
    cropped = ChipInput(window=8)(x)
    assert torch.equal(cropped, x[..., 2:10, 2:10])
    assert torch.equal(ChipInput(window=8)(x[..., :8, :8]), x[..., :8, :8])  # training windows pass through
    standard = ChipInput(window=8, intensity="standardize")(x * 3 + 5)
    assert torch.allclose(standard.mean(dim=(-2, -1)), torch.zeros(2, 1), atol=1e-5)
    assert torch.allclose(standard.std(dim=(-2, -1)), torch.ones(2, 1), atol=1e-3)
    # log works on intensities: undo the dataset normalisation, then log, then standardise
    norm = (0.3, 0.2)
    raw = torch.rand(1, 1, 8, 8)
    logged = ChipInput(intensity="log", norm=norm)((raw - norm[0]) / norm[1])
    expected = torch.log(raw + 1 / 255)
    expected = (expected - expected.mean()) / (expected.var() + 1e-6).sqrt()
    assert torch.allclose(logged, expected, atol=1e-4)
    with pytest.raises(UserError, match="intensity"):
        ChipInput(intensity="gamma")


@pytest.mark.parametrize("name", ["aconvnet", "aconvnet_wide", "aconvnet_fast"])
def test_compact_nets_are_timm_models_with_the_adapter_in_the_spec(name: str) -> None:
    model = create_model(name, 10, window=24, intensity="standardize", norm={"mean": 0.3, "std": 0.2})
    assert model(torch.randn(3, 1, 30, 30)).shape == (3, 10)  # packed chips are centre-cropped to 24
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)  # any size works ('same' padding)
    spec = model_spec(model, 30, {"mean": 0.3, "std": 0.2})
    assert spec["window"] == 24 and spec["intensity"] == "standardize" and spec["input_size"] == [30, 30]
    rebuilt = model_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 1, 30, 30)
    assert torch.allclose(model(x), rebuilt(x))
