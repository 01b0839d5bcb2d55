"""Shared fixtures: small synthetic data in temp dirs, the MSTAR folder when present."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MSTAR = REPO.parent / "shared" / "data" / "mstar_soc"


@pytest.fixture(scope="session")
def mstar_root() -> Path:
    if not (MSTAR / "train_17deg").is_dir():
        pytest.skip("../shared/data/mstar_soc is absent")
    return MSTAR


@pytest.fixture(scope="session")
def mstar_subset(mstar_root: Path, tmp_path_factory) -> Path:
    """Real MSTAR chips, the first 24 of every class in each split, copied to a temp dir: the real layout
    and JPEGs at a size a stage test can run end to end in seconds (the read-only original is untouched)."""
    root = tmp_path_factory.mktemp("mstar_subset")
    for split in ("train_17deg", "test_15deg"):
        for cls in sorted(p for p in (mstar_root / split).iterdir() if p.is_dir()):
            (root / split / cls.name).mkdir(parents=True)
            for chip in sorted(cls.iterdir())[:24]:
                shutil.copyfile(chip, root / split / cls.name / chip.name)
    return root
