"""The embedded default dataset: a synthetic replica of the MAVOC EO/SAR vehicle chips, official layout.

Every object is built once as a pose (heading, position, physical dimensions drawn per class) and
drawn in both modalities on the same ground patch of EXTENT_M metres:
- EO: optical top view with paint, glass, open beds, a cast shadow from a per-chip sun, asphalt /
  concrete / grass texture, parking stripes, illumination changes and a mild blur;
- SAR: radar view from a per-chip look direction: bright dihedrals on the walls facing the sensor,
  layover of roofs towards it, a radar shadow behind the object, point scatterers, textured clutter,
  all imaged coherently through an elongated impulse response (single-look speckle, blob-like
  returns) on a canvas wider than the chip, then cropped, and log-like scaling into uint8.
Each object's random generator derives from (seed, split, index), so the output does not depend on
the number of worker processes.

    python -m pipeline.data.synth --out data/synthetic --scale quick --seed 0
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shutil
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np

from pipeline.classes import NUM_OFFICIAL_CLASSES, OFFICIAL_COUNTS, OFFICIAL_NAMES, OOD_LABEL
from pipeline.data.calibration import load_table, match_quantiles, random_targets, texture_descriptor
from pipeline.errors import UserError, exit_on_user_error

GENERATOR_VERSION = 6  # bump on any change to what the generator draws: run_all regenerates its default dataset
EXTENT_M = 12.0  # ground side of every chip in metres, both modalities
QUICK_TOTAL = 4_000  # training pairs of the quick scale
FLOOR = 40  # fewest training pairs per class at the quick and integer scales
TINY_PER_CLASS = 8
TEST_PER_CLASS = {"tiny": 3, "quick": 100, "full": 360}  # integer scales use the quick test set
TEST_OOD = {"tiny": 3, "quick": 100, "full": 400}  # out-of-distribution test chips, split over OOD_KINDS
OOD_KINDS = ("tank", "boat_on_trailer", "excavator")
MIN_CHIP_SIZE = 8
EO_SUPERSAMPLE = 3  # polygons are drawn on a grid this many times finer, then area-averaged
EO_BLUR_M = (0.18, 0.38)  # range of the optical blur (Gaussian sd) in metres
EO_LOG_EXPOSURE = (-0.2, 0.4)  # mean, sd of the log exposure
EO_BLACK_LEVEL = (0.03, 0.07)  # range of the camera's black level (0-1 display units)
EO_NOISE = (1.0, 3.5)  # range of the sd of the sensor noise (grey levels)
SAR_SUPERSAMPLE = 2
# SAR: calibrated by eye and with python -m pipeline.data.realism against the real 2022 chips (README, realism)
SAR_MARGIN = 8  # px of SAR canvas beyond each chip side: clutter, speckle and blur are computed there, then cropped
SAR_RESOLUTION_PX = ((1.3, 1.6), (0.75, 0.95))  # impulse response: range of its width (px) along its long axis;
#                                                 range of the ratio across / along (elongated speckle grains)
SAR_LOOKS = 1  # independent looks averaged into the intensity (1: deep dark speckle nulls, as in the real chips)
SAR_TEXTURE_DEPTH = (1.2, 2.0)  # range of the sd of the log clutter reflectivity (large-scale texture)
SAR_TEXTURE_GRAIN_PX = (8.0, 20.0)  # range of the grain (Gaussian sd, px) of that texture
SAR_CONTRAST_LOG10 = (-0.2, 0.6)  # range of the log10 target-to-clutter ratio (0.1 up in version 5: deeper clutter hid the class)
SAR_DISPLAY_POWER = (0.16, 0.18)  # range of the Box-Cox power of the display mapping (0: log, 0.5: amplitude)
SAR_DISPLAY_SPREAD = (0.2, 0.012)  # mean, sd of the display contrast (fraction of the level per unit transformed ratio)
SAR_DISPLAY_LEVEL = (0.39, 0.04)  # mean, sd of the display level of the chip's median intensity (0-1)
SAR_DISPLAY_TOE = (0.07, 0.08)  # range of the display level below which values are compressed towards 0
SAR_PIXEL_NOISE = (0.0, 0.01)  # range of the sd of pixel-level display noise (receiver, resampling)
SAR_SIZE_MIX = {56: 328, 57: 39, 58: 42, 59: 4}  # SAR chip sides in the 413 real 2022 chips (their counts)
SAR_PX_PER_M = 56 / EXTENT_M  # pixel spacing of the size mix: a 56-px chip spans EXTENT_M
# Calibration to the real chips (pipeline.data.calibration): each chip's intensities are mapped onto the quantiles of
# one real chip drawn among those nearest in texture (SAR); set on the fit half of the real sample's realism statistics
# (README, realism)
CALIBRATE_TO_REAL = True  # the default of generate(); --uncalibrated turns it off (this version's chips, unmapped)
CALIBRATED_MODALITIES = ("sar",)  # which modalities it maps when on; EO left out: its realism CNN AUROC rose (README)
EO_CALIBRATED_NOISE = 0.5  # EO, where calibrated: the sensor noise, added after the mapping, at this fraction of EO_NOISE
BLANK_PROBABILITY = 1 / 413  # all-zero SAR chips (one in the real sample)
LOT_PROBABILITY = 0.55  # chance that the object stands in a parking row (neighbours side by side, stall lines)
NEIGHBOUR_PROBABILITY = 0.35  # otherwise: chance of one parked car beside the object
AXIS_ALIGNED_PROBABILITY = 0.5  # chance that the scene is aligned with the image axes (as lots and streets are)
TRAIN_STREAM, TEST_STREAM, NAME_STREAM = 0, 1, 2
_SHIFT = 4  # fractional bits of polygon vertex coordinates passed to OpenCV
_ONE = 1 << _SHIFT


# ----------------------------------------------------------------------------- counts


def _parse_scale(scale: str | int) -> str | int:
    if isinstance(scale, (int, np.integer)) and not isinstance(scale, bool):
        return int(scale)
    text = str(scale).strip().lower()
    if text in TEST_PER_CLASS:
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"scale '{scale}' is not tiny, quick, full or a whole number of training pairs")


def _floored_shares(total: int, weights: tuple[int, ...], floor: int) -> list[int]:
    """Split `total` in proportion to `weights`, no share below `floor` (largest-remainder rounding)."""
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        budget = total - floor * len(fixed)
        weight_sum = sum(weights[i] for i in free)
        raw = {i: budget * weights[i] / weight_sum for i in free}
        low = [i for i in free if raw[i] < floor]
        if not low:
            break
        fixed.update(low)
    counts = [floor if i in fixed else math.floor(raw[i]) for i in range(len(weights))]
    by_remainder = sorted(free, key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def scale_counts(scale: str | int) -> list[int]:
    """Training pairs per official class id: real counts (full), 8 each (tiny), or ratios with a floor."""
    scale = _parse_scale(scale)
    if scale == "full":
        return list(OFFICIAL_COUNTS)
    if scale == "tiny":
        return [TINY_PER_CLASS] * NUM_OFFICIAL_CLASSES
    total = QUICK_TOTAL if scale == "quick" else scale
    if total < FLOOR * NUM_OFFICIAL_CLASSES:
        raise UserError(
            f"scale {total} is too small: an integer scale needs at least {FLOOR * NUM_OFFICIAL_CLASSES} "
            f"pairs ({FLOOR} per class); use --scale tiny for a few pairs per class"
        )
    return _floored_shares(total, OFFICIAL_COUNTS, FLOOR)


def counts_of_test_set(scale: str | int) -> tuple[int, list[int]]:
    """Test chips per official class, and per OOD kind (in OOD_KINDS order)."""
    scale = _parse_scale(scale)
    key = scale if isinstance(scale, str) else "quick"
    n_ood, k = TEST_OOD[key], len(OOD_KINDS)
    return TEST_PER_CLASS[key], [n_ood // k + (i < n_ood % k) for i in range(k)]


# ----------------------------------------------------------------------------- object geometry


class Part(NamedTuple):
    """A solid block of an object: convex footprint (metres), top height, EO reflectance, SAR factor."""

    poly: np.ndarray
    z: float
    tone: float
    rcs: float = 1.0


class Shape(NamedTuple):
    """An object: solid parts, EO-only markings (polygon, reflectance), open-top cavities (polygon, wall height)."""

    parts: list[Part]
    paints: list[tuple[np.ndarray, float]]
    cavities: list[tuple[np.ndarray, float]]


def _rect(x0: float, x1: float, width: float, y: float = 0.0) -> np.ndarray:
    """Rectangle from x0 to x1 along the object (x = forward), `width` across, centred at y."""
    h = width / 2
    return np.array([[x0, y - h], [x1, y - h], [x1, y + h], [x0, y + h]])


def _turned(poly: np.ndarray, angle: float, offset: tuple[float, float] | np.ndarray = (0.0, 0.0)) -> np.ndarray:
    """Points rotated by `angle` about the origin, then translated by `offset`."""
    c, s = math.cos(angle), math.sin(angle)
    return poly @ np.array([[c, s], [-s, c]]) + np.asarray(offset, dtype=np.float64)


def _moved(shape: Shape, angle: float, offset: tuple[float, float] | np.ndarray = (0.0, 0.0)) -> Shape:
    """The shape rotated by `angle` about the origin, then translated by `offset`."""
    return Shape(
        [p._replace(poly=_turned(p.poly, angle, offset)) for p in shape.parts],
        [(_turned(poly, angle, offset), tone) for poly, tone in shape.paints],
        [(_turned(poly, angle, offset), z) for poly, z in shape.cavities],
    )


def _merged(*shapes: Shape) -> Shape:
    return Shape(
        [p for s in shapes for p in s.parts],
        [p for s in shapes for p in s.paints],
        [c for s in shapes for c in s.cavities],
    )


def _normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, mean + sd * rng.standard_normal()))


def _car_paint(rng: np.random.Generator) -> float:
    """Paint reflectance: white, silver, grey, black or a colour."""
    u = rng.random()
    base = 0.85 if u < 0.25 else 0.62 if u < 0.45 else 0.4 if u < 0.6 else 0.1 if u < 0.8 else rng.uniform(0.18, 0.5)
    return float(np.clip(base + 0.04 * rng.standard_normal(), 0.04, 0.95))


def _glass(rng: np.random.Generator) -> float:
    return rng.uniform(0.05, 0.22)


def _sedan(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 4.75, 0.25, 4.2, 5.3), _normal(rng, 1.82, 0.06, 1.65, 2.0)
    height, paint, glass = _normal(rng, 1.45, 0.05, 1.33, 1.6), _car_paint(rng), _glass(rng)
    cab0, cab1 = -0.30 * length + rng.uniform(-0.1, 0.1), 0.19 * length
    return Shape(
        [Part(_rect(-length / 2, length / 2, width), 0.85, paint),
         Part(_rect(cab0, cab1, 0.88 * width), height, paint, 0.8)],
        [(_rect(cab1 - 0.1 * length, cab1, 0.86 * width), glass),
         (_rect(cab0, cab0 + 0.07 * length, 0.84 * width), glass)],
        [],
    )


def _suv(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 4.85, 0.3, 4.2, 5.4), _normal(rng, 1.92, 0.07, 1.75, 2.1)
    height, paint, glass = _normal(rng, 1.76, 0.08, 1.55, 1.95), _car_paint(rng), _glass(rng)
    cab0, cab1 = -length / 2 + 0.15, 0.22 * length
    return Shape(
        [Part(_rect(-length / 2, length / 2, width), 1.0, paint),
         Part(_rect(cab0, cab1, 0.92 * width), height, paint, 0.9)],
        [(_rect(cab1 - 0.09 * length, cab1, 0.9 * width), glass),
         (_rect(cab0, cab0 + 0.04 * length, 0.86 * width), glass)],
        [],
    )


def _pickup(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 5.5, 0.35, 4.8, 6.2), _normal(rng, 2.0, 0.07, 1.8, 2.15)
    height, paint, glass = _normal(rng, 1.88, 0.07, 1.7, 2.05), _car_paint(rng), _glass(rng)
    cab1 = 0.2 * length
    cab0 = cab1 - rng.uniform(0.24, 0.34) * length  # regular or crew cab
    bed1 = cab0 - 0.05
    bed = _rect(-length / 2 + 0.12, bed1, width - 0.24)
    return Shape(
        [Part(_rect(-length / 2, length / 2, width), 1.0, paint),
         Part(_rect(cab0, cab1, 0.92 * width), height, paint, 0.9)],
        [(_rect(cab1 - 0.09 * length, cab1, 0.9 * width), glass), (bed, paint * 0.45 + 0.04)],
        [(bed, 0.55)],
    )


def _van(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 5.2, 0.4, 4.6, 6.2), _normal(rng, 1.98, 0.08, 1.8, 2.15)
    height, paint, glass = _normal(rng, 2.1, 0.22, 1.75, 2.7), _car_paint(rng), _glass(rng)
    box1 = rng.uniform(0.28, 0.36) * length
    return Shape(
        [Part(_rect(-length / 2, length / 2, width), 0.95, paint),
         Part(_rect(-length / 2, box1, 0.97 * width), height, paint, 1.0)],
        [(_rect(box1 - 0.08 * length, box1, 0.95 * width), glass)],
        [],
    )


def _truck_cab(rng: np.random.Generator, front: float, width: float, paint: float) -> tuple[list[Part], list]:
    """A truck cab ending at x = front: cab block and windshield."""
    cab_len, cab_h = rng.uniform(1.9, 2.4), rng.uniform(2.5, 3.0)
    return (
        [Part(_rect(front - cab_len, front, width - 0.1), cab_h, paint, 1.1)],
        [(_rect(front - 0.45, front, width - 0.15), _glass(rng))],
    )


def _box_truck(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 7.8, 0.9, 6.0, 10.0), _normal(rng, 2.4, 0.08, 2.2, 2.55)
    height, paint = _normal(rng, 3.4, 0.25, 2.9, 4.0), _car_paint(rng)
    box_tone = _normal(rng, 0.85, 0.05, 0.6, 0.95) if rng.random() < 0.65 else _car_paint(rng)
    cab, cab_paints = _truck_cab(rng, length / 2, width, paint)
    box1 = length / 2 - 2.5
    ribs = [(_rect(x - 0.06, x + 0.06, width - 0.1), box_tone * 0.85)
            for x in np.arange(-length / 2 + 0.8, box1 - 0.4, 1.2)]
    return Shape(cab + [Part(_rect(-length / 2, box1, width), height, box_tone, 1.3)], cab_paints + ribs, [])


def _motorcycle(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 2.15, 0.12, 1.8, 2.5), _normal(rng, 0.8, 0.08, 0.6, 0.95)
    paint = _car_paint(rng)
    parts = [Part(_rect(-length / 2, length / 2, 0.34), 0.9, paint, 0.8),
             Part(_rect(0.28 * length - 0.06, 0.28 * length + 0.06, width), 1.1, 0.3, 0.6)]
    if rng.random() < 0.6:  # rider
        parts.append(Part(_rect(-0.25, 0.2, 0.5), _normal(rng, 1.45, 0.08, 1.3, 1.6), rng.uniform(0.08, 0.5), 0.7))
    return Shape(parts, [], [])


def _flatbed(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 8.0, 1.0, 6.3, 10.5), _normal(rng, 2.4, 0.08, 2.2, 2.55)
    paint, deck = _car_paint(rng), rng.uniform(0.2, 0.55)
    cab, cab_paints = _truck_cab(rng, length / 2, width, paint)
    bed1 = length / 2 - 2.5
    deck_z = _normal(rng, 1.15, 0.08, 1.0, 1.3)
    parts = cab + [Part(_rect(-length / 2, bed1, width), deck_z, deck, 0.7)]
    if rng.random() < 0.45:  # some cargo on the deck
        cargo_len = rng.uniform(0.8, 0.6 * (bed1 + length / 2))
        x0 = rng.uniform(-length / 2, bed1 - cargo_len)
        parts.append(Part(_rect(x0, x0 + cargo_len, rng.uniform(0.5, 0.95) * width), deck_z + rng.uniform(0.4, 1.4),
                          rng.uniform(0.1, 0.9), 1.2))
    return Shape(parts, cab_paints, [])


def _bus(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 11.5, 1.0, 9.5, 13.5), _normal(rng, 2.55, 0.04, 2.45, 2.6)
    height = _normal(rng, 3.2, 0.1, 3.0, 3.5)
    tone = _normal(rng, 0.85, 0.05, 0.6, 0.95) if rng.random() < 0.5 else _car_paint(rng)
    ac_x = rng.uniform(-0.25, 0.1) * length
    parts = [Part(_rect(-length / 2, length / 2, width), height, tone, 1.2),
             Part(_rect(ac_x - 1.3, ac_x + 1.3, 1.6), height + 0.25, rng.uniform(0.5, 0.9), 0.8)]
    hatches = [(_rect(x - 0.35, x + 0.35, 0.7), tone * 0.7) for x in (0.3 * length, -0.4 * length)]
    return Shape(parts, [(_rect(length / 2 - 0.3, length / 2, width - 0.1), _glass(rng))] + hatches, [])


def _with_trailer(tractor: Shape, tractor_rear: float, hitch_gap: float, trailer: Shape, angle: float) -> Shape:
    """Tractor plus a trailer (built with its hitch at the origin, body towards -x) turned by `angle`."""
    whole = _merged(tractor, _moved(trailer, angle, (tractor_rear - hitch_gap, 0.0)))
    xs = np.concatenate([p.poly[:, 0] for p in whole.parts])
    return _moved(whole, 0.0, (-(xs.min() + xs.max()) / 2, 0.0))


def _pickup_w_trailer(rng: np.random.Generator) -> Shape:
    truck = _pickup(rng)
    rear = min(p.poly[:, 0].min() for p in truck.parts)
    t_len, t_wid = _normal(rng, 4.0, 0.9, 2.4, 6.5), _normal(rng, 2.0, 0.15, 1.5, 2.4)
    tongue = rng.uniform(0.9, 1.5)
    body = _rect(-tongue - t_len, -tongue, t_wid)
    parts = [Part(_rect(-tongue - 0.05, 0.0, 0.15), 0.5, 0.25, 1.5)]
    if rng.random() < 0.55:  # open utility trailer: low walls around a deck
        wall_z, tone = rng.uniform(0.6, 1.1), rng.uniform(0.2, 0.6)
        inner = _rect(-tongue - t_len + 0.1, -tongue - 0.1, t_wid - 0.2)
        trailer = Shape(parts + [Part(body, wall_z, tone, 1.0)], [(inner, tone * 0.6)], [(inner, wall_z)])
    else:  # enclosed cargo trailer
        tone = _normal(rng, 0.8, 0.1, 0.3, 0.95)
        trailer = Shape(parts + [Part(body, rng.uniform(1.8, 2.5), tone, 1.2)], [], [])
    return _with_trailer(truck, rear, 0.15, trailer, _normal(rng, 0.0, 0.18, -0.45, 0.45))


def _semi_w_trailer(rng: np.random.Generator) -> Shape:
    t_len, width = _normal(rng, 6.2, 0.4, 5.5, 7.2), 2.5
    paint = _car_paint(rng)
    hood = rng.uniform(1.2, 1.9)
    cab0, cab_h = t_len / 2 - hood - rng.uniform(2.0, 3.2), rng.uniform(3.3, 4.0)
    tractor = Shape(
        [Part(_rect(-t_len / 2, t_len / 2, 2.3), 1.1, 0.2, 0.9),
         Part(_rect(t_len / 2 - hood, t_len / 2, 1.9), 1.9, paint, 1.0),
         Part(_rect(cab0, t_len / 2 - hood, width), cab_h, paint, 1.2)],
        [(_rect(t_len / 2 - hood - 0.5, t_len / 2 - hood, width - 0.1), _glass(rng))],
        [],
    )
    tr_len, tone = _normal(rng, 14.5, 1.0, 12.0, 16.2), _normal(rng, 0.8, 0.1, 0.35, 0.95)
    kingpin = 1.0
    trailer = Shape([Part(_rect(-tr_len + kingpin, kingpin, 2.6), _normal(rng, 4.0, 0.1, 3.7, 4.2), tone, 1.3)],
                    [(_rect(x - 0.05, x + 0.05, 2.5), tone * 0.88)
                     for x in np.arange(kingpin - 1.0, kingpin - tr_len, -1.5)],
                    [])
    fifth_wheel = -t_len / 2 + 1.4
    return _with_trailer(tractor, fifth_wheel, 0.0, trailer, _normal(rng, 0.0, 0.2, -0.5, 0.5))


def _tank(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 7.0, 0.35, 6.3, 7.8), _normal(rng, 3.5, 0.12, 3.2, 3.8)
    tone = rng.uniform(0.18, 0.4)
    radius = rng.uniform(1.4, 1.8)
    turret_x = rng.uniform(-0.6, 0.2)
    turn = rng.normal(0.0, 0.8)
    ang = np.arange(8) * (math.pi / 4) + math.pi / 8
    turret = np.stack([radius * 1.15 * np.cos(ang), radius * np.sin(ang)], axis=1)
    barrel = _rect(radius * 0.9, radius + rng.uniform(3.8, 5.0), 0.22)
    top = _moved(Shape([Part(turret, 2.5, tone * 1.1, 1.2), Part(barrel, 2.3, tone * 0.9, 1.5)], [], []),
                 turn, (turret_x, 0.0))
    tracks = [(_rect(-length / 2, length / 2, 0.6, y), 0.1) for y in (-(width / 2 - 0.3), width / 2 - 0.3)]
    return _merged(Shape([Part(_rect(-length / 2, length / 2, width), 1.9, tone, 1.3)], tracks, []), top)


def _boat_on_trailer(rng: np.random.Generator) -> Shape:
    length, width = _normal(rng, 6.2, 0.8, 4.8, 7.8), _normal(rng, 2.3, 0.15, 1.9, 2.6)
    tone = _normal(rng, 0.85, 0.07, 0.5, 0.95)
    x_sh = length / 2 - 0.35 * length

    def hull(scale: float) -> np.ndarray:
        w = width * scale / 2
        return np.array([[-length / 2 * scale, -w], [x_sh * scale, -w], [length / 2 * scale, 0.0],
                         [x_sh * scale, w], [-length / 2 * scale, w]])

    tongue = _rect(length / 2 - 0.3, length / 2 + rng.uniform(1.3, 2.0), 0.14)
    parts = [Part(hull(1.0), _normal(rng, 1.7, 0.12, 1.4, 2.0), tone, 1.0), Part(tongue, 0.5, 0.25, 1.5)]
    for y in (-(width / 2 + 0.15), width / 2 + 0.15):
        parts.append(Part(_rect(-0.8, 0.1, 0.3, y), 0.7, 0.15, 1.2))
    paints = [(hull(0.75), rng.uniform(0.3, 0.6))]
    if rng.random() < 0.6:  # centre console
        parts.append(Part(_rect(-0.3, 0.5, 0.7), 2.2, rng.uniform(0.4, 0.9), 1.0))
    return Shape(parts, paints, [])


def _excavator(rng: np.random.Generator) -> Shape:
    t_len, t_wid = _normal(rng, 4.0, 0.3, 3.4, 4.8), _normal(rng, 2.8, 0.15, 2.4, 3.2)
    tone = _normal(rng, 0.7, 0.08, 0.45, 0.9)
    tracks = [Part(_rect(-t_len / 2, t_len / 2, 0.6, y), 0.9, 0.12, 1.3) for y in (-(t_wid / 2 - 0.3), t_wid / 2 - 0.3)]
    boom_len = rng.uniform(3.8, 5.5)
    house = Shape(
        [Part(_rect(-1.8, 1.2, 2.5), 2.3, tone, 1.1),
         Part(_rect(0.1, 1.2, 0.95, 0.75), 3.0, tone, 1.2),
         Part(_rect(1.0, 1.0 + boom_len, 0.55, -0.3), rng.uniform(2.2, 3.2), tone, 1.4),
         Part(_rect(0.6 + boom_len, 1.6 + boom_len, 1.1, -0.3), 0.9, 0.2, 1.4)],
        [(_rect(0.9, 1.2, 0.9, 0.75), _glass(rng))],
        [],
    )
    return _merged(Shape(tracks, [], []), _moved(house, rng.uniform(-math.pi, math.pi)))


BUILDERS: tuple[Callable[[np.random.Generator], Shape], ...] = (
    _sedan, _suv, _pickup, _van, _box_truck, _motorcycle, _flatbed, _bus, _pickup_w_trailer, _semi_w_trailer,
    _tank, _boat_on_trailer, _excavator,
)  # index = official class id, then NUM_OFFICIAL_CLASSES + index in OOD_KINDS


class Scene(NamedTuple):
    """Ground context around the object (metres, chip centre at 0), drawn in both modalities.

    lines: painted stripes and kerbs (polygon, EO reflectance, SAR strength; 0 = invisible to radar);
    blocks: buildings and trees (polygon, height m, EO reflectance, SAR factor; tree = rough canopy)."""

    lines: list[tuple[np.ndarray, float, float]]
    blocks: list[tuple[np.ndarray, float, float, float, bool]]


NEIGHBOUR_BUILDERS = (_sedan, _suv, _pickup, _van)
NEIGHBOUR_WEIGHTS = np.array([0.62, 0.2, 0.1, 0.08])


def _extent(shape: Shape) -> tuple[float, float, float, float]:
    """(x min, x max, y min, y max) of the solid parts."""
    pts = np.concatenate([p.poly for p in shape.parts])
    return float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())


def _neighbour(rng: np.random.Generator) -> Shape:
    shape = NEIGHBOUR_BUILDERS[int(rng.choice(len(NEIGHBOUR_BUILDERS), p=NEIGHBOUR_WEIGHTS))](rng)
    return _moved(shape, math.pi if rng.random() < 0.3 else 0.0)


def _parking_row(shape: Shape, rng: np.random.Generator) -> tuple[Shape, list]:
    """Cars parked side by side with the object (and maybe across the aisle), painted stall lines between them."""
    x0, x1, y0, y1 = _extent(shape)
    pitch = rng.uniform(2.5, 3.0)
    neighbours, lines = [], []
    stall0, stall1 = x0 - rng.uniform(0.1, 0.6), x0 + rng.uniform(4.8, 5.6)
    paint = rng.uniform(0.55, 0.9) if rng.random() < 0.7 else 0.0
    for side in (-1.0, 1.0):
        edge = y1 if side > 0 else -y0
        for slot in range(1, 4):
            offset = side * (edge + (slot - 0.5) * pitch + rng.uniform(-0.2, 0.2))
            if rng.random() < 0.8 - 0.15 * slot:
                neighbours.append(_moved(_neighbour(rng), rng.normal(0, 0.04), (rng.normal(0, 0.3), offset)))
            if paint:
                y = side * (edge + (slot - 1) * pitch + 0.35)
                lines.append((_turned(_rect(stall0, stall1, 0.12, y), 0.0), paint, 0.0))
    if rng.random() < 0.35:  # a second row across the aisle or nose to nose
        gap = rng.uniform(0.8, 7.0)
        for k in range(-2, 3):
            if rng.random() < 0.6:
                car = _neighbour(rng)
                cx0, cx1, _, _ = _extent(car)
                neighbours.append(_moved(car, math.pi + rng.normal(0, 0.04),
                                         (x0 - gap - cx1, k * pitch + rng.normal(0, 0.2))))
    return _merged(shape, *neighbours) if neighbours else shape, lines


def _context(rng: np.random.Generator, shape: Shape) -> Scene:
    """Kerbs, buildings and trees beyond the object, none over it."""
    x0, x1, y0, y1 = _extent(shape)
    lines, blocks = [], []
    reach = max(abs(y0), abs(y1)) + 0.5
    if rng.random() < 0.35:  # a kerb (bright dihedral in SAR) along the object, with a sidewalk edge
        y = rng.choice([-1.0, 1.0]) * (reach + rng.uniform(0.3, 3.0))
        lines.append((_rect(-30, 30, rng.uniform(0.2, 0.4), y), rng.uniform(0.4, 0.8), rng.uniform(0.5, 2.0)))
    if rng.random() < 0.25:  # a building beside the scene
        y = rng.choice([-1.0, 1.0]) * (reach + rng.uniform(1.5, 5.0))
        depth = rng.uniform(6.0, 20.0)
        poly = _rect(-30, 30, depth, y + np.sign(y) * depth / 2)
        blocks.append((_turned(poly, rng.normal(0, 0.1)), rng.uniform(3.0, 12.0), rng.uniform(0.2, 0.9),
                       rng.uniform(0.5, 2.0), False))
    for _ in range(int(rng.poisson(0.35))):  # trees
        ang, dist = rng.uniform(0, 2 * math.pi), reach + rng.uniform(1.0, 5.0)
        radius = rng.uniform(1.2, 3.0)
        circle = np.arange(10) * (2 * math.pi / 10)
        poly = np.stack([radius * np.cos(circle), radius * np.sin(circle)], 1) + dist * np.array([math.cos(ang), math.sin(ang)])
        blocks.append((poly, rng.uniform(4.0, 9.0), rng.uniform(0.06, 0.2), rng.uniform(0.3, 0.8), True))
    return Scene(lines, blocks)


def build_scene(kind: int, rng: np.random.Generator) -> tuple[Shape, Scene]:
    """One object of `kind` with its neighbours and ground context, in ground coordinates (metres, chip centre 0).

    The context is drawn the same way for every kind, so it tells nothing about the class."""
    shape = BUILDERS[kind](rng)
    context = _context(rng, shape)  # around the object itself: may overlap neighbours, never the object
    lines: list = []
    if rng.random() < LOT_PROBABILITY:
        shape, lines = _parking_row(shape, rng)
    elif rng.random() < NEIGHBOUR_PROBABILITY:
        _, _, y0, y1 = _extent(shape)
        side = 1.0 if rng.random() < 0.5 else -1.0
        car = _neighbour(rng)
        shape = _merged(shape, _moved(car, rng.normal(0, 0.05),
                                      (rng.normal(0, 1.5), side * ((y1 if side > 0 else -y0) + rng.uniform(1.6, 3.5)))))
    scene = Scene(lines + context.lines, context.blocks)
    heading = rng.uniform(0, 2 * math.pi)
    if rng.random() < AXIS_ALIGNED_PROBABILITY:  # lots and streets along the image axes
        heading = rng.integers(4) * math.pi / 2 + rng.normal(0, 0.06)
    offset = np.clip(rng.normal(0, 0.5, 2), -1.2, 1.2)
    return _moved(shape, heading, offset), Scene(
        [(_turned(poly, heading, offset), eo, sar) for poly, eo, sar in scene.lines],
        [(_turned(poly, heading, offset), z, eo, sar, tree) for poly, z, eo, sar, tree in scene.blocks])


def build_object(kind: int, rng: np.random.Generator) -> Shape:
    """One object of `kind` with its neighbours (no ground context), in ground coordinates."""
    return build_scene(kind, rng)[0]


# ----------------------------------------------------------------------------- drawing helpers


def _to_px(points: np.ndarray, px_per_m: float, centre: float) -> np.ndarray:
    """Metres -> fixed-point pixel coordinates (_SHIFT fractional bits) for OpenCV."""
    return np.round((points * px_per_m + centre) * _ONE).astype(np.int32)


def _fill(img: np.ndarray, points_px: np.ndarray, value: float) -> None:
    cv2.fillConvexPoly(img, points_px, float(value), cv2.LINE_8, _SHIFT)


def _sweep_hull(poly: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Convex hull of a convex polygon swept along `shift` (its shadow)."""
    pts = np.concatenate([poly, poly + shift]).astype(np.float32)
    return cv2.convexHull(pts)[:, 0, :].astype(np.float64)


