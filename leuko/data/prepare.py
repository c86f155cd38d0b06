"""The prepared cache: every cell normalised and cropped to one shape in one memory-mapped array.

    out_dir/volumes.npy   (N, C, D, H, W) float32, np.load(..., mmap_mode="r")
    out_dir/index.csv     row, cell_id, label, label_index, patient_id, sample_type[, split],
                          voxel_size_z, voxel_size_y, voxel_size_x (of the prepared voxels, um)
    out_dir/meta.json     shape, channels, classes, modality, normalisation, fingerprint, ...
    out_dir/skipped.csv   cell_id, line, reason (only with skip_bad)

One streaming pass reads, checks and writes each cell into a temporary sibling folder, which
replaces out_dir only when the whole pass succeeded; out_dir is never left half written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from leuko import __version__
from leuko.data.optics import DEFAULT_CLASSES
from leuko.data.io import VolumeError, read_volume
from leuko.data.manifest import (
    DEFAULT_MODALITY,
    VOXEL_SIZE_COLUMNS,
    ManifestError,
    Problem,
    read_manifest_table,
    validate_manifest,
)
from leuko.errors import LeukoError

VOLUMES = "volumes.npy"
INDEX = "index.csv"
META = "meta.json"
SKIPPED = "skipped.csv"
FORMAT_VERSION = 1  # bump when the output layout or the processing changes

# Refractive index of the medium and the cell threshold follow Ryu et al. (2021): medium 1.337,
# voxels above 1.35 are the cell.
N_MEDIUM = 1.337
RI_CELL_THRESHOLD = 1.35
# Cell RI lies about 0.01-0.05 above the medium (cytoplasm ~1.36, nucleus ~1.37-1.38), so
# dividing the contrast by 0.01 puts cell voxels at O(1) (nucleus 1.37 -> 3.3), medium at 0.
RI_SCALE = 0.01
# Absolute refractive indices of cells and media lie well inside this range; a median outside
# it means the file holds something else (RI differences, raw intensities).
RI_PLAUSIBLE = (1.0, 2.0)
# HHG: per volume and channel, (v - median) / (p99.5 - p0.5); percentiles rather than min/max
# so a few hot pixels do not set the scale. Foreground: channel mean above half its p99.5.
HHG_PERCENTILES = (0.5, 50.0, 99.5)
HHG_FOREGROUND_FRACTION = 0.5
READ_OPTIONS = ("key", "dataset")  # the read_volume options a manifest-wide setting may give
_COPY_CHUNK = 64  # cells per block when compacting after skipped cells


class PrepareError(LeukoError, ValueError):
    """A prepared folder that cannot be written or read; the message says how to fix it."""


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    n_cells: int
    n_skipped: int
    up_to_date: bool

    def __fspath__(self) -> str:  # usable wherever a path is expected
        return os.fspath(self.out_dir)


def prepare(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    shape: Sequence[int] = (32, 32, 32),
    classes: Sequence[str] | None = DEFAULT_CLASSES,
    skip_bad: bool = False,
    target_voxel_size: Sequence[float] | None = None,
    n_medium: float = N_MEDIUM,
    ri_scale: float = RI_SCALE,
    progress: bool = True,
    read_options: Mapping[str, str] | None = None,
) -> PrepareResult:
    """Validate, normalise and crop every cell of a manifest into out_dir.

    Raises ManifestError listing every bad row (with its line) unless skip_bad, in which case
    bad rows are left out and listed in skipped.csv. classes=None accepts any label and uses
    the sorted labels found. target_voxel_size: (z, y, x) um to resample to before cropping.
    """
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    shape = _check_shape(shape)
    target = _check_voxel_size(target_voxel_size)
    read_options = dict(read_options or {})
    unknown = sorted(set(read_options) - set(READ_OPTIONS))
    if unknown:
        raise ValueError(f"unknown read option(s) {', '.join(unknown)}; use {', '.join(READ_OPTIONS)}")
    if not ri_scale > 0:
        raise ValueError(f"ri_scale must be positive, got {ri_scale}")
    _check_out_dir(out_dir)

    manifest_bytes = manifest.read_bytes() if manifest.is_file() else b""
    table = read_manifest_table(manifest)
    settings = {
        "format_version": FORMAT_VERSION,
        "shape": list(shape),
        "classes": None if classes is None else list(classes),
        "skip_bad": skip_bad,
        "target_voxel_size": None if target is None else list(target),
        "n_medium": n_medium,
        "ri_scale": ri_scale,
        "read_options": read_options,
        "leuko_version": __version__,
    }
    fingerprint = _fingerprint(manifest_bytes, table, settings)
    previous = _read_meta(out_dir)
    if previous is not None and previous.get("fingerprint") == fingerprint and (out_dir / VOLUMES).is_file():
        return PrepareResult(out_dir, int(previous["n_cells"]), int(previous.get("n_skipped", 0)), True)

    problems = validate_manifest(table, manifest.parent, classes)
    fatal = [p for p in problems if not p.is_row]
    if fatal:
        raise ManifestError(manifest, problems)
    bad_lines = {p.line for p in problems}
    modalities = {m.lower() for m, line in zip(table.get("modality", []), table["line"]) if line not in bad_lines}
    modality = modalities.pop() if modalities else DEFAULT_MODALITY

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written, cell_problems, n_clipped = _stream_cells(
            table,
            tmp,
            bad_lines=bad_lines,
            shape=shape,
            modality=modality,
            target=target,
            n_medium=n_medium,
            ri_scale=ri_scale,
            read_options=read_options,
            progress=progress,
        )
        problems = sorted(problems + cell_problems, key=lambda p: p.line)
        if problems and not skip_bad:
            raise ManifestError(
                manifest,
                problems,
                hint=f"Fix these rows in {manifest}, or pass --skip-bad to leave them out"
                f" (they are then listed in {out_dir / SKIPPED}). Nothing was written.",
            )
        if not written:
            raise ManifestError(manifest, problems, hint="No usable cells are left; nothing was written.")
        if classes is None:
            classes = sorted({cell["label"] for cell in written})
        source_voxel_sizes = sorted({cell.pop("source_voxel_size") for cell in written})
        index = pd.DataFrame(written)
        index.insert(3, "label_index", [list(classes).index(label) for label in index["label"]])
        index.to_csv(tmp / INDEX, index=False, lineterminator="\n")
        if skip_bad:
            _write_skipped(tmp / SKIPPED, problems)
        channels = int(np.load(tmp / VOLUMES, mmap_mode="r").shape[1])
        meta = {
            "format_version": FORMAT_VERSION,
            "shape": list(shape),
            "channels": channels,
            "classes": list(classes),
            "modality": modality,
            "normalisation": _normalisation_meta(modality, n_medium, ri_scale),
            "voxel_size": {
                "resampled_to": None if target is None else list(target),
                "manifest_values": source_voxel_sizes,
            },
            "n_cells": len(index),
            "n_skipped": len({p.line for p in problems}),
            "n_clipped": n_clipped,
            "label_counts": dict(sorted(Counter(index["label"]).items())),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "fingerprint": fingerprint,
            "settings": settings,
            "leuko_version": __version__,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n_clipped:
        warnings.warn(
            f"{n_clipped} of {meta['n_cells']} cells reach beyond the crop shape {tuple(shape)} and were cut;"
            " use a larger --shape or a coarser --voxel-size to keep whole cells",
            stacklevel=2,
        )
    if target is None and len(source_voxel_sizes) > 1:
        warnings.warn(
            f"cells have {len(source_voxel_sizes)} different voxel sizes and were not resampled;"
            " pass --voxel-size Z Y X to bring them to one grid",
            stacklevel=2,
        )
    return PrepareResult(out_dir, meta["n_cells"], meta["n_skipped"], False)


def load_prepared(out_dir: str | Path) -> tuple[np.memmap, pd.DataFrame, dict]:
    """(volumes (N, C, D, H, W) memmap opened read-only, index table, meta) of a prepared folder."""
    out_dir = Path(out_dir)
    fix = f"run `leuko prepare --manifest MANIFEST --out {out_dir}` first"
    if not out_dir.is_dir():
        raise PrepareError(f"{out_dir}: no prepared data here (folder not found); {fix}")
    missing = [name for name in (VOLUMES, INDEX, META) if not (out_dir / name).is_file()]
    if missing:
        raise PrepareError(f"{out_dir}: prepared data is incomplete (missing {', '.join(missing)}); {fix}")
    try:
        volumes = np.load(out_dir / VOLUMES, mmap_mode="r")
        text = {"cell_id": str, "label": str, "patient_id": str, "sample_type": str, "split": str}
        index = pd.read_csv(out_dir / INDEX, dtype=text, keep_default_na=False)
        meta = json.loads((out_dir / META).read_text())
    except (ValueError, OSError) as exc:
        raise PrepareError(f"{out_dir}: prepared data is damaged ({exc}); {fix}") from exc
    expected = (meta.get("n_cells"), meta.get("channels"), *meta.get("shape", ()))
    if volumes.shape != expected or len(index) != volumes.shape[0]:
        raise PrepareError(
            f"{out_dir}: {VOLUMES} has shape {volumes.shape}, {INDEX} {len(index)} rows, but {META} says"
            f" {expected}; the folder is inconsistent, {fix}"
        )
    return volumes, index, meta


# ---------------------------------------------------------------- one cell


def resample(volume: np.ndarray, voxel_size: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """(C, D, H, W) at voxel_size (z, y, x) -> (C, D', H', W') at target, linear interpolation."""
    factors = [v / t for v, t in zip(voxel_size, target)]
    if all(abs(f - 1.0) < 1e-9 for f in factors):
        return volume
    return np.stack([ndimage.zoom(channel, factors, order=1, mode="nearest") for channel in volume])


def foreground(volume: np.ndarray, modality: str, hhg_scale: np.ndarray | None = None) -> np.ndarray:
    """(D, H, W) boolean mask of the cell in a raw (C, D, H, W) volume."""
    if modality == "ri":
        return volume.max(axis=0) > RI_CELL_THRESHOLD
    offset, scale = hhg_scale
    mean = ((volume - offset[:, None, None, None]) / scale[:, None, None, None]).mean(axis=0)
    return mean > HHG_FOREGROUND_FRACTION * np.percentile(mean, HHG_PERCENTILES[-1])


def hhg_scaling(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (median, p99.5 - p0.5) of a (C, D, H, W) volume, each shape (C,)."""
    low, median, high = np.percentile(volume.reshape(len(volume), -1), HHG_PERCENTILES, axis=1)
    scale = high - low
    # A channel whose central 99% is flat: fall back to its full range, then to 1.
    full = volume.reshape(len(volume), -1).max(axis=1) - volume.reshape(len(volume), -1).min(axis=1)
    scale = np.where(scale > 0, scale, np.where(full > 0, full, 1.0))
    return median.astype(np.float32), scale.astype(np.float32)


def centre_crop_or_pad(
    volume: np.ndarray, centre: Sequence[float], shape: Sequence[int], fill: np.ndarray
) -> np.ndarray:
    """(C, D, H, W) -> (C, *shape) window centred on centre (voxels); outside voxels get fill[c]."""
    out = np.empty((len(volume), *shape), dtype=np.float32)
    out[:] = np.asarray(fill, dtype=np.float32)[:, None, None, None]
    src, dst = [slice(None)], [slice(None)]
    for c, size, n in zip(centre, shape, volume.shape[1:]):
        start = int(np.floor(c - (size - 1) / 2 + 0.5))
        lo, hi = max(start, 0), min(start + size, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def process_cell(
    volume: np.ndarray,
    voxel_size: Sequence[float],
    *,
    modality: str,
    shape: Sequence[int],
    target_voxel_size: Sequence[float] | None = None,
    n_medium: float = N_MEDIUM,
    ri_scale: float = RI_SCALE,
) -> tuple[np.ndarray, bool]:
    """Raw (C, D, H, W) -> normalised (C, *shape) float32 centred on the cell, and whether the
    cell reached beyond the crop."""
    if target_voxel_size is not None:
        volume = resample(volume, voxel_size, target_voxel_size)
    channels = len(volume)
    if modality == "ri":
        offset = np.full(channels, n_medium, dtype=np.float32)
        scale = np.full(channels, ri_scale, dtype=np.float32)
        mask = foreground(volume, "ri")
    else:
        offset, scale = hhg_scaling(volume)
        # generic volumes hold no single cell to centre on: keep the field of view centred.
        mask = foreground(volume, "hhg", (offset, scale)) if modality == "hhg" else None
    if mask is not None and mask.any():
        centre = ndimage.center_of_mass(mask)
        extent = [np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        clipped = any(e[-1] - e[0] + 1 > size for e, size in zip(extent, shape))
    else:
        centre = [(n - 1) / 2 for n in volume.shape[1:]]
        clipped = mask is None and any(n > size for n, size in zip(volume.shape[1:], shape))
    # Pad with the value that normalises to 0: the medium (RI) or the background median (HHG).
    window = centre_crop_or_pad(volume, centre, shape, fill=offset)  # (C, D, H, W)
    window -= offset[:, None, None, None]
    window /= scale[:, None, None, None]
    return window, clipped


# ---------------------------------------------------------------- the pass over all cells


def _stream_cells(
    table: pd.DataFrame,
    tmp: Path,
    *,
    bad_lines: set[int],
    shape: tuple[int, int, int],
    modality: str,
    target: tuple[float, float, float] | None,
    n_medium: float,
    ri_scale: float,
    read_options: dict,
    progress: bool,
) -> tuple[list[dict], list[Problem], int]:
    """Write every readable cell into tmp/VOLUMES; returns (index rows, problems, clipped count)."""
    candidates = [i for i, line in enumerate(table["line"]) if line not in bad_lines]
    has_split = "split" in table.columns
    written: list[dict] = []
    problems: list[Problem] = []
    volumes = None
    first = None  # (line, cell_id, channels) of the first readable cell
    n_clipped = 0
    for i in tqdm(candidates, desc="prepare", unit="cell", file=sys.stderr, disable=not progress):
        row = table.iloc[i]
        line, cell_id = int(row["line"]), row["cell_id"]
        voxel_size = tuple(float(row[c]) for c in VOXEL_SIZE_COLUMNS)
        try:
            volume = read_volume(row["abs_path"], **read_options)
        except VolumeError as exc:
            problems.append(Problem(line, cell_id, str(exc)))
            continue
        if modality == "ri":
            median = float(np.median(volume))
            if not RI_PLAUSIBLE[0] <= median <= RI_PLAUSIBLE[1]:
                problems.append(
                    Problem(
                        line,
                        cell_id,
                        f"{row['abs_path']}: median value {median:g} does not look like a refractive index"
                        f" (medium {n_medium}); store absolute RI, or set modality hhg for intensity volumes",
                    )
                )
                continue
        if first is None:
            first = (line, cell_id, len(volume))
            volumes = np.lib.format.open_memmap(
                tmp / VOLUMES, mode="w+", dtype=np.float32, shape=(len(candidates), len(volume), *shape)
            )
        elif len(volume) != first[2]:
            problems.append(
                Problem(
                    line,
                    cell_id,
                    f"{row['abs_path']} has {len(volume)} channel(s) but the first cell (line {first[0]},"
                    f" cell_id {first[1]}) has {first[2]}; all cells need the same channels",
                )
            )
            continue
        window, clipped = process_cell(
            volume,
            voxel_size,
            modality=modality,
            shape=shape,
            target_voxel_size=target,
            n_medium=n_medium,
            ri_scale=ri_scale,
        )
        volumes[len(written)] = window
        n_clipped += clipped
        out_size = target if target is not None else voxel_size
        cell = {
            "row": len(written),
            "cell_id": cell_id,
            "label": row["label"],
            "patient_id": row["patient_id"],
            "sample_type": row["sample_type"],
        }
        if has_split:
            cell["split"] = row["split"].lower()
        cell.update(zip(VOXEL_SIZE_COLUMNS, out_size))
        cell["source_voxel_size"] = voxel_size
        written.append(cell)
    if volumes is not None:
        volumes.flush()
        del volumes
        if 0 < len(written) < len(candidates):
            _truncate(tmp / VOLUMES, len(written))
    return written, problems, n_clipped


def _truncate(path: Path, n: int) -> None:
    """Keep the first n cells of a .npy, copying block by block so memory stays flat."""
    src = np.load(path, mmap_mode="r")
    smaller = path.with_name(path.name + ".part")
    dst = np.lib.format.open_memmap(smaller, mode="w+", dtype=src.dtype, shape=(n, *src.shape[1:]))
    for start in range(0, n, _COPY_CHUNK):
        dst[start : start + _COPY_CHUNK] = src[start : min(start + _COPY_CHUNK, n)]
    dst.flush()
    del dst, src
    os.replace(smaller, path)


# ---------------------------------------------------------------- folders and bookkeeping


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"shape must be three positive integers (D, H, W), got {shape}")
    return tuple(int(s) for s in shape)


def _check_voxel_size(voxel_size: Sequence[float] | None) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(voxel_size) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel_size):
        raise ValueError(f"target voxel size must be three positive numbers (z, y, x) in um, got {voxel_size}")
    return voxel_size


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not an earlier prepared folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out_dir} is a file; give --out a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise PrepareError(
            f"{out_dir} exists and is not a leuko prepared folder (no {META}); prepare would replace it,"
            " so choose a new or empty folder for --out"
        )


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / META).read_text())
    except (OSError, ValueError):
        return None


def _fingerprint(manifest_bytes: bytes, table: pd.DataFrame, settings: dict) -> str:
    """sha256 over the manifest, each file's (path, size, mtime_ns) and the settings."""
    digest = hashlib.sha256(manifest_bytes)
    for path in table.get("abs_path", []):
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _normalisation_meta(modality: str, n_medium: float, ri_scale: float) -> dict:
    if modality == "ri":
        return {
            "method": "ri_contrast",
            "formula": "x = (n - n_medium) / ri_scale",
            "n_medium": n_medium,
            "ri_scale": ri_scale,
            "foreground": f"n > {RI_CELL_THRESHOLD}",
            "pad_value": 0.0,
        }
    return {
        "method": "robust_per_volume_per_channel",
        "formula": f"x = (v - p{HHG_PERCENTILES[1]:g}) / (p{HHG_PERCENTILES[2]:g} - p{HHG_PERCENTILES[0]:g})",
        "foreground": f"channel mean of x > {HHG_FOREGROUND_FRACTION} * its p{HHG_PERCENTILES[2]:g}"
        if modality == "hhg" else "none: the crop stays centred on the field of view",
        "pad_value": 0.0,
    }


def _write_skipped(path: Path, problems: list[Problem]) -> None:
    reasons: dict[int, tuple[str, list[str]]] = {}
    for p in problems:
        reasons.setdefault(p.line, (p.cell_id or "", []))[1].append(p.message)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["cell_id", "line", "reason"])
        for line, (cell_id, messages) in sorted(reasons.items()):
            writer.writerow([cell_id, line, "; ".join(messages)])


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
