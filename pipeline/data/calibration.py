"""Per-chip intensity calibration of the synthetic replica to the real 2022 chips.

The real sample (413 unlabelled chips per modality, not in the repo) is split by chip id into two fixed
halves (`split_ids`): the *fit* half gives a compact table of per-chip intensity quantiles
(QUANTILE_LEVELS, grey levels 0-255, one row per real chip, SAR and EO of the same id side by side),
written to CALIBRATION_TABLE and committed (derived statistics only, no images); the *holdout* half is
what the realism test (`python -m pipeline.data.realism --real-subset holdout`) measures against, so the
reported realism is not measured on the chips the table saw. The table also keeps each real SAR chip's
texture (`texture_descriptor`: autocorrelation of the clutter around the chip's centre at TEXTURE_LAGS). The
generator (pipeline.data.synth, CALIBRATED_MODALITIES) maps a rendered chip onto a target row near one real chip
drawn among the TEXTURE_NEIGHBOURS real chips whose texture is nearest to its own (`random_targets`, `match_quantiles`): in
real chips the grey-level spread and the texture go together (a smooth chip has a wide spread), and a target
drawn at random broke that (README, realism).

    python -m pipeline.data.calibration --real ../shared/data/mavoc2022_sample
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, exit_on_user_error

# Probabilities of the stored quantiles, min and max included: 33 evenly spaced, plus 0.5/1/2 % at each tail. With
# the even levels alone the top 3 % of a chip was mapped linearly from q96.9 to the max, which put the rendered
# chips' p99 above the real ones' (version 6; README, realism).
QUANTILE_LEVELS = np.unique(np.r_[np.linspace(0.0, 1.0, 33), 0.005, 0.01, 0.02, 0.98, 0.99, 0.995])
CALIBRATION_TABLE = Path(__file__).with_name("real_quantiles.npz")
SUBSETS = ("all", "fit", "holdout")
MIX_MAX = 0.5  # a target is row a + w (row b - row a) of two real chips a, b, w uniform in [0, MIX_MAX]: no exact
#                repeats of the table's rows (a classifier learned them: README, realism), still near one real chip
TEXTURE_LAGS = (1, 2, 4)  # pixel lags of the texture descriptor (the realism statistics' autocorrelations)
TEXTURE_NEIGHBOURS = 8  # a rendered SAR chip's target is drawn among this many real chips nearest in texture
MODALITY_PREFIXES = ("sar_", "eo_")  # a chip's id is its file name without extension and modality prefix


def chip_id(path: Path) -> str:
    """The id a real chip shares across modalities: 'SAR_100578.png' and 'EO_100578.png' -> '100578'."""
    stem = Path(path).stem
    for prefix in MODALITY_PREFIXES:
        if stem.lower().startswith(prefix):
            return stem[len(prefix):]
    return stem


def _hash_key(identifier: str) -> str:
    return hashlib.sha256(identifier.encode()).hexdigest()


def split_ids(ids: list[str]) -> tuple[list[str], list[str]]:
    """(fit, holdout): the distinct ids in the order of their SHA-256, alternately (every other one)."""
    ordered = sorted(set(ids), key=_hash_key)
    return sorted(ordered[0::2]), sorted(ordered[1::2])


def select_subset(paths: list[Path], subset: str) -> list[Path]:
    """The paths whose chip id falls in `subset` ('all', 'fit' or 'holdout') of `split_ids`."""
    if subset not in SUBSETS:
        raise UserError(f"real subset '{subset}': expected one of {', '.join(SUBSETS)}")
    if subset == "all":
        return list(paths)
    fit, holdout = split_ids([chip_id(p) for p in paths])
    keep = set(fit if subset == "fit" else holdout)
    return [p for p in paths if chip_id(p) in keep]


def chip_quantiles(chip: np.ndarray) -> np.ndarray:
    """The QUANTILE_LEVELS quantiles of one chip's intensities (in the chip's own units)."""
    return np.quantile(np.asarray(chip, dtype=np.float64), QUANTILE_LEVELS)


def match_quantiles(chip: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`chip` mapped monotonically so that its QUANTILE_LEVELS quantiles become `target` (float32).

    Each value is placed by linear interpolation between the chip's own quantiles and sent to the same
    place between the target's, so the ordering of pixels (the spatial structure) is kept."""
    source = chip_quantiles(chip)
    if source[-1] - source[0] < 1e-9:  # a flat chip has no ordering to keep: it takes the target's median
        return np.full(np.shape(chip), np.interp(0.5, QUANTILE_LEVELS, target), np.float32)
    ramp = 1e-9 * (source[-1] - source[0]) * np.arange(len(source))  # strictly increasing knots for ties
    mapped = np.interp(np.asarray(chip, dtype=np.float64), source + ramp, np.asarray(target, dtype=np.float64))
    return mapped.astype(np.float32)