def _outward_normals(poly: np.ndarray) -> np.ndarray:
    """Unit outward normals of the edges poly[i] -> poly[i+1]."""
    nxt = np.concatenate((poly[1:], poly[:1]))
    edges = nxt - poly
    twice_area = float(np.dot(poly[:, 0], nxt[:, 1]) - np.dot(nxt[:, 0], poly[:, 1]))
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1) * (1.0 if twice_area >= 0 else -1.0)
    return normals / (np.sqrt((normals**2).sum(axis=1, keepdims=True)) + 1e-12)


def _area(poly: np.ndarray) -> float:
    nxt = np.concatenate((poly[1:], poly[:1]))
    return 0.5 * abs(float(np.dot(poly[:, 0], nxt[:, 1]) - np.dot(nxt[:, 0], poly[:, 1])))


@functools.lru_cache(maxsize=None)
def _upsampler(cells: int, n: int) -> np.ndarray:
    """(n, cells) matrix B such that B @ C @ B.T is the bicubic upsampling of a cells x cells grid C."""
    return cv2.resize(np.eye(cells, dtype=np.float32), (cells, n), interpolation=cv2.INTER_CUBIC)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int = 5) -> np.ndarray:
    """Low-frequency noise of about unit amplitude on an n x n grid."""
    up = _upsampler(cells, n)
    return up @ rng.standard_normal((cells, cells), dtype=np.float32) @ up.T


