"""`leuko explain --model URI --input MANIFEST --cells ID,... --out DIR`: what a registered model looked at.

Each chosen cell of --input (a manifest or a folder, as `leuko predict` takes them) is read, prepared with
the model's own settings, predicted, and explained for its predicted class by 3D Grad-CAM and occlusion
sensitivity (leuko.evaluation.saliency). DIR gets a PNG per cell and method and an index (explain.csv,
explain.json): leuko.evaluation.saliency_figures. Without --cells, the first --n cells.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.io import VolumeError, read_volume
from leuko.data.manifest import VOXEL_SIZE_COLUMNS
from leuko.deploy.predict import find_cells, load_model
from leuko.errors import LeukoError
from leuko.evaluation.saliency_figures import METHODS, explain_cells


class ExplainError(LeukoError, ValueError):
    """Cells that are not in --input, or none that can be read; the message says what to give."""


def choose(cells: pd.DataFrame, wanted: Sequence[str] | None, n: int, source) -> pd.DataFrame:
    """The rows of cells named in wanted (in that order), or the first n."""
    if not wanted:
        return cells.head(n).reset_index(drop=True)
    ids = cells["cell_id"].astype(str)
    missing = [c for c in wanted if c not in set(ids)]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ExplainError(
            f"--cells: {shown} not in --input {source} (its cell ids run {ids.iloc[0]} .. {ids.iloc[-1]}); "
            "give ids from its cell_id column (or, for a folder, file paths without the suffix)"
        )
    return cells.set_index(ids, drop=False).loc[list(wanted)].reset_index(drop=True)


def explain(
    model_uri: str,
    source: str | Path,
    out: str | Path,
    *,
    cells: Sequence[str] | None = None,
    n: int = 4,
    methods: Sequence[str] = METHODS,
    layer: str | None = None,
    mask_size: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    progress: bool = True,
) -> dict:
    """Write the explain folder (module docstring); returns {"out", "n_cells", "index", "skipped"}."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ExplainError(f"--methods {','.join(methods)}: choose from {', '.join(METHODS)}")
    table, _ = find_cells(source, voxel_size=voxel_size)
    chosen = choose(table, cells, n, source)
    _, impl = load_model(model_uri, runtime="torch")  # Grad-CAM needs the net's gradients: PyTorch
    read_options = impl.config["preprocessing"].get("read_options") or {}
    kept, volumes, skipped = [], [], []
    for i, cell in enumerate(chosen.itertuples(index=False)):
        size = [getattr(cell, c) for c in VOXEL_SIZE_COLUMNS]
        try:
            volume = read_volume(cell.path, **read_options)
            volumes.append(impl.preprocess(volume, None if any(np.isnan(size)) else size))  # (C, *shape)
            kept.append(i)
        except (VolumeError, ValueError, OSError) as exc:
            print(f"skipped {cell.cell_id}: {' '.join(str(exc).split())}", file=sys.stderr)
            skipped.append(str(cell.cell_id))
    if not kept:
        raise ExplainError(f"none of the {len(chosen)} chosen cells of --input {source} could be read")
    prepared = np.stack(volumes)  # (N, C, D, H, W)
    index = explain_cells(
        impl.net,
        prepared,
        chosen.iloc[kept].reset_index(drop=True),
        impl.predict_proba(prepared),
        impl.classes,
        out,
        source=model_uri,
        temperature=getattr(impl, "temperature", 1.0),
        bias=getattr(impl, "bias", None),
        methods=methods,
        layer=layer,
        mask_size=mask_size,
        progress=progress,
    )
    return {"out": Path(out), "n_cells": len(kept), "index": index, "skipped": skipped}
