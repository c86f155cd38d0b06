"""Time phantom cohort generation and print a table.

python benchmarks/phantoms.py                       # default cohort: 24 patients x 60 cells, 32^3, ri
python benchmarks/phantoms.py --shapes 32 32 32 64 64 64 --modality hhg
python benchmarks/phantoms.py --figure docs/phantom_cells.png   # redraw the gallery in the docs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from leuko.data.phantom_cells import Grid, render_cell
from leuko.data.phantoms import _acquisition, make_cohort, voxel_size_for


def time_cohorts(shapes, *, n_patients: int, cells_per_patient: int, modality: str, fmt: str) -> list[dict]:
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_cohort(
                Path(tmp) / "cohort",
                n_patients=n_patients,
                cells_per_patient=cells_per_patient,
                shape=shape,
                modality=modality,
                fmt=fmt,
                progress=False,
            )
            seconds = time.perf_counter() - start
        n = n_patients * cells_per_patient
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "modality": modality,
                "format": fmt,
                "cells": n,
                "seconds": round(seconds, 1),
                "cells/s": round(n / seconds, 1),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))


def draw_gallery(path: Path, *, shape=(32, 32, 32), per_class: int = 5) -> None:
    """Mid-slices of a few cells per class: RI on the left, the same cells' THG channel on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = Grid(shape, voxel_size_for(shape))
    rows = [
        ("neutrophil", "blood"),
        ("eosinophil", "blood"),
        ("lymphocyte", "blood"),
        ("monocyte", "blood"),
        ("monocyte", "BALF"),
    ]
    fig, axes = plt.subplots(len(rows), 2 * per_class, figsize=(2 * per_class * 1.25, len(rows) * 1.35))
    for i, (label, sample_type) in enumerate(rows):
        for j in range(per_class):
            # one acquisition per column, like cells from different patients
            acq_seed, cell_seed = [2024, j], [2024, i, j]
            ri = render_cell(
                label,
                sample_type,
                "ri",
                _acquisition("ri", np.random.default_rng(acq_seed)),
                grid,
                np.random.default_rng(cell_seed),
            )[0]
            thg = render_cell(
                label,
                sample_type,
                "hhg",
                _acquisition("hhg", np.random.default_rng(acq_seed)),
                grid,
                np.random.default_rng(cell_seed),
            )[0]
            mid = shape[0] // 2
            axes[i, j].imshow(ri[mid], cmap="magma", vmin=1.337, vmax=1.39)
            axes[i, per_class + j].imshow(thg[mid], cmap="gray", vmin=0, vmax=np.percentile(thg[mid], 99.5))
        name = "macrophage (BALF)" if sample_type == "BALF" else label
        axes[i, 0].set_ylabel(name, fontsize=8)
    axes[0, per_class // 2].set_title(f"RI (1.337-1.39), z mid-slice, {'x'.join(map(str, shape))}", fontsize=9)
    axes[0, per_class + per_class // 2].set_title("HHG: THG channel, same cells", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--cells-per-patient", type=int, default=60)
    parser.add_argument("--shapes", type=int, nargs="+", default=[32, 32, 32], help="D H W [D H W ...]")
    parser.add_argument("--modality", default="ri", choices=["ri", "hhg"])
    parser.add_argument("--format", default="npy", choices=["npy", "tif", "nii.gz", "h5"])
    parser.add_argument("--figure", type=Path, help="draw the cell gallery to this PNG instead of timing")
    args = parser.parse_args()
    if args.figure:
        draw_gallery(args.figure)
        return
    if len(args.shapes) % 3:
        parser.error(f"--shapes takes groups of three (D H W), got {args.shapes}")
    shapes = [tuple(args.shapes[i : i + 3]) for i in range(0, len(args.shapes), 3)]
    print_table(
        time_cohorts(
            shapes,
            n_patients=args.patients,
            cells_per_patient=args.cells_per_patient,
            modality=args.modality,
            fmt=args.format,
        )
    )


if __name__ == "__main__":
    main()