# ----------------------------------------------------------------------------- EO


def render_eo(shape: Shape, scene: Scene, rng: np.random.Generator, size: int, extent_m: float = EXTENT_M) -> np.ndarray:
    """Optical top view of `shape` in its `scene` as a size x size uint8 chip."""
    image, noise = _eo_display(shape, scene, rng, size, extent_m)
    return _quantised(image + noise)


def _quantised(display: np.ndarray) -> np.ndarray:
    """A display image in grey levels (float, 0-255 scale) as a uint8 chip."""
    return np.clip(np.rint(display), 0, 255).astype(np.uint8)


def _eo_display(shape: Shape, scene: Scene, rng: np.random.Generator, size: int,
                extent_m: float = EXTENT_M) -> tuple[np.ndarray, np.ndarray]:
    """The EO chip of `render_eo` before quantisation, as its noise-free image and its sensor noise (float grey
    levels; their sum is the chip), so a calibration can map the image and leave the noise as it is."""
    n = size * EO_SUPERSAMPLE
    px_per_m, centre = n / extent_m, (n - 1) / 2
    sun = rng.uniform(0, 2 * math.pi)
    shadow_per_m = -np.array([math.cos(sun), math.sin(sun)]) / math.tan(rng.uniform(0.45, 1.25))

    ground = rng.random()  # asphalt, concrete or grass
    low, high = (0.12, 0.32) if ground < 0.65 else (0.3, 0.55) if ground < 0.85 else (0.1, 0.25)
    base = rng.uniform(low, high)
    refl = base * (1.0 + rng.uniform(0.04, 0.2) * _smooth_noise(rng, n, 6)
                   + rng.uniform(0.02, 0.1) * _smooth_noise(rng, n, 17))
    if not scene.lines and rng.random() < 0.3:  # a stray road marking
        stripe = _turned(_rect(-20, 20, rng.uniform(0.1, 0.18)), rng.uniform(0, math.pi), rng.uniform(-5, 5, 2))
        _fill(refl, _to_px(stripe, px_per_m, centre), rng.uniform(0.5, 0.9))
    for poly, tone, _ in scene.lines:
        _fill(refl, _to_px(poly, px_per_m, centre), tone * rng.uniform(0.85, 1.1))

    shadow = np.zeros((n, n), np.float32)
    for part in shape.parts:
        _fill(shadow, _to_px(_sweep_hull(part.poly, shadow_per_m * part.z), px_per_m, centre), 1.0)
    for poly, z, _, _, _ in scene.blocks:
        _fill(shadow, _to_px(_sweep_hull(poly, shadow_per_m * z), px_per_m, centre), 1.0)
    refl *= 1.0 - (1.0 - rng.uniform(0.15, 0.4)) * shadow
    for poly, z, tone, _, tree in scene.blocks:
        outline = _to_px(poly, px_per_m, centre)
        if tree:
            canopy = np.zeros((n, n), np.float32)
            _fill(canopy, outline, 1.0)
            texture = np.exp(0.35 * _smooth_noise(rng, n, 23))
            refl = np.where(canopy > 0, tone * texture, refl).astype(np.float32)
        else:
            _fill(refl, outline, tone)
            cv2.polylines(refl, [outline], True, tone * rng.uniform(0.6, 1.3), 2, cv2.LINE_8, _SHIFT)
    gloss = rng.uniform(0.0, 0.1)  # sky reflected by glossy roofs
    for part in sorted(shape.parts, key=lambda p: p.z):
        tone = part.tone * rng.uniform(0.93, 1.07)
        outline = _to_px(part.poly, px_per_m, centre)
        _fill(refl, outline, tone)
        cv2.polylines(refl, [outline], True, tone * 0.55, 1, cv2.LINE_8, _SHIFT)  # rounded sides seen at the rim
        if part.z >= 1.0:
            middle = part.poly.mean(axis=0)
            _fill(refl, _to_px(middle + 0.55 * (part.poly - middle), px_per_m, centre), tone + gloss)
    for poly, tone in shape.paints:
        _fill(refl, _to_px(poly, px_per_m, centre), tone)
    glints = int(rng.poisson(0.6))  # specular glints on roofs and glass
    if glints:
        tops = [p for p in shape.parts if p.z >= 1.0] or shape.parts
        for part in (tops[int(i)] for i in rng.integers(len(tops), size=glints)):
            w = rng.dirichlet(np.ones(len(part.poly)))
            centre_m = w @ part.poly
            _fill(refl, _to_px(_rect(-0.35, 0.35, 0.5) + centre_m, px_per_m, centre), rng.uniform(0.6, 1.5))

    img = cv2.resize(refl, (size, size), interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(*EO_BLUR_M) * size / EXTENT_M)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    exposure = math.exp(rng.normal(*EO_LOG_EXPOSURE))  # cameras and times of day: dark to bright chips
    illum = exposure * (1.0 + gx * ramp[None, :] + gy * ramp[:, None])
    noise = rng.uniform(*EO_NOISE) * rng.standard_normal((size, size), dtype=np.float32)
    black = rng.uniform(*EO_BLACK_LEVEL)  # the camera's black level: even dark chips keep a grey floor
    return 255.0 * (black + (1.0 - black) * np.maximum(img * illum, 0.0) ** rng.uniform(0.85, 1.15)), noise


