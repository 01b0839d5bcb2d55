"""The official class table of the PBVS MAVOC SAR track: ids, names and real training counts."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Official ids (never alphabetical order) and the real training counts (455,635 pairs in all).
OFFICIAL_CLASSES: tuple[tuple[int, str, int], ...] = (
    (0, "sedan", 364_291),
    (1, "SUV", 43_401),
    (2, "pickup_truck", 24_158),
    (3, "van", 16_890),
    (4, "box_truck", 2_896),
    (5, "motorcycle", 1_441),
    (6, "flatbed_truck", 898),
    (7, "bus", 612),
    (8, "pickup_truck_w_trailer", 695),
    (9, "semi_w_trailer", 353),
)
OFFICIAL_NAMES: tuple[str, ...] = tuple(name for _, name, _ in OFFICIAL_CLASSES)
OFFICIAL_COUNTS: tuple[int, ...] = tuple(count for _, _, count in OFFICIAL_CLASSES)
NUM_OFFICIAL_CLASSES = len(OFFICIAL_CLASSES)
OOD_LABEL = -1  # class id of an out-of-distribution test chip in truth tables


def normalize_class_name(name: str) -> str:
    """Case-insensitive key in which '-', '_' and spaces are alike: 'Pickup-Truck' -> 'pickup_truck'."""
    return re.sub(r"[\s\-_]+", "_", name.strip()).lower()


_OFFICIAL_BY_KEY = {normalize_class_name(n): i for i, n in enumerate(OFFICIAL_NAMES)}


def official_class_id(folder: str) -> int | None:
    """The official id of a class folder named by official name or by id; None if it is neither."""
    key = normalize_class_name(folder)
    if key in _OFFICIAL_BY_KEY:
        return _OFFICIAL_BY_KEY[key]
    if key.isdigit() and int(key) < NUM_OFFICIAL_CLASSES:
        return int(key)
    return None


@dataclass(frozen=True)
class ClassTable:
    """Class ids and names of one dataset: the official table, or sorted folder names of a generic tree."""

    names: tuple[str, ...]
    official: bool

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int | None:
        """Class id of `name` (official name, id, or generic folder name); None if unknown."""
        if self.official:
            return official_class_id(name)
        key = normalize_class_name(name)
        for i, n in enumerate(self.names):
            if normalize_class_name(n) == key:
                return i
        return None

    @classmethod
    def official_table(cls) -> "ClassTable":
        return cls(names=OFFICIAL_NAMES, official=True)
