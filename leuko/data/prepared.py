"""The one owner of a prepared folder (what `leuko prepare` writes): its file names and its reader.

    out_dir/volumes.npy   (N, C, D, H, W) float32, np.load(..., mmap_mode="r")
    out_dir/index.csv     row, cell_id, label, label_index, patient_id, sample_type[, split],
                          voxel_size_z, voxel_size_y, voxel_size_x (of the prepared voxels, um)
    out_dir/meta.json     shape, channels, classes, modality, normalisation, fingerprint, files, ...
    out_dir/skipped.csv   cell_id, line, reason (only with skip_bad)

meta.json's "files" records the size and sha256 of volumes.npy and index.csv. load_prepared checks the
sizes and the (small) index's checksum on every load; `leuko prepare` checks both checksums before it
calls a folder up to date (about 0.2 s for the default 1,440-cell cohort) and rebuilds a damaged one.

Every other module names these files through the constants here and reads the folder with load_prepared.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.manifest import Problem
from leuko.data.swap import OLD, leftovers
from leuko.errors import LeukoError

VOLUMES = "volumes.npy"
INDEX = "index.csv"
META = "meta.json"
SKIPPED = "skipped.csv"
FORMAT_VERSION = 1  # bump when the output layout or the processing changes
CHECKED = (VOLUMES, INDEX)  # the files whose size and checksum meta.json records
_CHUNK = 1 << 20  # bytes per read while hashing: memory stays flat for any size


class PrepareError(LeukoError, ValueError):
    """A prepared folder that cannot be written or read; the message says how to fix it."""


def load_prepared(out_dir: str | Path) -> tuple[np.memmap, pd.DataFrame, dict]:
    """(volumes (N, C, D, H, W) memmap opened read-only, index table, meta) of a prepared folder."""
    out_dir = Path(out_dir)
    fix = f"run `leuko prepare --manifest MANIFEST --out {out_dir}` first"
    if not out_dir.is_dir():
        old = [p.name for p in leftovers(out_dir) if p.name.startswith(f".{out_dir.name}.{OLD}-")]
        if old:
            fix = (
                f"an interrupted `leuko prepare` left {old[-1]} beside it; rerun `leuko prepare --manifest"
                f" MANIFEST --out {out_dir}`, which restores or rebuilds it"
            )
        raise PrepareError(f"{out_dir}: no prepared data here (folder not found); {fix}")
    missing = [name for name in (VOLUMES, INDEX, META) if not (out_dir / name).is_file()]
    if missing:
        raise PrepareError(f"{out_dir}: prepared data is incomplete (missing {', '.join(missing)}); {fix}")
    rerun = f"rerun `leuko prepare --manifest MANIFEST --out {out_dir}` to rebuild it"
    try:
        meta = json.loads((out_dir / META).read_text())
        # sizes always, the checksum of the small index only: hashing volumes.npy on every load would cost
        # a full read; `leuko prepare` checks it before calling the folder up to date
        why = damage(out_dir, meta, checksums=(INDEX,)) if "files" in meta else None  # older folders record none
        if why:
            raise PrepareError(f"{out_dir}: prepared data is damaged ({why}); {rerun}")
        volumes = np.load(out_dir / VOLUMES, mmap_mode="r")
        text = {"cell_id": str, "label": str, "patient_id": str, "sample_type": str, "split": str}
        index = pd.read_csv(out_dir / INDEX, dtype=text, keep_default_na=False)
    except PrepareError:
        raise
    except (ValueError, OSError) as exc:
        raise PrepareError(f"{out_dir}: prepared data is damaged ({exc}); {rerun}") from exc
    expected = (meta.get("n_cells"), meta.get("channels"), *meta.get("shape", ()))
    if volumes.shape != expected or len(index) != volumes.shape[0]:
        raise PrepareError(
            f"{out_dir}: {VOLUMES} has shape {volumes.shape}, {INDEX} {len(index)} rows, but {META} says"
            f" {expected}; the folder is inconsistent, {rerun}"
        )
    return volumes, index, meta


def file_records(out_dir: Path) -> dict:
    """meta.json's "files": {name: {"bytes", "sha256"}} of the files in CHECKED."""
    return {name: {"bytes": (out_dir / name).stat().st_size, "sha256": _sha256(out_dir / name)} for name in CHECKED}


def damage(out_dir: Path, meta: dict, *, checksums: Sequence[str] = CHECKED) -> str | None:
    """Why out_dir's files differ from what meta.json records, or None when they match.

    Sizes are always compared; checksums only of the files named in checksums (hashing reads the file)."""
    records = meta.get("files")
    if not isinstance(records, dict) or set(records) != set(CHECKED):
        return f"{META} records no checksums of {', '.join(CHECKED)} (an older leuko wrote it)"
    for name in CHECKED:
        path, record = out_dir / name, records[name]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"{name} has {size} bytes, {META} says {record.get('bytes')}"
        if name in checksums and _sha256(path) != record.get("sha256"):
            return f"{name} is not what {META} records (its checksum differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(out_dir: str | Path) -> dict | None:
    """meta.json of a prepared folder, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(out_dir) / META).read_text())
    except (OSError, ValueError):
        return None


def check_out_dir(out_dir: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse to replace anything but an earlier prepared folder: not the current folder (or one above it),
    nor a folder that holds any of the inputs (the manifest, its volumes)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out_dir} is a file; give --out a folder")
    target = out_dir.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise PrepareError(
            f"--out {out_dir} ({target}) is the current folder or holds it; prepare replaces --out as a whole,"
            f" so run it from outside: cd {target.parent} and give --out {target.name}"
        )
    folders: dict[str, str | Path] = {}  # each input's folder, resolved once: cohorts share a few folders
    for path in inputs:
        if path:  # a row without a path is a manifest problem, reported elsewhere
            folders.setdefault(os.path.dirname(os.path.abspath(path)), path)
    for folder, path in folders.items():
        resolved = Path(folder).resolve()
        if resolved == target or target in resolved.parents:
            raise PrepareError(
                f"--out {out_dir} holds the input {path}; prepare replaces --out as a whole, so choose a folder"
                " outside the data (e.g. a sibling of the data folder)"
            )
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
