"""What a trained network learned: a 2D UMAP of its penultimate features, coloured by class and by patient.

Classes that separate in the embedding are what the head can tell apart. Points that cluster by patient
across classes show patient or batch effects (acquisition, sample handling) the features picked up: a
model leaning on them would not carry over to new patients.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leuko.data.prepared import load_prepared
from leuko.errors import LeukoError
from leuko.training.run_dir import (
    BEST,
    CHECKPOINTS,
    FOLD_PREFIX,
    best_checkpoints,
    fold_dir,
    load_checkpoint,
    read_run_id,
)

UMAP_CLASS = "umap_class.png"
UMAP_PATIENT = "umap_patient.png"
UMAP_CSV = "umap.csv"  # cell_id, label, patient_id, sample_type, umap_1, umap_2, fold
UMAP_FILES = (UMAP_CLASS, UMAP_PATIENT, UMAP_CSV)


class EmbeddingError(LeukoError, ValueError):
    """A CV folder or --umap-fold with no checkpoint to embed; the message lists the folds that have one."""


def penultimate_features(model, volumes: np.ndarray, rows: Sequence[int], *, batch_size: int = 64) -> np.ndarray:
    """(N, num_features) of model.features(x) (a VolumeClassifier) for volumes[rows], on the model's device."""
    import torch  # heavy imports in this module's functions: torch, umap and matplotlib take seconds to load

    rows = np.asarray(rows)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(
                np.asarray(volumes[rows[start : start + batch_size]], dtype=np.float32)
            )  # (B, C, D, H, W)
            out.append(model.features(x.to(model.device)).float().cpu().numpy())  # (B, F)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def umap_2d(features: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """(N, F) -> (N, 2). Features are z-scored first so no single unit's scale dominates the distances."""
    import umap  # heavy import: see penultimate_features

    features = np.asarray(features, dtype=np.float32)
    if len(features) < 4:
        raise ValueError(f"UMAP needs at least 4 cells, got {len(features)}")
    z = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    # n_neighbors must stay below the number of points; a fixed random_state makes the picture repeatable.
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(z) - 1), min_dist=min_dist, random_state=seed, n_jobs=1)
    return reducer.fit_transform(z)


def embedding_plot(
    coords: np.ndarray,
    groups: Sequence[str],
    path: str | Path,
    *,
    title: str,
    legend_title: str,
    order: Sequence[str] | None = None,
) -> Path:
    """Scatter of (N, 2) coords, one colour per group; a legend (outside, right) when there are at most 40."""
    # heavy imports here: see penultimate_features
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    groups = np.asarray([str(g) for g in groups])
    names = [str(g) for g in order] if order is not None else sorted(set(groups))
    names = [g for g in names if (groups == g).any()] + sorted(set(groups) - set(map(str, names)))
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    fig = Figure(figsize=(7.5 if len(names) <= 40 else 6.0, 5.6), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(names):
        sel = groups == name
        colour = palette[i % len(palette)]
        marker = "os^Dv<>"[(i // len(palette)) % 7]  # beyond 20 groups colours repeat: vary the marker
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=10,
            alpha=0.75,
            color=colour,
            marker=marker,
            label=f"{name} ({int(sel.sum())})",
            linewidths=0,
        )
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    if len(names) <= 40:
        fig.legend(
            loc="outside right upper",
            title=legend_title,
            fontsize=7,
            title_fontsize=8,
            markerscale=1.5,
            ncols=1 if len(names) <= 20 else 2,
        )
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def load_classifier(path: str | Path):
    """A VolumeClassifier from a Lightning checkpoint, on the CPU, in eval mode.

    The checkpoint is read weights-only (a file that needs unpickling is refused with CheckpointError), and
    the classifier is built from its stored hyperparameters, so nothing in the file chooses code to run.
    Checkpoints written while the classifier still registered its (optionally compiled) forward net as a
    submodule hold every weight twice, under net.* and forward_net.*; only net.* is loaded, strictly."""
    # heavy import here: torch and Lightning take seconds to load
    from leuko.training.module import VolumeClassifier

    ckpt = load_checkpoint(path)
    accepted = inspect.signature(VolumeClassifier.__init__).parameters
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in accepted}
    model = VolumeClassifier(**hparams)
    state = ckpt["state_dict"]
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("forward_net.")}, strict=True)
    return model.eval()


