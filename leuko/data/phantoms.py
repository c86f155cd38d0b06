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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from leuko.data.optics import DEFAULT_CLASSES
from leuko.data.io import write_volume

MODALITIES = ("ri", "hhg")
FORMATS = ("npy", "tif", "nii.gz", "h5")
SAMPLE_TYPES = ("BALF", "blood")
MANIFEST_COLUMNS = (
    "cell_id", "path", "label", "patient_id", "sample_type",
    "voxel_size_z", "voxel_size_y", "voxel_size_x", "modality",
)
CHANNELS = {"ri": ("ri",), "hhg": ("thg", "shg")}
GENERATOR = "leuko.data.phantoms"
GENERATOR_VERSION = 1  # bump whenever the same arguments would give different volumes

N_MEDIUM = 1.337  # culture medium / PBS, as in Ryu et al. 2021
CELL_THRESHOLD = 1.35  # voxels above this RI are "the cell" (Ryu et al. 2021)
# Edge of the field of view in um along every axis, whatever the shape: a 32^3 box gets 0.5 um voxels and
# holds the largest cells (BALF macrophages, ~12 um) with a margin; other shapes keep the cells filling the
# box the same way, with anisotropic voxels where the shape is anisotropic (48x96x96 -> 0.333 x 0.167 x 0.167 um).
FIELD_OF_VIEW_UM = 16.0
MIN_SIDE = 16  # below this a lobe or granule is smaller than a voxel
MIN_CLASS_FRACTION = 0.05  # per-patient minimum share of every class, see _cell_counts

# Cell volume (mean, sd) in fL = um^3. Lymphocyte pools Ryu's B and T cells; monocyte is Ryu's 423+-61;
# granulocytes (8-9 um diameter) sit in between; alveolar macrophages in BALF are larger and more variable.
CELL_VOLUME_FL = {
    "neutrophil": (340.0, 75.0),
    "eosinophil": (360.0, 75.0),
    "lymphocyte": (215.0, 50.0),
    "monocyte": (410.0, 80.0),
    "macrophage": (520.0, 110.0),
}
CELL_VOLUME_RANGE_FL = (110.0, 950.0)  # 950 fL = 12.2 um diameter still fits FIELD_OF_VIEW_UM


@dataclass(frozen=True)
class Acquisition:
    """Patient-level imaging effects; they make patient (batch) effects that a classifier must see through."""

    gain: float  # scales contrast to the medium (RI) or signal (HHG)
    offset: float  # background offset: RI units for ri, signal units for hhg
    noise: float  # white noise sd, same units as offset
    blur_z_um: float  # point-spread sd along z (missing cone / axial elongation)
    blur_xy_um: float  # point-spread sd in the focal plane


# ------------------------------------------------------------------ cohort layout