# ----------------------------------------------------------------------------- SAR


def sar_chip_size(rng: np.random.Generator) -> int:
    """A SAR chip side drawn from the real size mix (SAR_SIZE_MIX)."""
    sizes = np.array(list(SAR_SIZE_MIX))
    weights = np.array(list(SAR_SIZE_MIX.values()), dtype=np.float64)
    return int(rng.choice(sizes, p=weights / weights.sum()))


def _stationary_noise(rng: np.random.Generator, n: int, grain: float) -> np.ndarray:
    """Gaussian-filtered white noise of unit variance on an n x n grid, equally rough up to its borders.

    Filtered on a margin of three grains that is then cut off, so no border is padded with made-up values."""
    margin = int(math.ceil(3.0 * grain))
    white = rng.standard_normal((n + 2 * margin, n + 2 * margin), dtype=np.float32)
    field = cv2.GaussianBlur(white, (0, 0), grain)[margin: margin + n, margin: margin + n]
    return field * np.float32(2.0 * math.sqrt(math.pi) * grain)  # the variance of white noise blurred by `grain`


def _impulse_response(along: float, across: float, angle: float) -> np.ndarray:
    """Elliptical Gaussian point-spread function (unit energy) with widths `along` / `across` px, turned by `angle`."""
    radius = int(math.ceil(3.0 * max(along, across)))
    yy, xx = np.mgrid[-radius: radius + 1, -radius: radius + 1].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    kernel = np.exp(-0.5 * ((u / along) ** 2 + (v / across) ** 2))
    return (kernel / np.sqrt((kernel**2).sum())).astype(np.float32)


