"""The embedded default cohort: synthetic single-leukocyte volumes that stand in for an HHG microscopy
or refractive-index (RI) tomography study, so every command runs on a fresh machine without downloads.

Every cell is drawn from its own numpy Generator seeded by (seed, patient, cell), so a cell does not depend
on the order of generation, and the same arguments give byte-identical files, manifest.csv and cohort.json.

What makes the problem hard on purpose: class size distributions overlap (Ryu et al. 2021: B cell 185+-35 fL,
T cell 232+-30 fL, monocyte 423+-61 fL), each cell gets its own protein density, and each patient its own
acquisition (gain, background offset, noise, anisotropic blur), so cell volume, sphericity, dry mass and
mean RI separate the classes only partly. What separates them is internal 3D structure: nucleus lobes,
granules, nucleus shape, vacuoles and lipid droplets.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np

from leuko.data.io import write_volume
from leuko.data.manifest import REQUIRED_COLUMNS
from leuko.data.optics import DEFAULT_CLASSES, N_MEDIUM, RI_CELL_THRESHOLD
from leuko.data.phantom_cells import Acquisition, Grid, render_cell
from leuko.data.progress import progress as progress_bar
from leuko.data.swap import recover, staging_dir, swap_into_place
from leuko.errors import LeukoError

MODALITIES = ("ri", "hhg")
FORMATS = ("npy", "tif", "nii.gz", "h5")
SAMPLE_TYPES = ("BALF", "blood")
MANIFEST_COLUMNS = (*REQUIRED_COLUMNS, "modality")
CHANNELS = {"ri": ("ri",), "hhg": ("thg", "shg")}
GENERATOR = "leuko.data.phantoms"
MANIFEST = "manifest.csv"
COHORT = "cohort.json"  # the arguments, the classes and every patient's plan
GENERATOR_VERSION = 1  # bump whenever the same arguments would give different volumes

# Edge of the field of view in um along every axis, whatever the shape: a 32^3 box gets 0.5 um voxels and
# holds the largest cells (BALF macrophages, ~12 um) with a margin; other shapes keep the cells filling the
# box the same way, with anisotropic voxels where the shape is anisotropic (48x96x96 -> 0.333 x 0.167 x 0.167 um).
FIELD_OF_VIEW_UM = 16.0
MIN_SIDE = 16  # below this a lobe or granule is smaller than a voxel
MIN_CLASS_FRACTION = 0.05  # per-patient minimum share of every class, see _cell_counts


class PhantomError(LeukoError, ValueError):
    """A cohort setting or output folder that cannot be used; the message says what to give instead."""


# ------------------------------------------------------------------ cohort layout


def _check_args(n_patients, cells_per_patient, shape, modality, fmt, seed) -> tuple[int, int, int]:
    if modality not in MODALITIES:
        raise PhantomError(f"modality={modality!r} is not supported; choose one of: {', '.join(MODALITIES)}")
    if fmt not in FORMATS:
        raise PhantomError(f"fmt={fmt!r} is not supported; choose one of: {', '.join(FORMATS)}")
    for name, value in (("n_patients", n_patients), ("cells_per_patient", cells_per_patient)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PhantomError(f"{name}={value!r} is invalid; give a whole number >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed={seed!r} is invalid; give a whole number >= 0")
    try:
        dims = tuple(int(s) for s in shape)
        ok = len(dims) == 3 and all(d == s for d, s in zip(dims, shape)) and min(dims) >= MIN_SIDE
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PhantomError(
            f"shape={shape!r} is invalid; give three whole numbers (D, H, W), each >= {MIN_SIDE}, e.g. (32, 32, 32)"
        )
    return dims  # type: ignore[return-value]


def voxel_size_for(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """(z, y, x) voxel size in um that makes cells fill a box of this shape like they fill a 32^3 box."""
    return tuple(round(FIELD_OF_VIEW_UM / s, 6) for s in shape)  # type: ignore[return-value]


def _sample_types(n_patients: int, rng: np.random.Generator) -> list[str]:
    # exactly half BALF, half blood (BALF gets the odd one), in a seeded order
    types = ["BALF"] * (n_patients - n_patients // 2) + ["blood"] * (n_patients // 2)
    return [types[i] for i in rng.permutation(n_patients)]


def _differential(sample_type: str, rng: np.random.Generator) -> dict[str, float]:
    """Per-patient class fractions. The dominant class takes the remainder of the minor ones."""
    if sample_type == "blood":
        # adult blood reference ranges: eosinophils 1-6 %, monocytes 2-10 %, lymphocytes 20-40 %,
        # neutrophils 50-70 %; lymphocytes are drawn inside the window that keeps neutrophils in 50-70 %
        eos = rng.uniform(1, 6)
        mono = rng.uniform(2, 10)
        lym = rng.uniform(max(20.0, 30 - eos - mono), min(40.0, 50 - eos - mono))
        neu = 100 - eos - mono - lym
    else:
        # BALF: alveolar macrophages dominate (~60-90 %, never below 36 % here); a share of patients has a
        # neutrophilic (infection) or eosinophilic (e.g. eosinophilic pneumonia, asthma) lavage
        lym = rng.uniform(4, 22)
        neu = rng.uniform(10, 30) if rng.random() < 0.3 else rng.uniform(0.5, 6)
        eos = rng.uniform(5, 12) if rng.random() < 0.25 else rng.uniform(0.3, 3)
        mono = 100 - lym - neu - eos
    pct = {"neutrophil": neu, "eosinophil": eos, "lymphocyte": lym, "monocyte": mono}
    return {c: pct[c] / 100 for c in DEFAULT_CLASSES}


def _cell_counts(fractions: dict[str, float], n_cells: int) -> tuple[dict[str, int], int]:
    """Largest-remainder rounding of fractions * n_cells, then every class lifted to a mild minimum.

    Without the minimum, blood patients (eosinophils 1-6 %) give 0-3 eosinophils each and the cohort would
    hold too few for a classifier to learn; the minimum is taken from the largest classes."""
    minimum = min(n_cells // len(fractions), math.ceil(MIN_CLASS_FRACTION * n_cells))
    exact = {c: f * n_cells for c, f in fractions.items()}
    counts = {c: int(math.floor(v)) for c, v in exact.items()}
    # ties broken by class order, so the result does not depend on float noise in the sort
    order = sorted(fractions, key=lambda c: (-(exact[c] - counts[c]), DEFAULT_CLASSES.index(c)))
    for c in order[: n_cells - sum(counts.values())]:
        counts[c] += 1
    for c in DEFAULT_CLASSES:
        while counts[c] < minimum:
            donor = max(DEFAULT_CLASSES, key=lambda d: (counts[d], -DEFAULT_CLASSES.index(d)))
            counts[donor] -= 1
            counts[c] += 1
    return counts, minimum


def _acquisition(modality: str, rng: np.random.Generator) -> Acquisition:
    blur_z, blur_xy = rng.uniform(0.3, 0.75), rng.uniform(0.15, 0.35)
    if modality == "ri":
        # offsets of ~1e-3 RI and noise of 1-3e-3 RI are typical for optical diffraction tomography
        return Acquisition(
            rng.uniform(0.85, 1.15), rng.normal(0.0, 0.0012), rng.uniform(0.0008, 0.002), blur_z, blur_xy
        )
    return Acquisition(rng.uniform(0.6, 1.4), rng.uniform(0.01, 0.06), rng.uniform(0.02, 0.05), blur_z, blur_xy)


# ------------------------------------------------------------------ cohort


def _fmt(x: float) -> float:
    """Floats in cohort.json rounded so the text is stable and readable."""
    return float(f"{x:.6g}")


def _patient_plan(seed: int, n_patients: int, cells_per_patient: int, modality: str):
    sample_types = _sample_types(n_patients, np.random.default_rng([seed, 0]))
    width = max(2, len(str(n_patients)))
    plan = []
    for p, sample_type in enumerate(sample_types):
        rng = np.random.default_rng([seed, 1, p])
        fractions = _differential(sample_type, rng)
        counts, minimum = _cell_counts(fractions, cells_per_patient)
        labels = [c for c in DEFAULT_CLASSES for _ in range(counts[c])]
        labels = [labels[i] for i in rng.permutation(len(labels))]
        plan.append(
            dict(
                patient_index=p,
                patient_id=f"P{p + 1:0{width}d}",
                sample_type=sample_type,
                sampled_fractions=fractions,
                counts=counts,
                labels=labels,
                minimum=minimum,
                acquisition=_acquisition(modality, rng),
            )
        )
    return plan


def make_cohort(
    out_dir: str | Path,
    *,
    n_patients: int = 24,
    cells_per_patient: int = 60,
    shape: tuple[int, int, int] = (32, 32, 32),
    modality: str = "ri",
    fmt: str = "npy",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic cohort (one volume per cell, manifest.csv, cohort.json) and return the manifest path.

    out_dir must be new, empty, or hold an earlier phantom cohort (which is replaced). The cohort is built
    in a staging sibling folder and swapped into place at the end (leuko.data.swap), so an interrupted run
    leaves nothing half-done and the old or the new cohort always exists.
    """
    shape = _check_args(n_patients, cells_per_patient, shape, modality, fmt, seed)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PhantomError(f"out_dir={str(out_dir)!r} is a file; give a folder path for the cohort")
        if any(out_dir.iterdir()) and not _is_phantom_cohort(out_dir):
            raise PhantomError(
                f"out_dir={str(out_dir)!r} is not empty and holds no phantom cohort (cohort.json); "
                "choose a new or empty folder so nothing there is overwritten"
            )
    voxel = voxel_size_for(shape)
    grid = Grid(shape, voxel)
    plan = _patient_plan(seed, n_patients, cells_per_patient, modality)

    for message in recover(out_dir):  # what an interrupted run left beside out_dir
        warnings.warn(message, stacklevel=2)
    tmp = staging_dir(out_dir)
    try:
        rows = _write_cells(
            tmp,
            plan,
            grid,
            voxel,
            cells_per_patient=cells_per_patient,
            seed=seed,
            modality=modality,
            fmt=fmt,
            progress=progress,
        )
        with open(tmp / MANIFEST, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        cohort = _cohort_record(plan, n_patients, cells_per_patient, shape, voxel, modality, fmt, seed)
        (tmp / COHORT).write_text(json.dumps(cohort, indent=2) + "\n", encoding="utf-8")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST


def _write_cells(
    tmp: Path,
    plan: list[dict],
    grid: Grid,
    voxel: tuple,
    *,
    cells_per_patient: int,
    seed: int,
    modality: str,
    fmt: str,
    progress: bool,
) -> list[tuple]:
    """Render and write every planned cell under tmp/volumes/<patient>/; returns the manifest rows."""
    cell_width = max(3, len(str(cells_per_patient)))
    rows = []
    with progress_bar(total=len(plan) * cells_per_patient, desc="phantom cells", unit="cell", enabled=progress) as bar:
        for pt in plan:
            folder = tmp / "volumes" / pt["patient_id"]
            folder.mkdir(parents=True)
            for c, label in enumerate(pt["labels"]):
                rng = np.random.default_rng([seed, 2, pt["patient_index"], c])
                volume = render_cell(label, pt["sample_type"], modality, pt["acquisition"], grid, rng)
                cell_id = f"{pt['patient_id']}_C{c + 1:0{cell_width}d}"
                rel = f"volumes/{pt['patient_id']}/{cell_id}.{fmt}"
                write_volume(tmp / rel, volume, voxel_size=voxel)
                rows.append((cell_id, rel, label, pt["patient_id"], pt["sample_type"], *map(repr, voxel), modality))
                bar.update(1)
    return rows


def _is_phantom_cohort(folder: Path) -> bool:
    try:
        return json.loads((folder / COHORT).read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _cohort_record(plan, n_patients, cells_per_patient, shape, voxel, modality, fmt, seed) -> dict:
    totals = {c: sum(pt["counts"][c] for pt in plan) for c in DEFAULT_CLASSES}
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_patients": n_patients,
        "cells_per_patient": cells_per_patient,
        "shape": list(shape),
        "voxel_size_um": {"z": voxel[0], "y": voxel[1], "x": voxel[2]},
        "field_of_view_um": FIELD_OF_VIEW_UM,
        "modality": modality,
        "channels": list(CHANNELS[modality]),
        "format": fmt,
        "classes": list(DEFAULT_CLASSES),
        "n_medium": N_MEDIUM,
        "cell_threshold_ri": RI_CELL_THRESHOLD,
        "class_totals": totals,
        "min_cells_per_class_per_patient": plan[0]["minimum"],
        "notes": (
            "sampled_fractions are each patient's drawn differential; counts (largest-remainder rounding of "
            "sampled_fractions * cells_per_patient, then every class lifted to min_cells_per_class_per_patient, "
            "taken from the largest classes) are the cells written, and fractions = counts / cells_per_patient "
            "is the true differential of the written cells. BALF monocytes are macrophage-like."
        ),
        "patients": [
            {
                "patient_id": pt["patient_id"],
                "sample_type": pt["sample_type"],
                "sampled_fractions": {c: _fmt(pt["sampled_fractions"][c]) for c in DEFAULT_CLASSES},
                "counts": {c: pt["counts"][c] for c in DEFAULT_CLASSES},
                "fractions": {c: _fmt(pt["counts"][c] / cells_per_patient) for c in DEFAULT_CLASSES},
                "acquisition": {k: _fmt(v) for k, v in vars(pt["acquisition"]).items()},
            }
            for pt in plan
        ],
    }
