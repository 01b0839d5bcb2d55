"""Decode every chip once into memory-mapped uint8 arrays plus an index table, cached by fingerprint.

A pack lives in `<packs>/<part>-<key>/` (part = train or test): `eo.npy`/`sar.npy` (N, size, size)
uint8, `index.csv`, `meta.json` (fingerprint, settings, normalisation) and `bad_files.txt`. The key is
a sha256 over the part's file list (relative paths, sizes, mtimes, class ids) and the pack settings, so
a changed test image never invalidates the training pack. A pack is built in a temporary folder and
renamed into place, so an interrupted run leaves nothing half-written under a final name.

Packs live in `--cache-dir` when given, else in `$EOSAR_CACHE_DIR`, else in the project's `.cache/packs`;
never inside the data folder unless one of those points there (data folders are often shared or read-only).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
import sys
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.data.layout import DatasetLayout, TestItem, TrainItem
from pipeline.errors import UserError
from pipeline.log import get_logger, make_console

PACK_VERSION = 1
INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
}
_CANONICAL = {"linear": "bilinear", "cubic": "bicubic"}
REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "packs"
CACHE_ENV = "EOSAR_CACHE_DIR"  # overrides REPO_CACHE as the default cache folder
UNKNOWN_TEST_LABEL = -2  # test_index class_id of a test chip without a label
PARALLEL_MIN_IMAGES = 2000  # fewer images are decoded in-process (a process pool costs ~1 s to start)
NORM_MAX_ROWS = 20_000  # normalisation statistics come from at most this many evenly spaced chips

log = get_logger(__name__)


@dataclass
class PackedData:
    """Packed training and test chips (read-only memmaps), their index tables and normalisation."""

    train_eo: np.ndarray
    train_sar: np.ndarray
    test_sar: np.ndarray
    train_index: pd.DataFrame
    test_index: pd.DataFrame
    train_fingerprint: str
    test_fingerprint: str
    norm: dict[str, dict[str, float]]
    cache_dir: Path
    bad_files: list[str] = field(default_factory=list)


class BadImage(Exception):
    """A chip that cannot be decoded; the message says why."""


# ----------------------------------------------------------------------------- decoding one chip


def read_gray(path: str | Path) -> np.ndarray:
    """Decode an image file into a 2-D uint8 array: colour -> luma, alpha dropped, 16-bit -> 8-bit."""
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise BadImage(f"cannot read ({err.strerror})") from None
    if buffer.size == 0:
        raise BadImage("empty file")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise BadImage("not a decodable image (corrupt or truncated)")
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(image.shape[2])
        if code is None:
            raise BadImage(f"unsupported channel count {image.shape[2]}")
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadImage(f"unsupported pixel type {image.dtype}")
    return image


def resize_chip(image: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize a 2-D chip to size x size with a named interpolation."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=INTERPOLATIONS[interpolation])


def crop_or_pad_chip(image: np.ndarray, size: int, border: str = "reflect") -> np.ndarray:
    """Centre-crop a 2-D chip to size x size, padding a smaller side (reflected, or black) without resampling."""
    h, w = image.shape
    top, left = max(h - size, 0) // 2, max(w - size, 0) // 2
    image = image[top : top + size, left : left + size]
    h, w = image.shape
    if (h, w) == (size, size):
        return image
    pad_h, pad_w = size - h, size - w
    pads = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    if border == "reflect" and min(h, w) > 1:
        while image.shape != (size, size):  # a reflection adds at most (side - 1) per step
            h, w = image.shape
            step = [min(p, s - 1) for p, s in zip(pads, (h, h, w, w))]
            image = cv2.copyMakeBorder(image, *step, cv2.BORDER_REFLECT_101)
            pads = tuple(p - q for p, q in zip(pads, step))
        return image
    return cv2.copyMakeBorder(image, *pads, cv2.BORDER_CONSTANT, value=0)


def fit_chip(image: np.ndarray, size: int, fit: str = "resize", interpolation: str = "area") -> np.ndarray:
    """Bring a chip to size x size: resample (`resize`), or centre-crop/pad it (`crop` reflects, `pad` is black)."""
    if fit == "resize":
        return resize_chip(image, size, interpolation)
    return crop_or_pad_chip(image, size, "reflect" if fit == "crop" else "constant")


def decode_chip(path: str | Path, size: int, interpolation: str = "area", fit: str = "resize") -> np.ndarray:
    """read_gray + fit_chip: the exact pixels a pack holds for this file."""
    return fit_chip(read_gray(path), size, fit, interpolation)


def _decode_chunk(
    paths: list[str], size: int, interpolation: str, fit: str = "resize"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk: (chips, original (h, w) per chip, [(position, reason)] of bad files)."""
    chips = np.zeros((len(paths), size, size), dtype=np.uint8)
    shapes = np.full((len(paths), 2), -1, dtype=np.int32)
    bad = []
    for i, path in enumerate(paths):
        try:
            image = read_gray(path)
        except BadImage as err:
            bad.append((i, str(err)))
            continue
        shapes[i] = image.shape
        chips[i] = fit_chip(image, size, fit, interpolation)
    return chips, shapes, bad