def _focused(rng: np.random.Generator, diffuse: np.ndarray, points: np.ndarray, kernel: np.ndarray,
             looks: int) -> np.ndarray:
    """Image intensity of a scene through a coherent radar: `diffuse` reflectivity (random scatterers in every
    pixel: speckle) plus `points` (strong scatterers of fixed power and random phase), convolved with `kernel`
    as complex amplitude, squared and averaged over `looks` independent looks."""
    total = np.zeros_like(diffuse)
    root_diffuse, root_points = np.sqrt(diffuse / 2.0), np.sqrt(points)
    for _ in range(looks):
        phase = rng.uniform(0.0, 2.0 * math.pi, points.shape).astype(np.float32)
        re = root_diffuse * rng.standard_normal(diffuse.shape, dtype=np.float32) + root_points * np.cos(phase)
        im = root_diffuse * rng.standard_normal(diffuse.shape, dtype=np.float32) + root_points * np.sin(phase)
        re = cv2.filter2D(re, -1, kernel, borderType=cv2.BORDER_REFLECT)
        im = cv2.filter2D(im, -1, kernel, borderType=cv2.BORDER_REFLECT)
        total += re * re + im * im
    return total / looks


def render_sar(shape: Shape, scene: Scene, rng: np.random.Generator, size: int, extent_m: float = EXTENT_M) -> np.ndarray:
    """Radar view of `shape` in its `scene` as a size x size uint8 chip (see `_sar_display`)."""
    display = _sar_display(shape, scene, rng, size, extent_m)
    return np.zeros((size, size), np.uint8) if display is None else _quantised(display)


