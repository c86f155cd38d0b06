"""The one pass of `leuko prepare` over a manifest's cells: read, check, normalise, write one array.

Each readable cell is normalised and cropped (leuko.data.preprocess) and written straight into a
memory-mapped (N, C, D, H, W) array, so memory stays flat whatever the cohort's size. Cells are kept
per channel count; the count most readable cells share becomes volumes.npy and the others are bad rows,
so one stray file cannot decide the channels of the whole cohort.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.io import VolumeError, read_volume
from leuko.data.manifest import VOXEL_SIZE_COLUMNS, Problem, line_list
from leuko.data.prepared import VOLUMES
from leuko.data.preprocess import process_cell
from leuko.data.progress import progress as progress_bar

# Absolute refractive indices of cells and media lie well inside this range; a median outside
# it means the file holds something else (RI differences, raw intensities).
RI_PLAUSIBLE = (1.0, 2.0)
_COPY_CHUNK = 64  # cells per block when compacting after skipped cells


@dataclass
class _Store:
    """The cells of one channel count, in manifest order, in their own (N, C, D, H, W) array file."""

    path: Path
    array: np.memmap | None
    rows: list[dict] = field(default_factory=list)  # index.csv rows
    sources: list[tuple[int, str, str]] = field(default_factory=list)  # (line, cell_id, file) for messages
    n_clipped: int = 0


def stream_cells(
    table: pd.DataFrame, tmp: Path, *, bad_lines: set[int], modality: str, settings: dict, progress: bool
) -> tuple[list[dict], list[Problem], int]:
    """Write every readable cell of the majority channel count into tmp/VOLUMES; (index rows, problems, clipped)."""
    candidates = [i for i, line in enumerate(table["line"]) if line not in bad_lines]
    shape = tuple(settings["shape"])
    target = settings["target_voxel_size"]
    problems: list[Problem] = []
    stores: dict[int, _Store] = {}  # channel count -> its cells
    for i in progress_bar(candidates, desc="prepare", unit="cell", enabled=progress):
        row = table.iloc[i]
        voxel_size = tuple(float(row[c]) for c in VOXEL_SIZE_COLUMNS)
        volume = _read_cell(row, modality, settings, problems)
        if volume is None:
            continue
        if len(volume) not in stores:  # a sparse file: only the cells written take disk space
            path = tmp / f"volumes-{len(volume)}ch.npy"
            array = np.lib.format.open_memmap(path, "w+", np.float32, (len(candidates), len(volume), *shape))
            stores[len(volume)] = _Store(path, array)
        store = stores[len(volume)]
        window, clipped = process_cell(
            volume,
            voxel_size,
            modality=modality,
            shape=shape,
            target_voxel_size=None if target is None else tuple(target),
            n_medium=settings["n_medium"],
            ri_scale=settings["ri_scale"],
        )
        store.array[len(store.rows)] = window
        store.n_clipped += clipped
        store.rows.append(_index_row(row, len(store.rows), voxel_size, target))
        store.sources.append((int(row["line"]), row["cell_id"], str(row["abs_path"])))
    for store in stores.values():
        store.array.flush()
        store.array = None  # closes the memory map
    keep = _majority(stores, problems)
    for store in stores.values():
        if store is not keep:
            store.path.unlink()
    if keep is None:
        return [], problems, 0
    os.replace(keep.path, tmp / VOLUMES)
    if len(keep.rows) < len(candidates):
        _truncate(tmp / VOLUMES, len(keep.rows))
    return keep.rows, problems, keep.n_clipped


def _majority(stores: dict[int, _Store], problems: list[Problem]) -> _Store | None:
    """The cells of the channel count most cells share; the others become row problems. A tie is a
    problem of the whole file (None): no count can claim to be the cohort's."""
    if not stores:
        return None
    ranked = sorted(stores.items(), key=lambda item: (-len(item[1].rows), item[0]))
    channels, keep = ranked[0]
    if len(ranked) > 1 and len(ranked[1][1].rows) == len(keep.rows):
        counts = [
            f"{len(s.rows)}{' cells' if k == 0 else ''} have {c}{' channel(s)' if k == 0 else ''}"
            f" ({line_list([line for line, _, _ in s.sources])})"
            for k, (c, s) in enumerate(ranked)
        ]
        problems.append(
            Problem(
                None,
                None,
                f"cells differ in channel count with no majority: {', '.join(counts)};"
                " give every cell the same channels",
            )
        )
        return None
    n_readable = sum(len(s.rows) for s in stores.values())
    for c, store in ranked[1:]:
        for line, cell_id, source in store.sources:
            problems.append(
                Problem(
                    line,
                    cell_id,
                    f"{source} has {c} channel(s) but {len(keep.rows)} of the {n_readable} readable cells have"
                    f" {channels}; all cells need the same channels",
                )
            )
    return keep


def _read_cell(row: pd.Series, modality: str, settings: dict, problems: list[Problem]) -> np.ndarray | None:
    """A cell's raw (C, D, H, W) volume, or None after adding to problems why it cannot be used."""
    line, cell_id = int(row["line"]), row["cell_id"]
    try:
        volume = read_volume(row["abs_path"], **settings["read_options"])
    except VolumeError as exc:
        problems.append(Problem(line, cell_id, str(exc)))
        return None
    if modality == "ri":
        median = float(np.median(volume))
        if not RI_PLAUSIBLE[0] <= median <= RI_PLAUSIBLE[1]:
            problems.append(
                Problem(
                    line,
                    cell_id,
                    f"{row['abs_path']}: median value {median:g} does not look like a refractive index"
                    f" (medium {settings['n_medium']}); store absolute RI, or set modality hhg for intensity volumes",
                )
            )
            return None
    return volume


def _index_row(row: pd.Series, position: int, voxel_size: tuple, target: list[float] | None) -> dict:
    """One index.csv row (and the manifest's voxel size, which meta.json summarises)."""
    out_size = tuple(target) if target is not None else voxel_size
    cell = {
        "row": position,
        "cell_id": row["cell_id"],
        "label": row["label"],
        "patient_id": row["patient_id"],
        "sample_type": row["sample_type"],
    }
    if "split" in row.index:
        cell["split"] = row["split"].lower()
    cell.update(zip(VOXEL_SIZE_COLUMNS, out_size))
    cell["source_voxel_size"] = voxel_size
    return cell


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
