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

cell_quantiles gives exactly np.quantile's values (its default, linear method) in a fraction of its time:
np.quantile partitions all of a cell's voxels around six ranks, while the values at those ranks lie
between bounds that a sorted random sample of the voxels gives, so only the few voxels between the bounds
are partitioned. When the bounds miss (the count of voxels below them shows it), the whole cell is.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

LEVELS = (0.01, 0.5, 0.99)
TOLERANCE = 0.5
SAMPLE = 1024  # voxels sampled per cell to bound the ranks cell_quantiles needs
SPREAD = 4.0  # bounds this many standard deviations of a sampled rank out: they miss ~1 in 10^4 (normal approx.)
MAX_CELLS = 2000  # training cells summarised (evenly spaced): the envelope settles long before; seconds at 64^3
CHUNK = 64  # cells read from the memmap at a time: 64 MiB at 64^3


def cell_quantiles(volumes: np.ndarray) -> np.ndarray:
    """(..., C, D, H, W) -> (..., C, L) float64: the LEVELS quantiles of each cell's channels, equal to
    np.quantile(voxels, LEVELS) of each (module docstring): numpy's _quantile and _lerp step by step."""
    volumes = np.asarray(volumes, dtype=np.float32)
    flat = volumes.reshape(-1, int(np.prod(volumes.shape[-3:])))  # (R, N): R = cells x channels
    ranks, previous, following, gamma, groups = _plan(flat.shape[1])
    values = (
        np.stack([_order_statistics(row, ranks, groups) for row in flat]) if len(flat) else np.zeros((0, len(ranks)))
    )
    a, b = values[:, previous], values[:, following]  # (R, L): the voxels each quantile lies between
    difference = b - a
    result = np.add(a, difference * gamma)
    np.subtract(b, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return result.reshape(*volumes.shape[:-3], len(LEVELS))


@functools.cache
def _plan(n: int) -> tuple:
    """For N voxels: (the sorted ranks whose values the LEVELS quantiles need, the index in them of each
    quantile's lower and upper voxel, the (L,) interpolation weights, and the runs of neighbouring ranks
    as (their indexes, lowest rank, highest rank, lower and upper sample bound or None)), as np.quantile
    computes them."""
    virtual = (n - 1) * np.asarray(LEVELS, dtype=np.float64)
    previous = np.floor(virtual)
    following = previous + 1
    previous[virtual >= n - 1] = following[virtual >= n - 1] = -1  # beyond the last voxel: the largest
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    gamma = virtual - previous
    ranks = np.unique(np.concatenate([previous, following]) % n)
    groups = []
    for group in np.split(np.arange(len(ranks)), np.flatnonzero(np.diff(ranks) > 1) + 1):
        lowest, highest = int(ranks[group[0]]), int(ranks[group[-1]])
        low = math.floor(lowest * SAMPLE / n - _margin(lowest / n))
        high = math.ceil((highest + 1) * SAMPLE / n + _margin(highest / n))
        groups.append((group, lowest, highest, low if low > 0 else None, high if high < SAMPLE else None))
    where = np.searchsorted(ranks, previous % n), np.searchsorted(ranks, following % n)
    return ranks, *where, gamma, groups


def _order_statistics(row: np.ndarray, ranks: np.ndarray, groups: list) -> np.ndarray:
    """The values at these sorted 0-based ranks of row sorted, as np.partition(row, ranks)[ranks]."""
    n = len(row)
    if n <= 8 * SAMPLE:
        return np.partition(row, ranks)[ranks]
    sample = np.sort(row[_sample_index(n)])  # (SAMPLE,)
    out = np.empty(len(ranks), dtype=row.dtype)
    keep = np.empty(n, dtype=bool)
    for group, lowest, highest, low, high in groups:
        below, candidates = 0, row
        if low is not None:
            np.greater_equal(row, sample[low], out=keep)
            below = n - int(np.count_nonzero(keep))
            if high is not None:
                keep &= row <= sample[high]
        elif high is not None:  # no lower bound: the ranks start at the smallest voxel
            np.less_equal(row, sample[high], out=keep)
        if low is not None or high is not None:
            candidates = row[keep]
        if below <= lowest and below + len(candidates) > highest:
            wanted = ranks[group] - below
            out[group] = np.partition(candidates, wanted)[wanted]
        else:  # the sample's bounds missed these ranks: partition the whole row
            out[group] = np.partition(row, ranks[group])[ranks[group]]
    return out


def _margin(p: float) -> float:
    """How far (in sample ranks) the sampled rank of quantile p may stray: SPREAD standard deviations, + 2."""
    return SPREAD * math.sqrt(p * (1 - p) * SAMPLE) + 2


@functools.cache
def _sample_index(n: int) -> np.ndarray:
    """SAMPLE voxel indexes drawn once per cell size without replacement (fixed seed: the same every run)."""
    return np.sort(np.random.default_rng(0).choice(n, SAMPLE, replace=False))


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


def out_of_distribution_cells(quantiles: np.ndarray, reference: dict) -> list[str]:
    """out_of_distribution of each cell's quantiles in (B, C, L), testing all cells at once."""
    quantiles = np.asarray(quantiles)
    low, high = np.asarray(reference["low"]), np.asarray(reference["high"])  # (C, L)
    if quantiles.shape[1:] != low.shape:
        return [out_of_distribution(q, reference) for q in quantiles]
    margin = reference["tolerance"] * np.maximum(np.asarray(reference["spread"]), 1e-6)[:, None]  # as below
    outside = ((quantiles < low - margin) | (quantiles > high + margin)).any(axis=(1, 2))  # (B,)
    return [out_of_distribution(q, reference) if out else "" for q, out in zip(quantiles, outside)]


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