def _pool_context() -> BaseContext:
    """fork on Linux: workers start at once and never re-import the caller's __main__ (so scripts without
    a main guard work); spawn elsewhere. The pool is started before any progress-bar thread exists."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _init_worker() -> None:
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


# ----------------------------------------------------------------------------- decoding many chips


@dataclass
class _Decoded:
    chips: np.ndarray  # memmap opened w+
    shapes: np.ndarray  # (n, 2) original h, w; -1 for a bad file
    bad: dict[int, str]  # position -> reason


class _Decoder:
    """Decodes path lists into memmaps, in-process for small jobs, else with a lazily started pool."""

    def __init__(self, interpolation: str, workers: int | None, skip_bad: bool, console: Console) -> None:
        self.interpolation = interpolation
        self.skip_bad = skip_bad
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.console = console
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Decoder":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _chunks(self, n: int) -> Iterator[tuple[int, int]]:
        step = int(np.clip(n // (self.workers * 8) + 1, 64, 2048))
        for start in range(0, n, step):
            yield start, min(n, start + step)

    def decode(self, paths: list[str], size: int, out: Path, label: str, fit: str = "resize") -> _Decoded:
        chips = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        shapes = np.full((len(paths), 2), -1, dtype=np.int32)
        bad: dict[int, str] = {}

        def store(start: int, result: tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]) -> None:
            block, block_shapes, block_bad = result
            chips[start : start + len(block)] = block
            shapes[start : start + len(block)] = block_shapes
            bad.update({start + i: reason for i, reason in block_bad})
            if block_bad and not self.skip_bad:
                raise _bad_image_error(paths[start + block_bad[0][0]], block_bad[0][1])

        parallel = self.workers > 1 and len(paths) >= PARALLEL_MIN_IMAGES
        if parallel and self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_pool_context(), initializer=_init_worker)
            self._pool.submit(int).result()  # start the workers now, before the progress thread runs
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        live = self.console.is_terminal  # in a log a transient bar leaves only blank lines
        with Progress(*columns, console=self.console, transient=True, disable=not live) as progress:
            task = progress.add_task(f"packing {label}", total=len(paths))
            if self._pool is None or not parallel:
                _init_worker()
                for start, stop in self._chunks(len(paths)):
                    store(start, _decode_chunk(paths[start:stop], size, self.interpolation, fit))
                    progress.advance(task, stop - start)
            else:
                futures = {
                    self._pool.submit(_decode_chunk, paths[start:stop], size, self.interpolation, fit): start
                    for start, stop in self._chunks(len(paths))
                }
                for future in as_completed(futures):
                    result = future.result()
                    store(futures[future], result)
                    progress.advance(task, len(result[0]))
        chips.flush()
        return _Decoded(chips=chips, shapes=shapes, bad=bad)


# ----------------------------------------------------------------------------- fingerprints and cache folders


def _relative(root: Path, path: Path | None) -> str:
    """`path` relative to `root` ('' for None); a string prefix cut for the usual case of a path inside root."""
    if path is None:
        return ""
    text, prefix = str(path), _prefix(root)
    return text[len(prefix) :] if text.startswith(prefix) else os.path.relpath(text, root)


@functools.lru_cache(maxsize=8)
def _prefix(root: Path) -> str:
    return os.path.join(str(root), "")


def _file_record(root: Path, path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        stat = os.stat(path)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; the dataset changed while packing, run again") from None
    return f"{_relative(root, path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _fingerprint(settings: dict[str, Any], records: Iterator[str]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record in records:
        digest.update(record.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def train_fingerprint(layout: DatasetLayout, settings: dict[str, Any]) -> str:
    """sha256 over the training items (class id, name, both files' path/size/mtime) and pack settings."""
    return _fingerprint(
        settings,
        (
            f"{item.class_id}|{item.name}|{_file_record(layout.root, item.eo_path)}|"
            f"{_file_record(layout.root, item.sar_path)}"
            for item in layout.train
        ),
    )


def test_fingerprint(layout: DatasetLayout, settings: dict[str, Any]) -> str:
    """sha256 over the test images (image id, path/size/mtime) and pack settings; labels are not part of it."""
    return _fingerprint(
        settings, (f"{item.image_id}|{_file_record(layout.root, item.path)}" for item in layout.test)
    )


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError:
        return False
    return True


def default_cache_dir() -> Path:
    """Where packs go without --cache-dir: $EOSAR_CACHE_DIR if set, else the project's .cache/packs."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else REPO_CACHE


def _pack_roots(cache_dir: Path | None) -> tuple[list[Path], Path]:
    """(folders to look for existing packs in, folder to build new packs in); never the data folder by default."""
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        if not _writable(cache_dir):
            raise UserError(f"cache folder {cache_dir} is not writable: pass a writable --cache-dir")
        return [cache_dir], cache_dir
    default = default_cache_dir()
    if not _writable(default):
        raise UserError(
            f"default cache folder {default} is not writable: pass a writable --cache-dir (or set {CACHE_ENV})"
        )
    return [default], default


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(build_root: Path, name: str) -> None:
    """Remove temporary pack folders of `name` left behind by processes that no longer run."""
    for tmp in build_root.glob(f".tmp-{name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _build_atomically(build_root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_folder)`, then rename the folder to `build_root/name` (kept if another run won)."""
    _remove_stale_tmp(build_root, name)
    tmp = build_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    final = build_root / name
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent run's pack: a damaged leftover
                shutil.rmtree(final)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _find_pack(roots: list[Path], name: str, fingerprint: str) -> Path | None:
    for root in roots:
        meta = root / name / "meta.json"
        try:
            if json.loads(meta.read_text()).get("fingerprint") == fingerprint:
                return root / name
        except (OSError, ValueError):
            continue
    return None


# ----------------------------------------------------------------------------- building one pack


def _norm_stats(chips: np.ndarray) -> dict[str, float]:
    """Mean and std on [0, 1] of at most NORM_MAX_ROWS evenly spaced chips (neutral values when none)."""
    if len(chips) == 0:
        return {"mean": 0.5, "std": 0.25}
    rows = np.unique(np.linspace(0, len(chips) - 1, min(len(chips), NORM_MAX_ROWS)).astype(np.int64))
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(rows), 2048):
        block = np.asarray(chips[rows[start : start + 2048]], dtype=np.float64) / 255.0
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
        count += block.size
    mean = total / count
    std = max(float(np.sqrt(max(total_sq / count - mean * mean, 0.0))), 1.0 / 255.0)
    return {"mean": mean, "std": std}


