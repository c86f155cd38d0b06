"""`leuko predict --model URI`: a registered model on a folder of volumes or a manifest.

Writes, next to each other:
    predictions.csv                cell_id, path, [patient_id, sample_type | folder], [label], pred_label, prob_<class>
    predictions_differential.csv   per sample (patient_id + sample_type from a manifest) or per folder:
                                   n_cells, pred_<class> percent [, ref_<class> percent from the labels]
    predictions_skipped.csv        cell_id, path, reason: volumes that could not be read (only if any)
Each volume is read with leuko.data.io.read_volume and prepared with the model's own copy of the
settings `leuko prepare` used for its training data (leuko.data.preprocess.process_cell).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.io import SUPPORTED_SUFFIXES, VolumeError, read_volume, volume_suffix
from leuko.data.manifest import VOXEL_SIZE_COLUMNS, read_manifest_table
from leuko.data.progress import progress as progress_bar
from leuko.errors import LeukoError
from leuko.evaluation.agreement import differentials
from leuko.training.predictions import PRED, prob_columns, probability_table

MANIFEST = "manifest.csv"
SAMPLE_KEYS = ("patient_id", "sample_type")


class PredictError(LeukoError, ValueError):
    """Bad --model, --input or --out; the message says how to fix it."""


def find_cells(source: str | Path, *, voxel_size: Sequence[float] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(cells, group columns). A manifest (or a folder holding manifest.csv): its rows, grouped by
    patient_id and sample_type when it has them. Any other folder: every volume file below it, grouped by
    the folder each file is in."""
    source = Path(source)
    if source.is_dir() and (source / MANIFEST).is_file():
        source = source / MANIFEST
        print(f"using {source}", file=sys.stderr)
    if source.is_file():
        return _from_manifest(source, voxel_size)
    if not source.is_dir():
        raise PredictError(f"--input {source}: no such file or folder; give a folder of volumes or a manifest CSV")
    files = sorted(p for p in source.rglob("*") if p.is_file() and volume_suffix(p) in SUPPORTED_SUFFIXES)
    if not files:
        raise PredictError(f"--input {source}: no volume files ({', '.join(SUPPORTED_SUFFIXES)}) in it or below it")
    rel = [p.relative_to(source) for p in files]
    cells = pd.DataFrame(
        {
            "cell_id": [str(r.with_name(r.name[: -len(volume_suffix(r))])) for r in rel],
            "path": [str(p) for p in files],
            "folder": [str(r.parent) for r in rel],
        }
    )
    _add_voxel_size(cells, voxel_size)
    return cells, ["folder"]


def _from_manifest(path: Path, voxel_size: Sequence[float] | None) -> tuple[pd.DataFrame, list[str]]:
    if path.suffix.lower() != ".csv":
        raise PredictError(f"--input {path}: a file must be a manifest CSV (cell_id, path, ...); or give a folder")
    table = read_manifest_table(path)
    if "path" not in table.columns:
        raise PredictError(f"--input {path}: the manifest has no `path` column (columns: {', '.join(table.columns)})")
    cells = pd.DataFrame(
        {"cell_id": table["cell_id"] if "cell_id" in table else table["path"], "path": table["abs_path"]}
    )
    groups = [k for k in SAMPLE_KEYS if k in table.columns]
    for key in groups + (["label"] if "label" in table.columns else []):
        cells[key] = table[key].to_numpy()
    if not groups:
        cells["folder"] = [str(Path(p).parent) for p in table["path"]]
        groups = ["folder"]
    if voxel_size is None and all(c in table.columns for c in VOXEL_SIZE_COLUMNS):
        for c in VOXEL_SIZE_COLUMNS:
            cells[c] = pd.to_numeric(table[c], errors="coerce").to_numpy()
    else:
        _add_voxel_size(cells, voxel_size)
    return cells, groups


def _add_voxel_size(cells: pd.DataFrame, voxel_size: Sequence[float] | None) -> None:
    for c, v in zip(VOXEL_SIZE_COLUMNS, voxel_size or (np.nan,) * 3):
        cells[c] = float(v)


