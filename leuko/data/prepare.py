"""`leuko prepare`: every cell of a manifest checked, normalised and cropped into one prepared folder.

The folder's layout and its reader are in leuko.data.prepared (volumes.npy, index.csv, meta.json,
skipped.csv); how one cell is normalised and cropped is in leuko.data.preprocess.

One streaming pass reads, checks and writes each cell into a staging sibling folder, which
replaces out_dir only when the whole pass succeeded (leuko.data.swap): out_dir is never left half
written, and at every instant the old or the new output exists.

All cells need the same channel count. The count most readable cells share wins; the others are
bad rows (left out under skip_bad), so one stray file cannot decide for the whole cohort.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leuko import __version__
from leuko.data.manifest import (
    DEFAULT_MODALITY,
    ManifestError,
    Problem,
    read_manifest_table,
    validate_manifest,
)
from leuko.data.optics import DEFAULT_CLASSES, N_MEDIUM
from leuko.data.prepared import (
    FORMAT_VERSION,
    INDEX,
    META,
    SKIPPED,
    VOLUMES,
    check_out_dir,
    damage,
    file_records,
    read_meta,
    write_skipped,
)
from leuko.data.prepared import PrepareError as PrepareError
from leuko.data.prepared import load_prepared as load_prepared
from leuko.data.preprocess import RI_SCALE, normalisation_meta
from leuko.data.preprocess import centre_crop_or_pad as centre_crop_or_pad
from leuko.data.preprocess import process_cell as process_cell
from leuko.data.preprocess import resample as resample
from leuko.data.stream import stream_cells
from leuko.data.swap import recover, staging_dir, swap_into_place

# The `X as X` imports keep names importable from here: the pyfunc_model.py stored with each registered
# model imports process_cell from this module, and older code load_prepared and PrepareError.

READ_OPTIONS = ("key", "dataset")  # the read_volume options a manifest-wide setting may give


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
    manifest, out_dir = Path(manifest), Path(out_dir)
    shape = _check_shape(shape)
    target = _check_voxel_size(target_voxel_size)
    read_options = _check_read_options(read_options)
    if not ri_scale > 0:
        raise ValueError(f"ri_scale must be positive, got {ri_scale}")

    manifest_bytes = manifest.read_bytes() if manifest.is_file() else b""
    table = read_manifest_table(manifest)
    check_out_dir(out_dir, [manifest, *table.get("abs_path", [])])
    for message in recover(out_dir):  # what an interrupted run left beside out_dir
        warnings.warn(message, stacklevel=2)
    settings = _settings(shape, classes, skip_bad, target, n_medium, ri_scale, read_options)
    fingerprint = _fingerprint(manifest_bytes, table, settings)
    previous = _up_to_date(out_dir, fingerprint)
    if previous is not None:
        return PrepareResult(out_dir, int(previous["n_cells"]), int(previous.get("n_skipped", 0)), True)

    problems = validate_manifest(table, manifest.parent, classes)
    if any(not p.is_row for p in problems):  # a problem with the whole file, not one row
        raise ManifestError(manifest, problems)
    bad_lines = {p.line for p in problems}
    modality = _modality(table, bad_lines)

    tmp = staging_dir(out_dir)
    try:
        written, cell_problems, n_clipped = stream_cells(
            table, tmp, bad_lines=bad_lines, modality=modality, settings=settings, progress=progress
        )
        problems = sorted(problems + cell_problems, key=lambda p: p.line or 0)
        _check_problems(manifest, out_dir, problems, written, skip_bad)
        meta = _write_index_and_meta(
            tmp,
            written,
            problems,
            modality=modality,
            settings=settings,
            n_clipped=n_clipped,
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            fingerprint=fingerprint,
        )
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _warn_about_geometry(meta, shape, target)
    return PrepareResult(out_dir, meta["n_cells"], meta["n_skipped"], False)


def _settings(shape, classes, skip_bad, target, n_medium, ri_scale, read_options) -> dict:
    """What the output depends on besides the manifest and its files (part of the fingerprint and meta.json)."""
    return {
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


def _up_to_date(out_dir: Path, fingerprint: str) -> dict | None:
    """The meta.json of out_dir when it was made from the same inputs and its files are intact."""
    previous = read_meta(out_dir)
    if previous is None or previous.get("fingerprint") != fingerprint:
        return None
    why = damage(out_dir, previous)
    if why is not None:
        warnings.warn(f"{out_dir}: {why}; rebuilding it", stacklevel=3)  # points at the caller of prepare()
        return None
    return previous


def _modality(table: pd.DataFrame, bad_lines: set[int]) -> str:
    """The one modality of the good rows (validate_manifest rejects a mix)."""
    modalities = {m.lower() for m, line in zip(table.get("modality", []), table["line"]) if line not in bad_lines}
    return modalities.pop() if modalities else DEFAULT_MODALITY


def _check_problems(
    manifest: Path, out_dir: Path, problems: list[Problem], written: list[dict], skip_bad: bool
) -> None:
    """Stop (nothing written) on bad rows unless skip_bad, on problems of the whole file, and when no
    usable cell is left."""
    if any(not p.is_row for p in problems):
        raise ManifestError(manifest, problems, hint="--skip-bad cannot leave this out. Nothing was written.")
    if problems and not skip_bad:
        raise ManifestError(
            manifest,
            problems,
            hint=f"Fix these rows in {manifest}, or pass --skip-bad to leave them out"
            f" (they are then listed in {out_dir / SKIPPED}). Nothing was written.",
        )
    if not written:
        raise ManifestError(manifest, problems, hint="No usable cells are left; nothing was written.")


def _write_index_and_meta(
    tmp: Path,
    written: list[dict],
    problems: list[Problem],
    *,
    modality: str,
    settings: dict,
    n_clipped: int,
    manifest_sha256: str,
    fingerprint: str,
) -> dict:
    """index.csv, skipped.csv (with skip_bad) and meta.json beside tmp's volumes.npy; returns the meta."""
    classes = settings["classes"]
    if classes is None:
        classes = sorted({cell["label"] for cell in written})
    source_voxel_sizes = sorted({cell.pop("source_voxel_size") for cell in written})
    index = pd.DataFrame(written)
    index.insert(3, "label_index", [list(classes).index(label) for label in index["label"]])
    index.to_csv(tmp / INDEX, index=False, lineterminator="\n")
    if settings["skip_bad"]:
        write_skipped(tmp / SKIPPED, problems)
    channels = int(np.load(tmp / VOLUMES, mmap_mode="r").shape[1])
    files = file_records(tmp)
    meta = {
        "format_version": FORMAT_VERSION,
        "shape": settings["shape"],
        "channels": channels,
        "classes": list(classes),
        "modality": modality,
        "normalisation": normalisation_meta(modality, settings["n_medium"], settings["ri_scale"]),
        "voxel_size": {
            "resampled_to": settings["target_voxel_size"],
            "manifest_values": source_voxel_sizes,
        },
        "n_cells": len(index),
        "n_skipped": len({p.line for p in problems}),
        "n_clipped": n_clipped,
        "label_counts": dict(sorted(Counter(index["label"]).items())),
        "manifest_sha256": manifest_sha256,
        "fingerprint": fingerprint,
        "files": files,
        "settings": settings,
        "leuko_version": __version__,
    }
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _warn_about_geometry(meta: dict, shape: tuple[int, int, int], target: tuple[float, float, float] | None) -> None:
    # stacklevel=3: the warning points at the caller of prepare()
    if meta["n_clipped"]:
        warnings.warn(
            f"{meta['n_clipped']} of {meta['n_cells']} cells reach beyond the crop shape {tuple(shape)} and were cut;"
            " use a larger --shape or a coarser --voxel-size to keep whole cells",
            stacklevel=3,
        )
    source_voxel_sizes = meta["voxel_size"]["manifest_values"]
    if target is None and len(source_voxel_sizes) > 1:
        warnings.warn(
            f"cells have {len(source_voxel_sizes)} different voxel sizes and were not resampled;"
            " pass --voxel-size Z Y X to bring them to one grid",
            stacklevel=3,
        )


# ---------------------------------------------------------------- folders and bookkeeping


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise PrepareError(f"shape must be three positive integers (D, H, W), got {shape}")
    return tuple(int(s) for s in shape)


def _check_voxel_size(voxel_size: Sequence[float] | None) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(voxel_size) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel_size):
        raise PrepareError(f"target voxel size must be three positive numbers (z, y, x) in um, got {voxel_size}")
    return voxel_size


def _check_read_options(read_options: Mapping[str, str] | None) -> dict:
    read_options = dict(read_options or {})
    unknown = sorted(set(read_options) - set(READ_OPTIONS))
    if unknown:
        raise ValueError(f"unknown read option(s) {', '.join(unknown)}; use {', '.join(READ_OPTIONS)}")
    return read_options


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
