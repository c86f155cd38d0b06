"""The intensities a model was trained on, stored with it, and the test of a new cell against them.

`leuko register` summarises the prepared training cells (what the net saw: normalised and cropped) with
training_intensities; model_config.json keeps the summary under "intensity":

    levels     [0.01, 0.5, 0.99]   quantile levels taken within each cell and channel
    low        (C, L)              the lowest value of each quantile over the training cells
    high       (C, L)              the highest
    spread     (C,)                highest 99% quantile - lowest 1% quantile: the training data's range
    tolerance  0.5                 how far outside [low, high] a cell may lie, in units of spread
    n_cells    N                   training cells summarised

`leuko predict` takes the same quantiles of each prepared cell (cell_quantiles) and calls the cell out of
distribution when one of them lies more than tolerance x spread outside [low, high]. Volumes of another
modality or scale (THG counts through an RI model, RI stored in other units) land hundreds of spreads
away; cells like the training ones stay within the margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEVELS = (0.01, 0.5, 0.99)
TOLERANCE = 0.5
MAX_CELLS = 2000  # training cells summarised (evenly spaced): the envelope settles long before; seconds at 64^3
CHUNK = 64  # cells read from the memmap at a time: 64 MiB at 64^3


def cell_quantiles(volumes: np.ndarray) -> np.ndarray:
    """(..., C, D, H, W) -> (..., C, L): the LEVELS quantiles of each cell's channels."""
    volumes = np.asarray(volumes, dtype=np.float32)
    flat = volumes.reshape(*volumes.shape[:-3], -1)  # (..., C, D*H*W)
    return np.moveaxis(np.quantile(flat, LEVELS, axis=-1), 0, -1)


def training_intensities(volumes_path: str | Path, rows: np.ndarray) -> dict:
    """The "intensity" summary (module docstring) of the prepared cells at rows of volumes.npy."""
    volumes = np.load(volumes_path, mmap_mode="r", allow_pickle=False)  # (N, C, D, H, W)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise ValueError(f"{volumes_path}: no training rows to summarise")
    if len(rows) > MAX_CELLS:
        rows = rows[np.linspace(0, len(rows) - 1, MAX_CELLS).round().astype(np.int64)]
    stats = np.concatenate([cell_quantiles(volumes[rows[i : i + CHUNK]]) for i in range(0, len(rows), CHUNK)])
    low, high = stats.min(axis=0), stats.max(axis=0)  # (C, L)
    return {
        "levels": list(LEVELS),
        "low": low.tolist(),
        "high": high.tolist(),
        "spread": (high[:, -1] - low[:, 0]).tolist(),
        "tolerance": TOLERANCE,
        "n_cells": int(len(rows)),
    }


def out_of_distribution(quantiles: np.ndarray, reference: dict) -> str:
    """'' when a cell's (C, L) quantiles lie within the reference's margin; else why not, for its first outlier."""
    low, high = np.asarray(reference["low"]), np.asarray(reference["high"])  # (C, L)
    # a constant channel in training (spread 0) still gets a margin for float rounding
    margin = reference["tolerance"] * np.maximum(np.asarray(reference["spread"]), 1e-6)[:, None]  # (C, 1)
    quantiles = np.asarray(quantiles)
    if quantiles.shape != low.shape:
        return f"{quantiles.shape[0]} channel(s), the training data had {low.shape[0]}"
    outside = (quantiles < low - margin) | (quantiles > high + margin)
    if not outside.any():
        return ""
    c, q = (int(i) for i in np.argwhere(outside)[0])
    level = reference["levels"][q]
    name = "median" if level == 0.5 else f"{level:.0%} quantile"
    return (
        f"channel {c} {name} {quantiles[c, q]:.4g} is outside the training range "
        f"{low[c, q]:.4g} .. {high[c, q]:.4g} (margin {margin[c, 0]:.3g})"
    )
