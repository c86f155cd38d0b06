"""The one owner of a prepared folder (what `leuko prepare` writes): its file names and its reader.

    out_dir/volumes.npy   (N, C, D, H, W) float32, np.load(..., mmap_mode="r")
    out_dir/index.csv     row, cell_id, label, label_index, patient_id, sample_type[, split],
                          voxel_size_z, voxel_size_y, voxel_size_x (of the prepared voxels, um)
    out_dir/meta.json     shape, channels, classes, modality, normalisation, fingerprint, ...
    out_dir/skipped.csv   cell_id, line, reason (only with skip_bad)

Every other module names these files through the constants here and reads the folder with load_prepared.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.manifest import Problem
from leuko.errors import LeukoError

VOLUMES = "volumes.npy"
INDEX = "index.csv"
META = "meta.json"
SKIPPED = "skipped.csv"
FORMAT_VERSION = 1  # bump when the output layout or the processing changes


class PrepareError(LeukoError, ValueError):
    """A prepared folder that cannot be written or read; the message says how to fix it."""


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


def read_meta(out_dir: str | Path) -> dict | None:
    """meta.json of a prepared folder, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(out_dir) / META).read_text())
    except (OSError, ValueError):
        return None


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not an earlier prepared folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out_dir} is a file; give --out a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise PrepareError(
            f"{out_dir} exists and is not a leuko prepared folder (no {META}); prepare would replace it,"
            " so choose a new or empty folder for --out"
        )


def write_skipped(path: Path, problems: Sequence[Problem]) -> None:
    """skipped.csv: cell_id, line, reason; one row per bad manifest line, its problems joined by "; "."""
    reasons: dict[int, tuple[str, list[str]]] = {}
    for p in problems:
        reasons.setdefault(p.line, (p.cell_id or "", []))[1].append(p.message)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["cell_id", "line", "reason"])
        for line, (cell_id, messages) in sorted(reasons.items()):
            writer.writerow([cell_id, line, "; ".join(messages)])