def autocorrelation(z: np.ndarray, lag: int, mask: np.ndarray | None = None) -> float:
    """Mean of the horizontal and vertical normalised autocorrelation of a zero-mean image at `lag` pixels, over
    the pixel pairs that lie wholly in `mask` (boolean, default all; `z` is zero outside it); 0 for a flat or too
    small image."""
    if z.shape[0] <= lag or z.shape[1] <= lag:
        return 0.0
    inside = np.ones(z.shape, dtype=bool) if mask is None else mask
    var = float((z * z).sum() / max(inside.sum(), 1))
    if var < 1e-12:
        return 0.0
    h = float((z[:, :-lag] * z[:, lag:]).sum() / max((inside[:, :-lag] & inside[:, lag:]).sum(), 1))
    v = float((z[:-lag, :] * z[lag:, :]).sum() / max((inside[:-lag, :] & inside[lag:, :]).sum(), 1))
    return (h + v) / (2 * var)


def texture_descriptor(chip: np.ndarray) -> np.ndarray:
    """Autocorrelation at TEXTURE_LAGS of a chip's clutter: its frame around the central third (where the object
    stands, so the descriptor says little about the object); the same for any affine map of the grey levels. NaN
    where the frame is flat or empty (no texture to match). The generator reads it on the rendered chip before
    `match_quantiles`, whose map is increasing but not affine: the mapped chip's descriptor differs by about 0.015
    a lag (README, realism; a descriptor of grey-level ranks, the same before and after, matched worse)."""
    x = np.asarray(chip, dtype=np.float64)
    frame = np.zeros(x.shape, dtype=bool)
    (n0, n1), (q0, q1) = x.shape, (x.shape[0] // 3, x.shape[1] // 3)
    frame[:q0], frame[n0 - q0:], frame[:, :q1], frame[:, n1 - q1:] = True, True, True, True
    if q0 == 0 or q1 == 0 or np.ptp(x[frame]) == 0:
        return np.full(len(TEXTURE_LAGS), np.nan, np.float32)
    z = np.where(frame, x - x[frame].mean(), 0.0)
    return np.array([autocorrelation(z, lag, frame) for lag in TEXTURE_LAGS], np.float32)


def random_targets(table: dict[str, np.ndarray], rng: np.random.Generator,
                   texture: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Target quantile rows (grey levels) per modality for one chip: between two real chips of `table`, nearer the
    first, drawn at random, or, given the chip's `texture` (`texture_descriptor`; ignored if NaN), two different
    ones among the TEXTURE_NEIGHBOURS real SAR chips nearest to it; the same chips and weight for every modality."""
    if texture is None or not np.all(np.isfinite(texture)):
        first, second = rng.integers(len(table["ids"]), size=2)
    else:
        distance = ((table["sar_texture"].astype(np.float64) - np.asarray(texture, np.float64)) ** 2).sum(axis=1)
        near = np.argsort(distance, kind="stable")[:TEXTURE_NEIGHBOURS]
        first, second = rng.choice(near, size=2, replace=len(near) < 2)  # two different chips: no exact row
    weight = rng.uniform(0.0, MIX_MAX)
    return {m: (1.0 - weight) * table[m][first].astype(np.float64) + weight * table[m][second].astype(np.float64)
            for m in ("sar", "eo")}


# ----------------------------------------------------------------------------- the table


def build_table(real_root: Path) -> dict[str, np.ndarray]:
    """Quantile rows of the fit half of the real chips that exist in both modalities and are not blank, and
    their SAR chips' texture descriptors."""
    from pipeline.data.realism import chip_paths, read_chips

    by_modality = {m: {chip_id(p): p for p in chip_paths(real_root, m)} for m in ("sar", "eo")}
    paired = sorted(set(by_modality["sar"]) & set(by_modality["eo"]))
    if len(paired) < 2:
        raise UserError(f"{real_root}: fewer than 2 chip ids with both a SAR and an EO chip "
                        f"(expected files like SAR_<id>.png and EO_<id>.png)")
    fit, _ = split_ids(paired)
    rows: dict[str, list[np.ndarray]] = {"sar": [], "eo": []}
    kept, textures = [], []
    for identifier in fit:
        chips = {m: 255.0 * read_chips([by_modality[m][identifier]], 1, np.random.default_rng(0))[0] for m in rows}
        if any(c.max() == c.min() for c in chips.values()):  # blank chips: the generator draws its own
            continue
        kept.append(identifier)
        textures.append(texture_descriptor(chips["sar"]))
        for m, chip in chips.items():
            rows[m].append(chip_quantiles(chip))
    return {"levels": QUANTILE_LEVELS.astype(np.float32), "ids": np.array(kept),
            "sar_texture": np.array(textures, np.float32).reshape(len(kept), len(TEXTURE_LAGS)),
            "texture_lags": np.array(TEXTURE_LAGS, np.int16),
            **{m: np.clip(np.rint(np.array(r)), 0, 255).astype(np.uint8) for m, r in rows.items()}}


def write_table(table: dict[str, np.ndarray], path: Path) -> None:
    np.savez_compressed(path, **table)


@functools.lru_cache(maxsize=4)
def load_table(path: Path = CALIBRATION_TABLE) -> dict[str, np.ndarray]:
    """The committed table: levels, ids, per modality an (n_chips, len(levels)) array of grey levels, and
    sar_texture, (n_chips, len(TEXTURE_LAGS)), with the texture_lags it was computed at."""
    try:
        with np.load(path) as data:
            table = {k: data[k] for k in data.files}
    except OSError as err:
        raise UserError(f"cannot read the calibration table {path}: {err}") from None
    current = ("sar_texture" in table and "texture_lags" in table and tuple(table["texture_lags"]) == TEXTURE_LAGS
               and table["sar_texture"].shape == (len(table["ids"]), len(TEXTURE_LAGS))
               and table["levels"].shape == QUANTILE_LEVELS.shape and np.allclose(table["levels"], QUANTILE_LEVELS))
    if not current:
        raise UserError(f"{path}: written by an older version (no texture column, other texture lags or other "
                        f"quantile levels); rebuild it (python -m pipeline.data.calibration)")
    return table


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.calibration", description=__doc__.split("\n")[0])
    p.add_argument("--real", type=Path, required=True, help="folder of the real 2022 chips (with SAR/ and EO/)")
    p.add_argument("--out", type=Path, default=CALIBRATION_TABLE, help="the table file (.npz)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    table = build_table(args.real)
    try:
        write_table(table, args.out)
    except OSError as err:
        raise UserError(f"cannot write {args.out}: {err.strerror or err}") from None
    print(f"wrote {args.out}: {len(table['ids'])} real chips (fit half, blank ones left out) x "
          f"{len(QUANTILE_LEVELS)} quantiles, SAR and EO, and SAR textures; {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