def _sar_display(shape: Shape, scene: Scene, rng: np.random.Generator, size: int,
                 extent_m: float = EXTENT_M) -> np.ndarray | None:
    """Radar view of `shape` in its `scene` (per-chip look direction and depression), size x size, before quantisation.

    The scene's reflectivity (clutter, radar shadows, walls, roofs, dihedral lines, point scatterers) is imaged
    coherently through an elongated impulse response of a few pixels (the real chips are oversampled), which makes
    the speckle grain and turns every scatterer into a blob; everything is computed on a canvas SAR_MARGIN px wider
    on every side, then cropped, so chip borders look like the interior. The intensity is log-compressed about the
    chip's median level: no black floor, and a target-to-clutter contrast from plain to barely visible.
    Float grey levels before quantisation; None for a dropped chip (all zeros, as one in the real data)."""
    if rng.random() < BLANK_PROBABILITY:
        return None
    canvas = size + 2 * SAR_MARGIN
    n = canvas * SAR_SUPERSAMPLE
    px_per_m, centre = size * SAR_SUPERSAMPLE / extent_m, (n - 1) / 2
    look = rng.uniform(0, 2 * math.pi)
    to_sensor = np.array([math.cos(look), math.sin(look)])
    depression = rng.uniform(math.radians(25), math.radians(45))
    layover_per_m = to_sensor * math.tan(depression)  # a point at height h appears shifted towards the sensor
    shadow_per_m = -to_sensor / math.tan(depression)

    clutter = 1.0
    texture = rng.uniform(*SAR_TEXTURE_DEPTH) * _stationary_noise(rng, canvas, rng.uniform(*SAR_TEXTURE_GRAIN_PX))
    img = cv2.resize(np.exp(texture), (n, n), interpolation=cv2.INTER_LINEAR)
    shadow = np.zeros((n, n), np.float32)
    for part in shape.parts:
        _fill(shadow, _to_px(_sweep_hull(part.poly, shadow_per_m * part.z), px_per_m, centre), 1.0)
    for poly, z, _, _, _ in scene.blocks:
        _fill(shadow, _to_px(_sweep_hull(poly, shadow_per_m * z), px_per_m, centre), 1.0)
    img *= 1.0 - rng.uniform(0.2, 0.6) * shadow

    bright = np.zeros((n, n), np.float32)
    contrast = 10.0 ** rng.uniform(*SAR_CONTRAST_LOG10)  # target-to-clutter ratio: plain to barely visible
    gain = contrast * math.exp(rng.normal(0.0, 0.35))  # material/aspect strength of this object
    _draw_radar_parts(img, bright, shape, rng, gain * 25.0, to_sensor, layover_per_m, px_per_m, centre)
    _draw_radar_cavities(img, bright, shape, rng, gain * 25.0, clutter * 0.5, to_sensor, layover_per_m, px_per_m, centre)
    _add_point_scatterers(bright, shape, rng, gain * 25.0, layover_per_m, px_per_m, centre)
    _draw_radar_scene(img, bright, scene, rng, to_sensor, layover_per_m, px_per_m, centre)
    half = canvas / 2 / (size / extent_m)
    stray = int(rng.poisson(1.5 * (canvas / size) ** 2))  # poles, debris around the object
    _add_points(bright, rng.uniform(-half, half, (stray, 2)), rng.lognormal(math.log(3.0), 1.0, stray),
                px_per_m, centre)

    diffuse = cv2.resize(img, (canvas, canvas), interpolation=cv2.INTER_AREA) + rng.uniform(0.1, 0.3)  # noise floor
    points = cv2.resize(bright, (canvas, canvas), interpolation=cv2.INTER_AREA)
    along = rng.uniform(*SAR_RESOLUTION_PX[0])
    kernel = _impulse_response(along, along * rng.uniform(*SAR_RESOLUTION_PX[1]), look + rng.normal(0.0, 0.2))
    power_img = _focused(rng, diffuse, points, kernel, SAR_LOOKS)
    power_img = power_img[SAR_MARGIN: SAR_MARGIN + size, SAR_MARGIN: SAR_MARGIN + size]
    ratio = np.maximum(power_img, 1e-6) / np.median(power_img)
    power = rng.uniform(*SAR_DISPLAY_POWER)  # Box-Cox display: between log (0) and amplitude (0.5), no long dark tail
    spread = rng.normal(*SAR_DISPLAY_SPREAD)  # display contrast: a fraction of the level per unit of transformed ratio
    out = rng.normal(*SAR_DISPLAY_LEVEL) * (1.0 + spread * (ratio**power - 1.0) / power)  # darker chips: less spread
    out += rng.uniform(*SAR_PIXEL_NOISE) * rng.standard_normal((size, size), dtype=np.float32)  # receiver, resampling
    toe = rng.uniform(*SAR_DISPLAY_TOE)  # display toe: values below it are compressed towards 0, never clipped to a floor
    out = np.where(out < toe, toe * np.exp((np.minimum(out, toe) - toe) / toe), out)
    return 255.0 * out


def _draw_radar_scene(img: np.ndarray, bright: np.ndarray, scene: Scene, rng: np.random.Generator,
                      to_sensor: np.ndarray, layover_per_m: np.ndarray, px_per_m: float, centre: float) -> None:
    """Kerbs as bright lines; buildings: a bright wall-ground line and a laid-over wall; tree canopies."""
    for poly, _, strength in scene.lines:
        if strength > 0:
            _fill(bright, _to_px(poly, px_per_m, centre), strength * rng.uniform(0.5, 1.5))
    for poly, z, _, rcs, tree in scene.blocks:
        if tree:
            _fill(img, _to_px(poly + layover_per_m * z * 0.7, px_per_m, centre), rcs * rng.uniform(1.0, 2.5))
            continue
        cos_facing = _outward_normals(poly) @ to_sensor
        base_px, top_px = _to_px(poly, px_per_m, centre), _to_px(poly + layover_per_m * z, px_per_m, centre)
        _fill(img, top_px, rcs * rng.uniform(0.5, 1.5))
        for i in np.flatnonzero(cos_facing > 0.0):
            j = (i + 1) % len(poly)
            _fill(img, np.stack([base_px[i], base_px[j], top_px[j], top_px[i]]), rcs * 3.0 * cos_facing[i])
            cv2.line(bright, base_px[i].tolist(), base_px[j].tolist(), float(rcs * 20.0 * cos_facing[i] ** 2), 2,
                     cv2.LINE_8, _SHIFT)


