"""Small RI cells and manifests written on the spot, for tests of prepare and the prepared folder."""

import numpy as np

from leuko.data.io import write_volume
from leuko.data.manifest import REQUIRED_COLUMNS

N_MEDIUM = 1.337
LABELS = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")


def ri_cell(shape=(16, 20, 18), centre=(8, 10, 9), radius=3.0, n=1.37):
    """Medium with one ball of refractive index n: (D, H, W)."""
    grid = np.indices(shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    volume = np.full(shape, N_MEDIUM, dtype=np.float32)
    volume[ball] = n
    return volume


def write_cohort(folder, n_cells=6, *, volumes=None, extra=None, voxel_size=(0.5, 0.2, 0.2), extra_columns=""):
    """Cells on two patients plus manifest.csv; volumes[i] overrides cell i's volume."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(REQUIRED_COLUMNS) + extra_columns]
    for i in range(n_cells):
        volume = (volumes or {}).get(i, ri_cell(centre=(6 + i % 4, 9, 8)))
        write_volume(folder / "cells" / f"c{i}.npy", volume)
        z, y, x = voxel_size
        lines.append(f"c{i},cells/c{i}.npy,{LABELS[i % 4]},p{i % 2},blood,{z},{y},{x}")
    lines += extra or []
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(folder):
    """{file name: bytes} of a folder's files."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