def _compact(tmp: Path, file_name: str, decoded: _Decoded) -> np.ndarray:
    """The decoded chips without bad rows (rewritten only when there are bad rows)."""
    if not decoded.bad:
        return decoded.chips
    keep = np.setdiff1d(np.arange(len(decoded.chips)), np.fromiter(decoded.bad, dtype=np.int64))
    out = np.lib.format.open_memmap(
        tmp / f"compact-{file_name}", mode="w+", dtype=np.uint8, shape=(len(keep), *decoded.chips.shape[1:])
    )
    for start in range(0, len(keep), 8192):
        out[start : start + 8192] = decoded.chips[keep[start : start + 8192]]
    out.flush()
    os.replace(tmp / f"compact-{file_name}", tmp / file_name)
    return out


def _row_numbers(n: int, bad: dict[int, str]) -> np.ndarray:
    """Row of each decoded position in the compacted array; -1 for a bad one."""
    good = np.ones(n, dtype=bool)
    good[list(bad)] = False
    return np.where(good, np.cumsum(good) - 1, -1)


def _bad_list(paths: list[str], decoded: _Decoded) -> list[tuple[str, str]]:
    return [(paths[i], reason) for i, reason in sorted(decoded.bad.items())]


def _write_meta(tmp: Path, meta: dict[str, Any], bad: list[tuple[str, str]]) -> None:
    (tmp / "bad_files.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in bad))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _build_train(
    tmp: Path, layout: DatasetLayout, decoder: _Decoder, eo_size: int, sar_size: int, meta: dict[str, Any],
    eo_fit: str = "resize", sar_fit: str = "resize",
) -> None:
    items: list[TrainItem] = layout.train
    eo_items = [i for i, item in enumerate(items) if item.eo_path is not None]
    sar_items = [i for i, item in enumerate(items) if item.sar_path is not None]
    eo_paths = [str(items[i].eo_path) for i in eo_items]
    sar_paths = [str(items[i].sar_path) for i in sar_items]
    eo = decoder.decode(eo_paths, eo_size, tmp / "eo.npy", "EO train", eo_fit)
    sar = decoder.decode(sar_paths, sar_size, tmp / "sar.npy", "SAR train", sar_fit)
    eo_rows = np.full(len(items), -1, dtype=np.int64)
    sar_rows = np.full(len(items), -1, dtype=np.int64)
    eo_hw = np.full((len(items), 2), -1, dtype=np.int64)
    sar_hw = np.full((len(items), 2), -1, dtype=np.int64)
    eo_rows[eo_items] = _row_numbers(len(eo_paths), eo.bad)
    sar_rows[sar_items] = _row_numbers(len(sar_paths), sar.bad)
    eo_hw[eo_items] = eo.shapes
    sar_hw[sar_items] = sar.shapes
    bad = _bad_list(eo_paths, eo) + _bad_list(sar_paths, sar)
    eo_chips = _compact(tmp, "eo.npy", eo)
    sar_chips = _compact(tmp, "sar.npy", sar)
    keep = (eo_rows >= 0) | (sar_rows >= 0)
    index = pd.DataFrame(
        {
            "name": [item.name for item in items],
            "class_id": [item.class_id for item in items],
            "eo_row": eo_rows,
            "sar_row": sar_rows,
            "eo_path": [_relative(layout.root, item.eo_path) for item in items],
            "sar_path": [_relative(layout.root, item.sar_path) for item in items],
            "eo_h": eo_hw[:, 0],
            "eo_w": eo_hw[:, 1],
            "sar_h": sar_hw[:, 0],
            "sar_w": sar_hw[:, 1],
        }
    )[keep]
    index.to_csv(tmp / "index.csv", index=False)
    meta["norm"] = {"eo": _norm_stats(eo_chips), "sar": _norm_stats(sar_chips)}
    meta["count"] = {"items": int(keep.sum()), "eo": len(eo_chips), "sar": len(sar_chips)}
    _write_meta(tmp, meta, bad)