def _draw_radar_parts(img: np.ndarray, bright: np.ndarray, shape: Shape, rng: np.random.Generator, gain: float,
                      to_sensor: np.ndarray, layover_per_m: np.ndarray, px_per_m: float, centre: float) -> None:
    """Walls facing the sensor (with their wall-ground dihedral lines), laid-over roofs, bright roof corners."""
    corners: list[np.ndarray] = []
    for part in sorted(shape.parts, key=lambda p: p.z):
        lay = layover_per_m * part.z
        cos_facing = _outward_normals(part.poly) @ to_sensor
        base_px = _to_px(part.poly, px_per_m, centre)
        top_px = _to_px(part.poly + lay, px_per_m, centre)
        k = len(part.poly)
        for i in np.flatnonzero(cos_facing > 0.0):
            j = (i + 1) % k
            wall = np.stack([base_px[i], base_px[j], top_px[j], top_px[i]])
            _fill(img, wall, gain * part.rcs * 0.12 * cos_facing[i])
        _fill(img, top_px, gain * part.rcs * 0.12 * rng.uniform(0.4, 1.6))
        for i in np.flatnonzero(cos_facing > 0.0):
            j = (i + 1) % k
            strength = gain * part.rcs * min(part.z, 2.5) * (0.1 + 1.5 * cos_facing[i] ** 4)
            cv2.line(bright, base_px[i].tolist(), base_px[j].tolist(), float(strength), 1, cv2.LINE_8, _SHIFT)
        corners.append((part.poly + lay)[cos_facing > 0.0])
    corner_points = np.concatenate(corners)
    _add_points(bright, corner_points, gain * rng.uniform(0.5, 3.0, len(corner_points)), px_per_m, centre)


def _draw_radar_cavities(img: np.ndarray, bright: np.ndarray, shape: Shape, rng: np.random.Generator, gain: float,
                         clutter: float, to_sensor: np.ndarray, layover_per_m: np.ndarray, px_per_m: float,
                         centre: float) -> None:
    """Open beds: a dark floor and a dihedral on the inner face of the far wall."""
    for poly, wall_z in shape.cavities:
        cos_facing = _outward_normals(poly) @ to_sensor
        floor_px = _to_px(poly + layover_per_m * 0.5, px_per_m, centre)
        _fill(img, floor_px, clutter * 0.3)
        for i in np.flatnonzero(cos_facing < -0.2):
            j = (i + 1) % len(poly)
            strength = gain * min(wall_z, 1.0) * rng.uniform(0.3, 1.5) * cos_facing[i] ** 4
            cv2.line(bright, floor_px[i].tolist(), floor_px[j].tolist(), float(strength), 1, cv2.LINE_8, _SHIFT)


def _add_points(img: np.ndarray, points: np.ndarray, values: np.ndarray, px_per_m: float, centre: float) -> None:
    """Add `values` at the pixels of `points` (metres), clipped into the grid."""
    rc = np.clip(np.rint(points * px_per_m + centre).astype(np.int64), 0, img.shape[0] - 1)
    np.add.at(img, (rc[:, 1], rc[:, 0]), values.astype(np.float32))


def _add_point_scatterers(bright: np.ndarray, shape: Shape, rng: np.random.Generator, gain: float,
                          layover_per_m: np.ndarray, px_per_m: float, centre: float) -> None:
    """Wheels, mirrors, racks: a few bright points at random places and heights inside the parts."""
    areas = np.array([_area(p.poly) for p in shape.parts])
    count = int(rng.poisson(3.0 + 0.4 * areas.sum()))
    if count == 0:
        return
    most = max(len(p.poly) for p in shape.parts)
    vertices = np.zeros((len(shape.parts), most, 2))
    used = np.zeros((len(shape.parts), most))
    for m, part in enumerate(shape.parts):
        vertices[m, : len(part.poly)] = part.poly
        used[m, : len(part.poly)] = 1.0
    heights = np.array([p.z for p in shape.parts])
    which = rng.choice(len(shape.parts), size=count, p=areas / areas.sum())
    weights = rng.standard_gamma(0.6, (count, most)) * used[which] + 1e-12  # Dirichlet over each part's vertices
    weights /= weights.sum(axis=1, keepdims=True)
    points = np.einsum("nk,nkd->nd", weights, vertices[which])
    points += layover_per_m * (rng.uniform(0.2, 1.0, count) * heights[which])[:, None]
    _add_points(bright, points, gain * rng.lognormal(0.0, 0.8, count), px_per_m, centre)


# ----------------------------------------------------------------------------- one object, one chunk


def object_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The random generator of object `index` of a split: independent of chunking and workers."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, index])))