def load_model(model_uri: str):
    """(pyfunc model, its LeukoModel). MLFLOW_TRACKING_URI, or sqlite:///mlflow.db, says where models:/ lives."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    import mlflow

    from leuko.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if "://" not in model_uri and ":/" not in model_uri and not Path(model_uri).exists():
        raise PredictError(
            f"--model {model_uri}: give a model URI such as models:/leuko@champion, or a folder with an MLmodel file"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one progress bar (ours) is enough
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise PredictError(
            f"--model {model_uri}: cannot load it from {uri} ({exc.message.splitlines()[0]}); set "
            "MLFLOW_TRACKING_URI to the store the model was registered in, and check the name, version or alias "
            "(`leuko register` prints them)"
        ) from exc
    impl = model.unwrap_python_model()
    if not hasattr(impl, "preprocess"):
        raise PredictError(f"--model {model_uri}: not a leuko model (registered with `leuko register`)")
    return model, impl


def predict(
    model_uri: str,
    source: str | Path,
    out: str | Path = "predictions.csv",
    *,
    batch_size: int = 32,
    voxel_size: Sequence[float] | None = None,
    progress: bool = True,
) -> dict:
    """Run the model on every cell; unreadable cells are reported on stderr, listed, and skipped."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise PredictError(f"--out {out}: give a .csv file name (the differential goes next to it)")
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be at least 1")
    cells, groups = find_cells(source, voxel_size=voxel_size)
    model, impl = load_model(model_uri)
    settings = impl.config["preprocessing"]
    if settings.get("target_voxel_size") is not None and cells[list(VOXEL_SIZE_COLUMNS)].isna().any(axis=None):
        raise PredictError(
            f"the model resamples to {settings['target_voxel_size']} um, so it needs each volume's voxel size: "
            "give a manifest with voxel_size_z/y/x, or --voxel-size Z Y X"
        )
    classes = impl.classes
    kept, probs, skipped = _run(cells, model, impl, batch_size=batch_size, progress=progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.with_suffix("")
    paths = {
        "predictions": out,
        "differential": Path(f"{base}_differential.csv"),
        "skipped": Path(f"{base}_skipped.csv"),
    }
    if skipped:
        pd.DataFrame(skipped).to_csv(paths["skipped"], index=False)
    elif paths["skipped"].exists():
        os.remove(paths["skipped"])  # from an earlier run: it would describe other inputs
    if not kept:
        raise PredictError(f"none of the {len(cells)} volume(s) could be read (see {paths['skipped']})")
    table = pd.DataFrame(kept).drop(columns=list(VOXEL_SIZE_COLUMNS))
    table = pd.concat([table, probability_table(np.concatenate(probs), classes)], axis=1)
    table.to_csv(out, index=False)
    differential(table, classes, groups).to_csv(paths["differential"], index=False)
    return {"n_cells": len(table), "n_skipped": len(skipped), "paths": paths, "groups": groups, "classes": classes}


def _run(cells: pd.DataFrame, model, impl, *, batch_size: int, progress: bool) -> tuple[list, list, list[dict]]:
    """(cells read, their (b, classes) probability batches, {cell_id, path, reason} of the skipped ones)."""
    read_options = impl.config["preprocessing"].get("read_options") or {}
    classes = impl.classes
    kept, probs, skipped = [], [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            frame = model.predict(np.stack(batch), params={"preprocess": False})
            probs.append(frame[prob_columns(classes)].to_numpy())
            batch.clear()

    bar = progress_bar(cells.itertuples(index=False), total=len(cells), desc="predict", unit="cell", enabled=progress)
    for cell in bar:
        size = [getattr(cell, c) for c in VOXEL_SIZE_COLUMNS]
        try:
            volume = read_volume(cell.path, **read_options)
            window = impl.preprocess(volume, None if any(np.isnan(size)) else size)
        except (VolumeError, ValueError, OSError) as exc:
            reason = " ".join(str(exc).split())
            bar.write(f"skipped {cell.cell_id}: {reason}")
            skipped.append({"cell_id": cell.cell_id, "path": cell.path, "reason": reason})
            continue
        batch.append(window)
        kept.append(cell)
        if len(batch) == batch_size:
            flush()
    flush()
    return kept, probs, skipped


def differential(cells: pd.DataFrame, classes: Sequence[str], groups: list[str]) -> pd.DataFrame:
    """Per group: n_cells and pred_<class> percent; with labels that are all model classes, also ref_<class>."""
    labels = cells["label"].astype(str) if "label" in cells.columns else None
    if labels is not None and set(labels) <= set(classes):
        return differentials(cells, classes, by=groups)
    keys = cells[groups].astype(str)
    counts = pd.crosstab([keys[g] for g in groups], pd.Categorical(cells[PRED], categories=list(classes)), dropna=False)
    table = (100.0 * counts.div(counts.sum(axis=1), axis=0)).add_prefix("pred_")
    table.insert(0, "n_cells", counts.sum(axis=1))
    table.columns.name = None
    return table.reset_index()