def _build_test(
    tmp: Path, layout: DatasetLayout, decoder: _Decoder, sar_size: int, meta: dict[str, Any], sar_fit: str = "resize"
) -> None:
    items: list[TestItem] = layout.test
    paths = [str(item.path) for item in items]
    sar = decoder.decode(paths, sar_size, tmp / "sar.npy", "SAR test", sar_fit)
    rows = _row_numbers(len(paths), sar.bad)
    _compact(tmp, "sar.npy", sar)
    index = pd.DataFrame(
        {
            "image_id": [item.image_id for item in items],
            "sar_row": rows,
            "path": [_relative(layout.root, item.path) for item in items],
            "h": sar.shapes[:, 0],
            "w": sar.shapes[:, 1],
        }
    )[rows >= 0]
    index.to_csv(tmp / "index.csv", index=False)
    meta["count"] = {"sar": int((rows >= 0).sum())}
    _write_meta(tmp, meta, _bad_list(paths, sar))


# ----------------------------------------------------------------------------- loading a pack


def _load_array(pack: Path, file_name: str) -> np.ndarray:
    return np.load(pack / file_name, mmap_mode="r")


def _absolute(root: Path, column: pd.Series) -> list[str]:
    """Absolute path strings from the index's root-relative ones ('' stays '')."""
    prefix = _prefix(root)

    def absolute(rel: str) -> str:
        if not rel:
            return ""
        return os.path.normpath(prefix + rel) if rel.startswith("..") else prefix + rel

    return [absolute(rel) for rel in column]


def _load_train_index(pack: Path, root: Path) -> pd.DataFrame:
    index = pd.read_csv(pack / "index.csv", keep_default_na=False, dtype={"name": str, "eo_path": str, "sar_path": str})
    index["eo_path"] = _absolute(root, index["eo_path"])
    index["sar_path"] = _absolute(root, index["sar_path"])
    return index.reset_index(drop=True)


def _load_test_index(pack: Path, layout: DatasetLayout) -> pd.DataFrame:
    index = pd.read_csv(pack / "index.csv", keep_default_na=False, dtype={"path": str})
    labels = {
        item.image_id: UNKNOWN_TEST_LABEL if item.class_id is None else item.class_id for item in layout.test
    }
    index.insert(1, "class_id", [labels[i] for i in index["image_id"]])
    index["path"] = _absolute(layout.root, index["path"])
    return index.reset_index(drop=True)