def render_pair(kind: int, rng: np.random.Generator, eo_size: int, sar_size: int | None,
                with_eo: bool = True, calibrate: bool | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """(EO chip or None, SAR chip) of one object of `kind` (class id, or 10 + OOD kind index).

    sar_size None (or 0): each chip's side is drawn from the real size mix at one pixel spacing.
    calibrate (None: CALIBRATE_TO_REAL): after rendering, the chips' intensities are mapped onto quantile rows
    of the calibration table (`random_targets`: near one real chip drawn among those whose SAR texture is
    nearest to the rendered SAR chip's, the same one for both modalities), drawn last, whatever the kind, so the
    scenes are those of the uncalibrated path (to the byte)."""
    shape, scene = build_scene(kind, rng)
    size = sar_size or sar_chip_size(rng)
    extent = EXTENT_M if sar_size else size / SAR_PX_PER_M  # the real mix keeps one pixel spacing
    sar = _sar_display(shape, scene, rng, size, extent)
    eo = _eo_display(shape, scene, rng, eo_size) if with_eo else None
    if CALIBRATE_TO_REAL if calibrate is None else calibrate:
        target = random_targets(load_table(), rng, None if sar is None else texture_descriptor(sar))
        if sar is not None and "sar" in CALIBRATED_MODALITIES:
            sar = match_quantiles(sar, target["sar"])
        if eo is not None and "eo" in CALIBRATED_MODALITIES:  # the image is mapped, its noise is not stretched
            eo = (match_quantiles(eo[0], target["eo"]), EO_CALIBRATED_NOISE * eo[1])
    sar_chip = np.zeros((size, size), np.uint8) if sar is None else _quantised(sar)
    return (None if eo is None else _quantised(eo[0] + eo[1])), sar_chip


class _Job(NamedTuple):
    root: str
    seed: int
    stream: int
    eo_size: int
    sar_size: int | None  # None: the real size mix
    calibrate: bool  # map intensities onto real chips' quantiles (render_pair)
    items: list[tuple[int, int, str | None, str]]  # (index, kind, EO path or None, SAR path), relative to root


def _encode_write(path: str, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    buf.tofile(path)


def _run_job(job: _Job) -> int:
    cv2.setNumThreads(1)
    for index, kind, eo_rel, sar_rel in job.items:
        rng = object_rng(job.seed, job.stream, index)
        eo, sar = render_pair(kind, rng, job.eo_size, job.sar_size, with_eo=eo_rel is not None, calibrate=job.calibrate)
        _encode_write(os.path.join(job.root, sar_rel), sar)
        if eo is not None:
            _encode_write(os.path.join(job.root, eo_rel), eo)
    return len(job.items)


# ----------------------------------------------------------------------------- the dataset


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a new or empty folder for the dataset")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: refusing to overwrite it; pick a new folder or delete this one")


def _validate(seed: int, eo_size: int, sar_size: int | None, workers: int | None) -> int:
    if seed < 0:
        raise UserError(f"seed {seed} is negative: expected a whole number >= 0")
    for flag, value in (("--eo-size", eo_size), ("--sar-size", sar_size)):
        if value is not None and value < MIN_CHIP_SIZE:
            raise UserError(f"{flag} {value} is too small: expected at least {MIN_CHIP_SIZE} pixels")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    return workers or os.cpu_count() or 1


def _plan(scale: str | int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train kinds and ids (class order), test kinds and ids (shuffled); ids are unique 8-digit numbers."""
    train_kinds = np.repeat(np.arange(NUM_OFFICIAL_CLASSES), scale_counts(scale))
    per_class, per_ood = counts_of_test_set(scale)
    test_kinds = np.concatenate([np.repeat(np.arange(NUM_OFFICIAL_CLASSES), per_class),
                                 np.repeat(NUM_OFFICIAL_CLASSES + np.arange(len(OOD_KINDS)), per_ood)])
    rng = object_rng(seed, NAME_STREAM, 0)
    test_kinds = rng.permutation(test_kinds)
    ids = 10_000_000 + rng.choice(90_000_000, size=len(train_kinds) + len(test_kinds), replace=False)
    return train_kinds, ids[: len(train_kinds)], test_kinds, ids[len(train_kinds):]


def _jobs(root: Path, seed: int, eo_size: int, sar_size: int | None, calibrate: bool, workers: int,
          train_kinds: np.ndarray, train_ids: np.ndarray, test_kinds: np.ndarray, test_ids: np.ndarray) -> list[_Job]:
    items = {
        TRAIN_STREAM: [(i, int(k), f"EO_Train/{OFFICIAL_NAMES[k]}/{d}.png", f"SAR_Train/{OFFICIAL_NAMES[k]}/{d}.png")
                       for i, (k, d) in enumerate(zip(train_kinds, train_ids))],
        TEST_STREAM: [(i, int(k), None, f"SAR_Test/Gotcha{d}.png")
                      for i, (k, d) in enumerate(zip(test_kinds, test_ids))],
    }
    total = sum(len(v) for v in items.values())
    chunk = int(np.clip(math.ceil(total / (8 * workers)), 8, 1000))
    return [_Job(str(root), seed, stream, eo_size, sar_size, calibrate, lst[s: s + chunk])
            for stream, lst in items.items() for s in range(0, len(lst), chunk)]


def _render_all(jobs: list[_Job], workers: int, progress: Callable[[int, int], None] | None) -> None:
    total, done = sum(len(j.items) for j in jobs), 0
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            done += _run_job(job)
            if progress:
                progress(done, total)
        return
    with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        for n in pool.imap_unordered(_run_job, jobs):
            done += n
            if progress:
                progress(done, total)


def _write_tables(root: Path, info: dict, test_kinds: np.ndarray, test_ids: np.ndarray) -> None:
    order = np.argsort(test_ids)
    with open(root / "test_truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image_id", "class_id"])
        for i in order:
            kind = int(test_kinds[i])
            writer.writerow([int(test_ids[i]), kind if kind < NUM_OFFICIAL_CLASSES else OOD_LABEL])
    ood_images = {name: sorted(int(d) for d, k in zip(test_ids, test_kinds) if k == NUM_OFFICIAL_CLASSES + j)
                  for j, name in enumerate(OOD_KINDS)}
    (root / "synth_info.json").write_text(json.dumps({**info, "ood_images": ood_images}, indent=1) + "\n")


def generate(out: Path, scale: str | int = "quick", seed: int = 0, eo_size: int = 32, sar_size: int | None = None,
             workers: int | None = None, progress: Callable[[int, int], None] | None = None,
             calibrate: bool = CALIBRATE_TO_REAL) -> dict:
    """Write the synthetic dataset into the new or empty folder `out`; returns a summary dict.

    sar_size None: SAR chip sides follow the real 56-59 px mix (SAR_SIZE_MIX) at one pixel spacing.
    calibrate False: no mapping onto the real chips' quantiles (this version's chips, unmapped)."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    workers = _validate(seed, eo_size, sar_size, workers)
    train_kinds, train_ids, test_kinds, test_ids = _plan(scale, seed)
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in OFFICIAL_NAMES:
            (tmp / "EO_Train" / name).mkdir(parents=True)
            (tmp / "SAR_Train" / name).mkdir(parents=True)
        (tmp / "SAR_Test").mkdir()
    except OSError as err:
        raise UserError(f"cannot create the dataset beside {out}: {err.strerror or err}") from None

    try:
        jobs = _jobs(tmp, seed, eo_size, sar_size, calibrate, workers, train_kinds, train_ids, test_kinds, test_ids)
        _render_all(jobs, workers, progress)
        per_class, per_ood = counts_of_test_set(scale)
        info = {
            "generator": "pipeline.data.synth",
            "generator_version": GENERATOR_VERSION,
            "scale": _parse_scale(scale),
            "seed": seed,
            "calibrated_to_real": calibrate,
            "eo_size": eo_size,
            "sar_size": sar_size if sar_size else {str(k): v for k, v in SAR_SIZE_MIX.items()},
            "extent_m": EXTENT_M,
            "train_counts": dict(zip(OFFICIAL_NAMES, scale_counts(scale))),
            "test_counts": {**{name: per_class for name in OFFICIAL_NAMES}, "ood": sum(per_ood)},
            "ood_kinds": dict(zip(OOD_KINDS, per_ood)),
        }
        _write_tables(tmp, info, test_kinds, test_ids)
        _check_target(out)
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the dataset to {out}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out": str(out), "n_train": int(len(train_kinds)), "n_test": int(len(test_kinds)),
            "workers": workers, "seconds": round(time.perf_counter() - start, 2)}


def ood_pixel_check(root: Path) -> tuple[str, float]:
    """The per-chip image statistic (pipeline.data.realism) that best tells the test set's unseen objects from its
    known classes, and its AUROC folded to >= 0.5: near 0.5, no pixel statistic gives the OOD chips away."""
    from pipeline.data.realism import best_single_statistic, statistics_table

    with open(Path(root) / "test_truth.csv", newline="") as fh:
        truth = [(row["image_id"], int(row["class_id"]) == OOD_LABEL) for row in csv.DictReader(fh)]
    chips = {d: cv2.imread(str(Path(root) / "SAR_Test" / f"Gotcha{d}.png"), cv2.IMREAD_GRAYSCALE) / 255.0
             for d, _ in truth}
    ood = statistics_table([chips[d] for d, is_ood in truth if is_ood])
    known = statistics_table([chips[d] for d, is_ood in truth if not is_ood])
    return best_single_statistic(ood, known)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.synth", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="new or empty folder for the dataset")
    p.add_argument("--scale", default="quick",
                   help="tiny (8 pairs/class), quick (~4,000 pairs), full (455,635 pairs) or a number of pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eo-size", type=int, default=32, help="EO chip side in pixels")
    p.add_argument("--sar-size", type=int, default=None,
                   help="SAR chip side in pixels (default: the real 2022 mix of 56-59 px at one pixel spacing)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="skip the mapping of chip intensities onto real chips' quantiles (this version's chips, unmapped)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    marks: list[int] = []

    def progress(done: int, total: int) -> None:
        tenth = done * 10 // total
        if total >= 20_000 and (not marks or tenth > marks[-1]):
            marks.append(tenth)
            print(f"  rendered {done:,}/{total:,} objects", file=sys.stderr, flush=True)

    s = generate(args.out, args.scale, args.seed, args.eo_size, args.sar_size, args.workers, progress,
                 calibrate=not args.uncalibrated)
    per_class = ", ".join(f"{k} {v:,}" for k, v in s["train_counts"].items())
    ood = ", ".join(f"{k} {v}" for k, v in s["ood_kinds"].items())
    sar = f"{s['sar_size']} px" if isinstance(s["sar_size"], int) else "56-59 px mix"
    print(f"synthetic dataset at {s['out']} (generator version {GENERATOR_VERSION}, scale {s['scale']}, seed {s['seed']}, "
          f"EO {s['eo_size']} px, SAR {sar}{'' if s['calibrated_to_real'] else ', uncalibrated'})")
    print(f"train: {s['n_train']:,} pairs: {per_class}")
    per_test_class = s["test_counts"][OFFICIAL_NAMES[0]]
    print(f"test: {s['n_test']:,} SAR chips: {per_test_class} per class + {s['test_counts']['ood']} OOD ({ood})")
    print(f"time: {s['seconds']:.1f} s with {s['workers']} worker(s)")
    name, auroc = ood_pixel_check(Path(s["out"]))
    print(f"OOD pixel check: the best single image statistic tells unseen objects from known ones with AUROC "
          f"{auroc:.3f} ({name}; 0.5: hidden, README target <= 0.60)")


if __name__ == "__main__":
    main()
