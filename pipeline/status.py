"""What a stage tells the driver (run_all) about its run: a small JSON file named by `--status-file`.

The stage records the fingerprint of the dataset it read (so run_all shows metrics only of artifacts
made from this dataset) and, when it had nothing to do for this data, why (e.g. `pretrain_eo` on a
SAR-only dataset: "no EO chips"). Without `--status-file` (a stage run by hand) nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text


def write_status(path: str | Path | None, **fields: Any) -> None:
    """Merge `fields` into the status file at `path` (nothing when `path` is None)."""
    if path is None:
        return
    status = read_status(path)
    status.update(fields)
    atomic_write_text(Path(path), json.dumps(status, sort_keys=True) + "\n")


def read_status(path: str | Path | None) -> dict[str, Any]:
    """The fields a stage recorded ({} when it recorded none, e.g. it failed before reading the data)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}
