"""Shared fixtures: small synthetic data in temp dirs, the MSTAR folder when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MSTAR = REPO.parent / "shared" / "data" / "mstar_soc"


@pytest.fixture(scope="session")
def mstar_root() -> Path:
    if not (MSTAR / "train_17deg").is_dir():
        pytest.skip("../shared/data/mstar_soc is absent")
    return MSTAR
