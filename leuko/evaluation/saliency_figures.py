"""An explain folder: saliency maps (leuko.evaluation.saliency) of chosen cells drawn over the cells, and its index.

    <cell>_<method>.png   per cell and method: mid-slices (z, y, x) and maximum projections of the prepared cell
                          (first channel, grey) with the map overlaid; the title names the cell, its label,
                          the prediction and its probability
    explain.csv           one row per cell and method: cell_id, [label], pred_label, probability (of the
                          predicted class), correct, method, layer (Grad-CAM's), peak_z/y/x (the map's
                          maximum, voxels of the prepared cell), png
    explain.json          {"source", "net", "classes", "temperature", "bias" (class biases or null), "methods",
                          "cells": the rows of explain.csv}

The maps explain the predicted class. `leuko explain` (a registered model) and `leuko report --explain`
(a CV's best checkpoint) write this folder; the report shows it when it exists (runs/NAME/explain/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from leuko.data.progress import progress as progress_bar

INDEX_CSV, INDEX_JSON = "explain.csv", "explain.json"
EXPLAIN = "explain"  # a CV's explain folder: runs/NAME/explain/
METHODS = ("gradcam", "occlusion")
TITLES = {"gradcam": "Grad-CAM", "occlusion": "occlusion sensitivity"}
AXES = ("z", "y", "x")


def file_stem(cell_id: str) -> str:
    """A cell id as a file name (ids from folders hold slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(cell_id)).strip("_") or "cell"


def render(volume: np.ndarray, saliency: np.ndarray, path: str | Path, title: str) -> None:
    """PNG of the (C, D, H, W) cell's first channel with the (D, H, W) map: mid-slices, then maximum projections."""
    image = np.asarray(volume[0], dtype=np.float32)  # (D, H, W)
    fig = Figure(figsize=(9, 6.6), layout="constrained")  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(2, 3)
    for a, name in enumerate(AXES):
        middle = image.shape[a] // 2
        views = (
            (np.take(image, middle, axis=a), np.take(saliency, middle, axis=a), f"{name} = {middle} (mid-slice)"),
            (image.max(axis=a), saliency.max(axis=a), f"max projection along {name}"),
        )
        for row, (img, sal, label) in enumerate(views):
            ax = axes[row, a]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            # the map where it is at least a tenth of its peak, so the cell shows through elsewhere
            ax.imshow(np.ma.masked_less(sal, 0.1), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if not saliency.any():
        title += " (0 everywhere: no region raised this class)"
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=72)


def explain_cells(
    net,
    volumes: np.ndarray,
    cells: pd.DataFrame,
    probs: np.ndarray,
    classes: Sequence[str],
    out: str | Path,
    *,
    source: str,
    temperature: float = 1.0,
    bias: list[float] | None = None,
    methods: Sequence[str] = METHODS,
    layer: str | None = None,
    mask_size: Sequence[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Maps, PNGs and the index (module docstring) of prepared cells volumes (N, C, D, H, W), rows of cells
    (cell_id, optional label) with their probabilities probs (N, classes); returns the index table."""
    # heavy import here: torch and MONAI take seconds to load, and the report reads an explain folder without them
    from leuko.evaluation.saliency import explain_cell

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    rows = []
    bar = progress_bar(range(len(cells)), total=len(cells), desc="explain", unit="cell", enabled=progress)
    for i in bar:
        cell = cells.iloc[i]
        target = int(np.argmax(probs[i]))
        label = str(cell["label"]) if "label" in cells.columns and pd.notna(cell["label"]) else None
        maps, used = explain_cell(
            net,
            volumes[i],
            target,
            methods=methods,
            layer=layer,
            temperature=temperature,
            mask_size=mask_size,
            bias=bias,
        )
        for method, saliency in maps.items():
            png = f"{file_stem(cell['cell_id'])}_{method}.png"
            title = (
                f"{cell['cell_id']}: predicted {classes[target]} ({probs[i, target]:.2f})"
                + (f", label {label}" if label is not None else "")
                + f"; {TITLES[method]}"
                + (f" on {used.removeprefix('net.')}" if method == "gradcam" else "")
            )
            render(volumes[i], saliency, out / png, title)
            peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
            rows.append(
                {"cell_id": cell["cell_id"]}
                | ({"label": label} if "label" in cells.columns else {})
                | {"pred_label": classes[target], "probability": float(probs[i, target])}
                | {"correct": (label == classes[target]) if label is not None else None, "method": method}
                | {"layer": used if method == "gradcam" else ""}
                | {f"peak_{a}": int(p) for a, p in zip(AXES, peak)}
                | {"png": png}
            )
    index = pd.DataFrame(rows)
    index.to_csv(out / INDEX_CSV, index=False)
    meta = {"source": source, "net": type(net).__name__, "classes": classes, "temperature": float(temperature),
            "bias": bias}  # fmt: skip
    meta |= {"methods": list(methods), "cells": json.loads(index.to_json(orient="records"))}
    (out / INDEX_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return index


def read_index(folder: str | Path) -> pd.DataFrame | None:
    """An explain folder's explain.csv, or None when there is none."""
    path = Path(folder) / INDEX_CSV
    return pd.read_csv(path, dtype={"cell_id": str, "label": str}) if path.is_file() else None