def _check_args(n_patients, cells_per_patient, shape, modality, fmt, seed) -> tuple[int, int, int]:
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is not supported; choose one of: {', '.join(MODALITIES)}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; choose one of: {', '.join(FORMATS)}")
    for name, value in (("n_patients", n_patients), ("cells_per_patient", cells_per_patient)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; give a whole number >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; give a whole number >= 0")
    try:
        dims = tuple(int(s) for s in shape)
        ok = len(dims) == 3 and all(d == s for d, s in zip(dims, shape)) and min(dims) >= MIN_SIDE
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
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
        return Acquisition(rng.uniform(0.85, 1.15), rng.normal(0.0, 0.0012), rng.uniform(0.0008, 0.002), blur_z, blur_xy)
    return Acquisition(rng.uniform(0.6, 1.4), rng.uniform(0.01, 0.06), rng.uniform(0.02, 0.05), blur_z, blur_xy)


# ------------------------------------------------------------------ geometry (points in um, cell frame)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3D rotation from a normalised Gaussian quaternion."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _sphere(q: np.ndarray, centre, radius: float) -> np.ndarray:
    """Signed distance (um, negative inside)."""
    return np.linalg.norm(q - np.asarray(centre), axis=-1) - radius


def _ellipsoid(q: np.ndarray, centre, axes) -> np.ndarray:
    """Approximate signed distance: exact on the smallest axis, good enough for partial-volume edges."""
    axes = np.asarray(axes)
    return (np.linalg.norm((q - np.asarray(centre)) / axes, axis=-1) - 1.0) * axes.min()


def _capsule(q: np.ndarray, a, b, radius: float) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    ab = b - a
    t = np.clip((q - a) @ ab / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(q - (a + t[..., None] * ab), axis=-1) - radius


def _wobble(rng: np.random.Generator, amplitude: float, n_waves: int = 5):
    """Low-frequency radial perturbation r(u) = 1 + sum_k a_k cos(pi f_k u.v_k + phi_k) on the unit sphere."""
    v = rng.standard_normal((n_waves, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    freq = rng.uniform(0.8, 2.5, n_waves)
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    amp = amplitude * rng.uniform(0.3, 1.0, n_waves) / math.sqrt(n_waves)

    def radius(u: np.ndarray) -> np.ndarray:
        return 1.0 + np.cos(np.pi * (u @ v.T) * freq + phase) @ amp

    return radius


class _Cell:
    """Membrane and nucleus of one cell as signed-distance functions of points in the cell frame (um)."""

    def __init__(self, label: str, sample_type: str, rng: np.random.Generator):
        key = "macrophage" if (label == "monocyte" and sample_type == "BALF") else label
        self.key = key
        mean, sd = CELL_VOLUME_FL[key]
        volume = float(np.clip(rng.normal(mean, sd), *CELL_VOLUME_RANGE_FL))
        self.R = R = (3 * volume / (4 * np.pi)) ** (1 / 3)
        stretch = np.exp(rng.normal(0.0, 0.07, 3))
        self.axes = R * stretch / np.prod(stretch) ** (1 / 3)
        # irregular membranes: ruffled macrophages and monocytes more than round lymphocytes
        wobble = {"lymphocyte": 0.10, "neutrophil": 0.16, "eosinophil": 0.14, "monocyte": 0.18, "macrophage": 0.24}
        self.membrane = _wobble(rng, wobble[key] * rng.uniform(0.5, 1.3))
        self.nucleus_parts: list = []  # (kind, args) unioned; "notch" parts are subtracted
        getattr(self, f"_nucleus_{'monocyte' if key == 'macrophage' else key}")(rng)

    # nuclei ------------------------------------------------------------------
    def _lobed(self, centres, radii, bridge: float) -> None:
        for c, r in zip(centres, radii):
            self.nucleus_parts.append(("sphere", (c, r)))
        for i in range(len(centres) - 1):
            self.nucleus_parts.append(("capsule", (centres[i], centres[i + 1], bridge * min(radii[i], radii[i + 1]))))

    def _nucleus_neutrophil(self, rng) -> None:
        # 3-5 lobes on a bent chain (horseshoe), connected by thin chromatin strands
        n = int(rng.choice([3, 4, 5], p=[0.4, 0.4, 0.2]))
        R = self.R
        arc = R * rng.uniform(0.4, 0.52)
        span = np.deg2rad(rng.uniform(150, 260))
        theta = rng.uniform(0, 2 * np.pi) + np.linspace(-span / 2, span / 2, n) + rng.normal(0, 0.12, n)
        centres = np.stack([arc * np.cos(theta), arc * np.sin(theta), rng.normal(0, 0.12 * R, n)], axis=1)
        # more lobes, smaller lobes: the nucleus keeps ~15-20 % of the cell volume
        radii = R * rng.uniform(0.27, 0.33, n) * (4 / n) ** 0.33
        self._lobed(centres, radii, bridge=rng.uniform(0.3, 0.45))

    def _nucleus_eosinophil(self, rng) -> None:
        # bilobed ("spectacle") nucleus
        R = self.R
        d = R * rng.uniform(0.3, 0.42)
        bend = rng.normal(0, 0.12 * R)
        centres = np.array([[-d, bend, 0.0], [d, bend, 0.0]]) + rng.normal(0, 0.05 * R, (2, 3))
        radii = R * rng.uniform(0.27, 0.34, 2)
        self._lobed(centres, radii, bridge=rng.uniform(0.3, 0.45))

    def _nucleus_lymphocyte(self, rng) -> None:
        # round nucleus filling most of the cell, slightly eccentric
        R = self.R
        axes = R * rng.uniform(0.7, 0.84) * np.exp(rng.normal(0, 0.05, 3))
        self.nucleus_parts.append(("ellipsoid", (rng.normal(0, 0.06 * R, 3), axes)))

    def _nucleus_monocyte(self, rng) -> None:
        # kidney-shaped: an off-centre ellipsoid with a spherical notch carved into its concave side
        R = self.R
        centre = np.array([R * rng.uniform(0.08, 0.2), 0.0, 0.0])
        axes = R * np.array([rng.uniform(0.36, 0.46), rng.uniform(0.52, 0.64), rng.uniform(0.38, 0.5)])
        self.nucleus_parts.append(("ellipsoid", (centre, axes)))
        notch_r = R * rng.uniform(0.28, 0.38)
        notch_c = centre + np.array([-axes[0] - notch_r * rng.uniform(0.25, 0.55), rng.normal(0, 0.05 * R), 0.0])
        self.nucleus_parts.append(("notch", (notch_c, notch_r)))

    # signed distances ----------------------------------------------------------
    def membrane_sd(self, q: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(q, axis=-1, keepdims=True)
        u = q / np.maximum(norm, 1e-9)
        rho = np.linalg.norm(q / self.axes, axis=-1)
        return (rho - self.membrane(u)) * self.axes.min()

    def nucleus_sd(self, q: np.ndarray) -> np.ndarray:
        sd = np.full(q.shape[:-1], np.inf)
        notch = None
        for kind, args in self.nucleus_parts:
            if kind == "notch":
                notch = -_sphere(q, *args)
                continue
            sd = np.minimum(sd, {"sphere": _sphere, "ellipsoid": _ellipsoid, "capsule": _capsule}[kind](q, *args))
        return sd if notch is None else np.maximum(sd, notch)


# ------------------------------------------------------------------ rendering


# Per class: cytoplasm RI (mean, sd), nucleus contrast over cytoplasm (mean, sd), granules
# (count per 100 fL of cytoplasm, peak RI contrast, sd in um), chromatin texture amplitude.
# RI levels: cytoplasm ~1.36, nucleus ~1.37, eosinophil granules ~1.38-1.39 (Ryu et al. 2021 ranges);
# the class means overlap on purpose so mean RI alone does not separate the classes.
CLASS_OPTICS = {
    "neutrophil": dict(cyto=(1.3595, 0.002), nuc=(0.0095, 0.002), granules=(25, 0.006, 0.3), chromatin=0.003),
    "eosinophil": dict(cyto=(1.3578, 0.002), nuc=(0.0095, 0.002), granules=(38, 0.022, 0.32), chromatin=0.003),
    "lymphocyte": dict(cyto=(1.3585, 0.002), nuc=(0.0085, 0.002), granules=(2, 0.006, 0.3), chromatin=0.004),
    "monocyte": dict(cyto=(1.3595, 0.002), nuc=(0.0075, 0.002), granules=(8, 0.006, 0.3), chromatin=0.002),
    "macrophage": dict(cyto=(1.3595, 0.002), nuc=(0.0075, 0.002), granules=(6, 0.006, 0.3), chromatin=0.002),
}
LIPID_RI = 1.392  # lipid droplets image well above cytoplasm; kept below 1.42 with gain and noise
VACUOLE_RI = 1.342  # fluid-filled, close to the medium


def _inside(sd: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume fraction: 1 inside, 0 outside, a linear ramp one voxel wide across the surface."""
    return np.clip(0.5 - sd / edge, 0.0, 1.0)


def _sample_in(rng, n: int, R: float, ok) -> np.ndarray:
    """n points uniform in a ball of radius R (cell frame) that satisfy ok(points); fewer if rare."""
    out = []
    for _ in range(8):
        p = rng.uniform(-R, R, (max(4 * n, 16), 3))
        p = p[(np.linalg.norm(p, axis=1) < R)]
        out.append(p[ok(p)])
        if sum(len(o) for o in out) >= n:
            break
    return np.concatenate(out)[:n]


class _Grid:
    """Voxel-centre coordinates (um) of a (D, H, W) box, centred on the box centre."""

    def __init__(self, shape: tuple[int, int, int], voxel: tuple[float, float, float]):
        self.shape, self.voxel = shape, np.asarray(voxel)
        axes = [(np.arange(s) - (s - 1) / 2) * v for s, v in zip(shape, voxel)]
        self.points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)  # (N, 3) z, y, x
        self.edge = float(np.mean(voxel))

    def splat(self, positions_um: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Trilinear splat of point weights onto the grid, so sub-voxel positions survive any voxel size."""
        field = np.zeros(int(np.prod(self.shape)))
        idx = positions_um / self.voxel + (np.asarray(self.shape) - 1) / 2
        base = np.floor(idx).astype(int)
        frac = idx - base
        for corner in np.ndindex(2, 2, 2):
            c = base + corner
            w = weights * np.prod(np.where(corner, frac, 1 - frac), axis=1)
            keep = np.all((c >= 0) & (c < self.shape), axis=1)
            np.add.at(field, np.ravel_multi_index(c[keep].T, self.shape), w[keep])
        return field.reshape(self.shape)

    def gaussian(self, field: np.ndarray, sigma_um) -> np.ndarray:
        return ndimage.gaussian_filter(field, np.asarray(sigma_um) / self.voxel, mode="constant", truncate=3.0)


def _render_cell(label: str, sample_type: str, modality: str, acq: Acquisition, grid: _Grid,
                 rng: np.random.Generator) -> np.ndarray:
    """(C, D, H, W) float32 volume of one cell."""
    cell = _Cell(label, sample_type, rng)
    optics = CLASS_OPTICS[cell.key]
    rot = _rotation(rng)
    centre = rng.uniform(-0.6, 0.6, 3)
    q = (grid.points - centre) @ rot  # cell frame; points_grid = q @ rot.T + centre
    edge = grid.edge
    cell_sd = cell.membrane_sd(q)
    nuc_sd = np.maximum(cell.nucleus_sd(q), cell_sd)  # the nucleus never pokes through the membrane
    in_cell = _inside(cell_sd, edge).reshape(grid.shape)
    in_nuc = _inside(nuc_sd, edge).reshape(grid.shape)

    def cytoplasm_ok(margin: float):
        return lambda p: (cell.membrane_sd(p) < -margin) & (cell.nucleus_sd(p) > margin)

    # granules: point sources blurred to ~0.5-0.8 um blobs, count scales with cytoplasm volume
    n_per_100fl, amp, sigma = optics["granules"]
    cyto_fl = float((in_cell - in_nuc).sum() * np.prod(grid.voxel))
    n_gran = int(rng.poisson(n_per_100fl * cyto_fl / 100))
    pos = _sample_in(rng, n_gran, cell.R * 1.3, cytoplasm_ok(0.3))
    weights = amp * rng.uniform(0.6, 1.4, len(pos)) * (2 * np.pi) ** 1.5 * np.prod(sigma / grid.voxel)
    granules = grid.gaussian(grid.splat(pos @ rot.T + centre, weights), sigma)
    # packed granules saturate instead of stacking up: granule RI tops out near 1.39
    granules = 0.028 * np.tanh(granules / 0.028)

    # inclusions: blood monocytes carry the odd vacuole, BALF macrophages several vacuoles (near medium RI)
    # and lipid droplets (bright); (lo, hi) are radii in um for a 4.5 um cell radius, scaled with the cell
    vacuoles = np.zeros(grid.shape)
    lipids = np.zeros(grid.shape)
    if cell.key in ("macrophage", "monocyte"):
        n_vac = rng.poisson(3.0 if cell.key == "macrophage" else 0.7)
        n_lip = rng.poisson(4.0 if cell.key == "macrophage" else 0.3)
        for n, target, lo, hi in ((n_vac, vacuoles, 0.45, 1.1), (n_lip, lipids, 0.3, 0.6)):
            for c in _sample_in(rng, n, cell.R, cytoplasm_ok(hi)):
                target += _inside(_sphere(q, c, rng.uniform(lo, hi) * cell.R / 4.5), edge).reshape(grid.shape)
        np.clip(vacuoles, 0, 1, out=vacuoles)
        np.clip(lipids, 0, 1, out=lipids)

    # floors keep every cell above the 1.35 threshold and its nucleus visible at the lowest patient gain
    cyto_ri = max(1.3545, rng.normal(*optics["cyto"]))
    nuc_dn = max(0.006, rng.normal(*optics["nuc"]))
    texture = grid.gaussian(rng.standard_normal(grid.shape), 0.35)
    texture /= texture.std() + 1e-12
    cytoplasm = in_cell - in_nuc
    ri = (N_MEDIUM + in_cell * (cyto_ri - N_MEDIUM) + in_nuc * (nuc_dn + optics["chromatin"] * texture)
          + cytoplasm * (granules + 0.0012 * texture))
    ri += lipids * (LIPID_RI - ri) + vacuoles * (VACUOLE_RI - ri)

    gain = acq.gain * rng.normal(1.0, 0.03)  # small cell-to-cell drift on top of the patient's gain
    psf = (acq.blur_z_um, acq.blur_xy_um, acq.blur_xy_um)
    if modality == "ri":
        obs = N_MEDIUM + acq.offset + gain * grid.gaussian(ri - N_MEDIUM, psf)
        obs += acq.noise * rng.standard_normal(grid.shape)
        return obs[None].astype(np.float32)

    # HHG: THG comes from interfaces (membrane, nuclear envelope), granules and lipid bodies; it grows with
    # the square of the index step. SHG in leukocytes is weak; crystalline eosinophil granule cores add a little.
    smooth = grid.gaussian(ri - N_MEDIUM, 0.25)  # contrast to the medium: the box edge is no interface
    grad = np.linalg.norm(np.stack(np.gradient(smooth, *grid.voxel)), axis=0)  # RI per um
    thg = (grad / 0.03) ** 2 + 150 * granules ** 2 / 0.02 + 4.0 * lipids
    shg = 0.15 * in_cell + (4.0 * granules if cell.key == "eosinophil" else 0.0)
    out = []
    for signal, scale in ((thg, 1.0), (shg, 0.15)):
        s = gain * scale * grid.gaussian(signal, psf)
        # detector background plus shot-like noise that grows with the signal
        s = acq.offset * scale + s + acq.noise * np.sqrt(scale) * np.sqrt(1 + s) * rng.standard_normal(grid.shape)
        out.append(s)
    return np.stack(out).astype(np.float32)


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
        plan.append(dict(
            patient_index=p, patient_id=f"P{p + 1:0{width}d}", sample_type=sample_type,
            sampled_fractions=fractions, counts=counts, labels=labels, minimum=minimum,
            acquisition=_acquisition(modality, rng),
        ))
    return plan


def make_cohort(out_dir: str | Path, *, n_patients: int = 24, cells_per_patient: int = 60,
                shape: tuple[int, int, int] = (32, 32, 32), modality: str = "ri", fmt: str = "npy",
                seed: int = 0, progress: bool = True) -> Path:
    """Write a synthetic cohort (one volume per cell, manifest.csv, cohort.json) and return the manifest path.

    out_dir must be new, empty, or hold an earlier phantom cohort (which is replaced). The cohort is built
    in a temporary sibling folder and moved into place at the end, so an interrupted run leaves nothing half-done.
    """
    shape = _check_args(n_patients, cells_per_patient, shape, modality, fmt, seed)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"out_dir={str(out_dir)!r} is a file; give a folder path for the cohort")
        if any(out_dir.iterdir()) and not _is_phantom_cohort(out_dir):
            raise ValueError(
                f"out_dir={str(out_dir)!r} is not empty and holds no phantom cohort (cohort.json); "
                "choose a new or empty folder so nothing there is overwritten"
            )
    voxel = voxel_size_for(shape)
    grid = _Grid(shape, voxel)
    plan = _patient_plan(seed, n_patients, cells_per_patient, modality)
    cell_width = max(3, len(str(cells_per_patient)))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        rows = []
        bar = tqdm(total=n_patients * cells_per_patient, desc="phantom cells", unit="cell", disable=not progress)
        with bar:
            for pt in plan:
                folder = tmp / "volumes" / pt["patient_id"]
                folder.mkdir(parents=True)
                for c, label in enumerate(pt["labels"]):
                    rng = np.random.default_rng([seed, 2, pt["patient_index"], c])
                    volume = _render_cell(label, pt["sample_type"], modality, pt["acquisition"], grid, rng)
                    cell_id = f"{pt['patient_id']}_C{c + 1:0{cell_width}d}"
                    rel = f"volumes/{pt['patient_id']}/{cell_id}.{fmt}"
                    write_volume(tmp / rel, volume, voxel_size=voxel)
                    rows.append((cell_id, rel, label, pt["patient_id"], pt["sample_type"], *map(repr, voxel), modality))
                    bar.update(1)
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        cohort = _cohort_record(plan, n_patients, cells_per_patient, shape, voxel, modality, fmt, seed)
        (tmp / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"


def _is_phantom_cohort(folder: Path) -> bool:
    try:
        return json.loads((folder / "cohort.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
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
        "cell_threshold_ri": CELL_THRESHOLD,
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