def embed_cv_fold(
    cv_dir: str | Path,
    out_dir: str | Path,
    *,
    fold: str | int | None = None,
    cells: str = "val",
    seed: int = 0,
    n_neighbors: int = 15,
) -> dict:
    """UMAP of the penultimate features of one fold's best checkpoint of a `leuko cv` output folder.

    cells: "val" (the fold's validation patients, which the model never saw), "dev" (every non-test cell)
    or "all". Writes UMAP_FILES into out_dir; returns {"fold", "checkpoint", "n_cells", "paths", "run_id"}
    where run_id is the fold's MLflow run (from fold_<f>/mlflow_run_id) or None."""
    cv_dir, out_dir = Path(cv_dir), Path(out_dir)
    if cells not in ("val", "dev", "all"):
        raise ValueError(f"cells={cells!r}: use val, dev or all")
    checkpoints = best_checkpoints(cv_dir)
    if not checkpoints:
        raise EmbeddingError(
            f"{cv_dir}: no {FOLD_PREFIX}*/{CHECKPOINTS}/{BEST}; run `leuko cv` with validation folds first"
        )
    fold = str(fold) if fold is not None else sorted(checkpoints, key=lambda f: (len(f), f))[0]
    if fold not in checkpoints:
        raise EmbeddingError(
            f"{cv_dir}: fold {fold} has no best checkpoint; folds with one: {', '.join(sorted(checkpoints))}"
        )
    model = load_classifier(checkpoints[fold])
    table, volumes, classes = _cells_to_embed(cv_dir, fold, cells)
    print(f"UMAP: {len(table)} {cells} cells of fold {fold} through {checkpoints[fold]}", file=sys.stderr)
    features = penultimate_features(model, volumes, table["row"].to_numpy())
    coords = umap_2d(features, n_neighbors=n_neighbors, seed=seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    net = model.hparams.net
    what = {"val": f"validation cells of fold {fold}", "dev": "all non-test cells", "all": "all cells"}[cells]
    paths = [
        embedding_plot(
            coords,
            table["label"],
            out_dir / UMAP_CLASS,
            order=classes,
            legend_title="class",
            title=f"{net} penultimate features, {what}: by class",
        ),
        embedding_plot(
            coords,
            table["patient_id"],
            out_dir / UMAP_PATIENT,
            legend_title="patient",
            title=f"{net} penultimate features, {what}: by patient",
        ),
    ]
    frame = table.drop(columns="row").assign(umap_1=coords[:, 0], umap_2=coords[:, 1], fold=fold)
    frame.to_csv(out_dir / UMAP_CSV, index=False)
    paths.append(out_dir / UMAP_CSV)
    return {
        "fold": fold,
        "checkpoint": str(checkpoints[fold]),
        "n_cells": len(table),
        "paths": paths,
        "run_id": read_run_id(fold_dir(cv_dir, fold)),
        "cells": cells,
        "net": net,
    }


def _cells_to_embed(cv_dir: Path, fold: str, cells: str):
    """(cells: cell_id, label, patient_id, sample_type, row; the prepared volumes; the classes) of a CV fold."""
    # heavy imports here: the folds and baselines modules load scikit-learn and scikit-image
    from leuko.data.folds import TEST, fold_masks
    from leuko.evaluation.baselines import cv_splits

    splits, _, prepared = cv_splits(cv_dir)
    volumes, index, meta = load_prepared(prepared)
    by_id = index.set_index(index["cell_id"].astype(str))
    if cells == "val":
        chosen = splits[fold_masks(splits, fold)["val"]]
    elif cells == "dev":
        chosen = splits[splits["fold"].astype(str) != TEST]
    else:
        chosen = splits
    table = by_id.loc[chosen["cell_id"].astype(str), ["label", "patient_id", "sample_type", "row"]].reset_index()
    return table, volumes, list(meta["classes"])
