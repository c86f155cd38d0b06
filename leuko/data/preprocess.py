"""One raw cell volume -> the normalised window training sees: resample, find the cell, centre, crop, scale.

`leuko prepare` runs process_cell on every cell of a manifest; a registered model runs it on each volume
it is sent (leuko.deploy.pyfunc_model), with the settings stored in the prepared folder's meta.json, so a
served model sees exactly what training saw.

    ri    x = (n - n_medium) / ri_scale; the cell is the voxels above RI_CELL_THRESHOLD
    hhg   per volume and channel, x = (v - median) / (p99.5 - p0.5); the cell is where the channel mean
          of x exceeds half its p99.5
    other x as for hhg; no cell is looked for, the crop stays centred on the field of view
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from leuko.data.optics import N_MEDIUM, RI_CELL_THRESHOLD

# Cell RI lies about 0.01-0.05 above the medium (cytoplasm ~1.36, nucleus ~1.37-1.38), so
# dividing the contrast by 0.01 puts cell voxels at O(1) (nucleus 1.37 -> 3.3), medium at 0.
RI_SCALE = 0.01
# HHG: per volume and channel, (v - median) / (p99.5 - p0.5); percentiles rather than min/max
# so a few hot pixels do not set the scale. Foreground: channel mean above half its p99.5.
HHG_PERCENTILES = (0.5, 50.0, 99.5)
HHG_FOREGROUND_FRACTION = 0.5


def resample(volume: np.ndarray, voxel_size: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """(C, D, H, W) at voxel_size (z, y, x) -> (C, D', H', W') at target, linear interpolation."""
    factors = [v / t for v, t in zip(voxel_size, target)]
    if all(abs(f - 1.0) < 1e-9 for f in factors):
        return volume
    return np.stack([ndimage.zoom(channel, factors, order=1, mode="nearest") for channel in volume])


def foreground(volume: np.ndarray, modality: str, hhg_scale: np.ndarray | None = None) -> np.ndarray:
    """(D, H, W) boolean mask of the cell in a raw (C, D, H, W) volume."""
    if modality == "ri":
        return volume.max(axis=0) > RI_CELL_THRESHOLD
    offset, scale = hhg_scale
    mean = ((volume - offset[:, None, None, None]) / scale[:, None, None, None]).mean(axis=0)
    return mean > HHG_FOREGROUND_FRACTION * np.percentile(mean, HHG_PERCENTILES[-1])


def hhg_scaling(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (median, p99.5 - p0.5) of a (C, D, H, W) volume, each shape (C,)."""
    low, median, high = np.percentile(volume.reshape(len(volume), -1), HHG_PERCENTILES, axis=1)
    scale = high - low
    # A channel whose central 99% is flat: fall back to its full range, then to 1.
    full = volume.reshape(len(volume), -1).max(axis=1) - volume.reshape(len(volume), -1).min(axis=1)
    scale = np.where(scale > 0, scale, np.where(full > 0, full, 1.0))
    return median.astype(np.float32), scale.astype(np.float32)


def centre_crop_or_pad(
    volume: np.ndarray, centre: Sequence[float], shape: Sequence[int], fill: np.ndarray
) -> np.ndarray:
    """(C, D, H, W) -> (C, *shape) window centred on centre (voxels); outside voxels get fill[c]."""
    out = np.empty((len(volume), *shape), dtype=np.float32)
    out[:] = np.asarray(fill, dtype=np.float32)[:, None, None, None]
    src, dst = [slice(None)], [slice(None)]
    for c, size, n in zip(centre, shape, volume.shape[1:]):
        start = int(np.floor(c - (size - 1) / 2 + 0.5))
        lo, hi = max(start, 0), min(start + size, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def process_cell(
    volume: np.ndarray,
    voxel_size: Sequence[float],
    *,
    modality: str,
    shape: Sequence[int],
    target_voxel_size: Sequence[float] | None = None,
    n_medium: float = N_MEDIUM,
    ri_scale: float = RI_SCALE,
) -> tuple[np.ndarray, bool]:
    """Raw (C, D, H, W) -> normalised (C, *shape) float32 centred on the cell, and whether the
    cell reached beyond the crop."""
    if target_voxel_size is not None:
        volume = resample(volume, voxel_size, target_voxel_size)
    channels = len(volume)
    if modality == "ri":
        offset = np.full(channels, n_medium, dtype=np.float32)
        scale = np.full(channels, ri_scale, dtype=np.float32)
        mask = foreground(volume, "ri")
    else:
        offset, scale = hhg_scaling(volume)
        # generic volumes hold no single cell to centre on: keep the field of view centred.
        mask = foreground(volume, "hhg", (offset, scale)) if modality == "hhg" else None
    if mask is not None and mask.any():
        centre = ndimage.center_of_mass(mask)
        extent = [np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        clipped = any(e[-1] - e[0] + 1 > size for e, size in zip(extent, shape))
    else:
        centre = [(n - 1) / 2 for n in volume.shape[1:]]
        clipped = mask is None and any(n > size for n, size in zip(volume.shape[1:], shape))
    # Pad with the value that normalises to 0: the medium (RI) or the background median (HHG).
    window = centre_crop_or_pad(volume, centre, shape, fill=offset)  # (C, D, H, W)
    window -= offset[:, None, None, None]
    window /= scale[:, None, None, None]
    return window, clipped


def normalisation_meta(modality: str, n_medium: float, ri_scale: float) -> dict:
    """How process_cell normalised a modality, as recorded in meta.json."""
    if modality == "ri":
        return {
            "method": "ri_contrast",
            "formula": "x = (n - n_medium) / ri_scale",
            "n_medium": n_medium,
            "ri_scale": ri_scale,
            "foreground": f"n > {RI_CELL_THRESHOLD}",
            "pad_value": 0.0,
        }
    return {
        "method": "robust_per_volume_per_channel",
        "formula": f"x = (v - p{HHG_PERCENTILES[1]:g}) / (p{HHG_PERCENTILES[2]:g} - p{HHG_PERCENTILES[0]:g})",
        "foreground": f"channel mean of x > {HHG_FOREGROUND_FRACTION} * its p{HHG_PERCENTILES[2]:g}"
        if modality == "hhg"
        else "none: the crop stays centred on the field of view",
        "pad_value": 0.0,
    }