def _bad_files(pack: Path) -> list[tuple[str, str]]:
    lines = (pack / "bad_files.txt").read_text().splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if line]  # type: ignore[misc]


def _bad_image_error(path: str, reason: str) -> UserError:
    return UserError(f"cannot decode image {path}: {reason}; replace or delete it, or pack with --skip-bad")


def _check_bad(pack: Path, skip_bad: bool) -> None:
    """Stop on the pack's first unreadable image unless skip_bad."""
    bad = _bad_files(pack)
    if bad and not skip_bad:
        raise _bad_image_error(*bad[0])


# ----------------------------------------------------------------------------- entry point


def _check_settings(eo_size: int, sar_size: int, interpolation: str, fits: tuple[str, str] = ("resize", "resize")) -> str:
    for key, value in (("eo_size", eo_size), ("sar_size", sar_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"data.{key} must be a positive integer, got {value!r}")
    for key, value in zip(("eo_fit", "sar_fit"), fits):
        if value not in ("resize", "crop", "pad"):
            raise UserError(f"data.{key} '{value}' is unknown: expected one of resize, crop, pad")
    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"data.interpolation '{interpolation}' is unknown: expected one of area, bilinear, nearest, bicubic"
        )
    return _CANONICAL.get(interpolation, interpolation)


def pack_dataset(
    layout: DatasetLayout,
    eo_size: int,
    sar_size: int,
    interpolation: str = "area",
    cache_dir: Path | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    console: Console | None = None,
    eo_fit: str = "resize",
    sar_fit: str = "resize",
) -> PackedData:
    """Decode the layout's chips once (or reuse the cached pack) and return read-only memmaps + index.

    Chips are brought to eo_size / sar_size by `fit` (resize | crop | pad, see fit_chip)."""
    console = console or make_console(stderr=True)
    interpolation = _check_settings(eo_size, sar_size, interpolation, (eo_fit, sar_fit))
    search_roots, build_root = _pack_roots(cache_dir)
    test_settings = {"version": PACK_VERSION, "sar_size": int(sar_size), "interpolation": interpolation}
    if sar_fit != "resize":  # resize packs keep their old fingerprints
        test_settings["sar_fit"] = sar_fit
    train_settings = {**test_settings, "eo_size": int(eo_size)}
    if eo_fit != "resize":
        train_settings["eo_fit"] = eo_fit
    train_fp = train_fingerprint(layout, train_settings)
    test_fp = test_fingerprint(layout, test_settings)
    train_name, test_name = f"train-{train_fp[:20]}", f"test-{test_fp[:20]}"

    with _Decoder(interpolation, workers, skip_bad, console) as decoder:
        train_pack = _find_pack(search_roots, train_name, train_fp)
        if train_pack is None:

            def build_train(tmp: Path) -> None:
                meta = {"part": "train", "fingerprint": train_fp, "settings": train_settings}
                _build_train(tmp, layout, decoder, eo_size, sar_size, meta, eo_fit, sar_fit)

            train_pack = _build_atomically(build_root, train_name, build_train)
        _check_bad(train_pack, skip_bad)

        test_pack = _find_pack(search_roots, test_name, test_fp)
        if test_pack is None:

            def build_test(tmp: Path) -> None:
                meta = {"part": "test", "fingerprint": test_fp, "settings": test_settings}
                _build_test(tmp, layout, decoder, sar_size, meta, sar_fit)

            test_pack = _build_atomically(build_root, test_name, build_test)
        _check_bad(test_pack, skip_bad)

    bad = [path for pack in (train_pack, test_pack) for path, _ in _bad_files(pack)]
    if bad:
        lists = " and ".join(str(p / "bad_files.txt") for p in (train_pack, test_pack) if _bad_files(p))
        log.warning(f"left out {len(bad)} unreadable image(s), e.g. {bad[0]}; listed in {lists}")
    train_meta = json.loads((train_pack / "meta.json").read_text())
    return PackedData(
        train_eo=_load_array(train_pack, "eo.npy"),
        train_sar=_load_array(train_pack, "sar.npy"),
        test_sar=_load_array(test_pack, "sar.npy"),
        train_index=_load_train_index(train_pack, layout.root),
        test_index=_load_test_index(test_pack, layout),
        train_fingerprint=train_fp,
        test_fingerprint=test_fp,
        norm=train_meta["norm"],
        cache_dir=train_pack.parent,
        bad_files=bad,
    )
