"""One synthetic leukocyte: its membrane, nucleus, granules and inclusions, rendered as an RI or HHG volume.

leuko.data.phantoms lays out the cohort (patients, differentials, acquisitions) and calls render_cell for
every cell; everything here depends only on the arguments and the numpy Generator passed in.

Sizes and RI levels follow Ryu et al. 2021 (B cell 185+-35 fL, T cell 232+-30 fL, monocyte 423+-61 fL;
cytoplasm ~1.36, nucleus ~1.37, eosinophil granules ~1.38-1.39), with class means that overlap on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from leuko.data.optics import N_MEDIUM

# Cell volume (mean, sd) in fL = um^3. Lymphocyte pools Ryu's B and T cells; monocyte is Ryu's 423+-61;
# granulocytes (8-9 um diameter) sit in between; alveolar macrophages in BALF are larger and more variable.
CELL_VOLUME_FL = {
    "neutrophil": (340.0, 75.0),
    "eosinophil": (360.0, 75.0),
    "lymphocyte": (215.0, 50.0),
    "monocyte": (410.0, 80.0),
    "macrophage": (520.0, 110.0),
}
CELL_VOLUME_RANGE_FL = (110.0, 950.0)  # 950 fL = 12.2 um diameter still fits the 16 um field of view


@dataclass(frozen=True)
class Acquisition:
    """Patient-level imaging effects; they make patient (batch) effects that a classifier must see through."""

    gain: float  # scales contrast to the medium (RI) or signal (HHG)
    offset: float  # background offset: RI units for ri, signal units for hhg
    noise: float  # white noise sd, same units as offset
    blur_z_um: float  # point-spread sd along z (missing cone / axial elongation)
    blur_xy_um: float  # point-spread sd in the focal plane


# ------------------------------------------------------------------ geometry (points in um, cell frame)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3D rotation from a normalised Gaussian quaternion."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


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
    def in_cytoplasm(self, margin: float):
        """A test of points (N, 3): inside the membrane and outside the nucleus, each by margin um."""
        return lambda p: (self.membrane_sd(p) < -margin) & (self.nucleus_sd(p) > margin)

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


class Grid:
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


def render_cell(
    label: str, sample_type: str, modality: str, acq: Acquisition, grid: Grid, rng: np.random.Generator
) -> np.ndarray:
    """(C, D, H, W) float32 volume of one cell. The draws from rng follow a fixed order: keep it, or the
    same seed gives other cells (and bump phantoms.GENERATOR_VERSION)."""
    cell = _Cell(label, sample_type, rng)
    optics = CLASS_OPTICS[cell.key]
    rot = _rotation(rng)
    centre = rng.uniform(-0.6, 0.6, 3)
    q = (grid.points - centre) @ rot  # cell frame; points_grid = q @ rot.T + centre
    cell_sd = cell.membrane_sd(q)
    nuc_sd = np.maximum(cell.nucleus_sd(q), cell_sd)  # the nucleus never pokes through the membrane
    in_cell = _inside(cell_sd, grid.edge).reshape(grid.shape)
    in_nuc = _inside(nuc_sd, grid.edge).reshape(grid.shape)
    granules = _granules(cell, optics, in_cell - in_nuc, grid, rot, centre, rng)
    vacuoles, lipids = _inclusions(cell, q, grid, rng)

    # floors keep every cell above the 1.35 threshold and its nucleus visible at the lowest patient gain
    cyto_ri = max(1.3545, rng.normal(*optics["cyto"]))
    nuc_dn = max(0.006, rng.normal(*optics["nuc"]))
    texture = grid.gaussian(rng.standard_normal(grid.shape), 0.35)
    texture /= texture.std() + 1e-12
    cytoplasm = in_cell - in_nuc
    ri = (
        N_MEDIUM
        + in_cell * (cyto_ri - N_MEDIUM)
        + in_nuc * (nuc_dn + optics["chromatin"] * texture)
        + cytoplasm * (granules + 0.0012 * texture)
    )
    ri += lipids * (LIPID_RI - ri) + vacuoles * (VACUOLE_RI - ri)

    gain = acq.gain * rng.normal(1.0, 0.03)  # small cell-to-cell drift on top of the patient's gain
    psf = (acq.blur_z_um, acq.blur_xy_um, acq.blur_xy_um)
    if modality == "ri":
        obs = N_MEDIUM + acq.offset + gain * grid.gaussian(ri - N_MEDIUM, psf)
        obs += acq.noise * rng.standard_normal(grid.shape)
        return obs[None].astype(np.float32)
    shg_granules = granules if cell.key == "eosinophil" else None
    return _hhg(ri, in_cell, granules, lipids, shg_granules, gain=gain, psf=psf, acq=acq, grid=grid, rng=rng)


def _granules(cell: _Cell, optics: dict, cytoplasm: np.ndarray, grid: Grid, rot, centre, rng) -> np.ndarray:
    """(D, H, W) RI contrast of the granules: point sources blurred to ~0.5-0.8 um blobs, their count
    scaling with the cytoplasm volume."""
    n_per_100fl, amp, sigma = optics["granules"]
    cyto_fl = float(cytoplasm.sum() * np.prod(grid.voxel))
    n_gran = int(rng.poisson(n_per_100fl * cyto_fl / 100))
    pos = _sample_in(rng, n_gran, cell.R * 1.3, cell.in_cytoplasm(0.3))
    weights = amp * rng.uniform(0.6, 1.4, len(pos)) * (2 * np.pi) ** 1.5 * np.prod(sigma / grid.voxel)
    granules = grid.gaussian(grid.splat(pos @ rot.T + centre, weights), sigma)
    # packed granules saturate instead of stacking up: granule RI tops out near 1.39
    return 0.028 * np.tanh(granules / 0.028)


def _inclusions(cell: _Cell, q: np.ndarray, grid: Grid, rng) -> tuple[np.ndarray, np.ndarray]:
    """(vacuoles, lipid droplets), each a (D, H, W) fraction in [0, 1].

    Blood monocytes carry the odd vacuole, BALF macrophages several vacuoles (near medium RI) and lipid
    droplets (bright); (lo, hi) are radii in um for a 4.5 um cell radius, scaled with the cell."""
    vacuoles = np.zeros(grid.shape)
    lipids = np.zeros(grid.shape)
    if cell.key in ("macrophage", "monocyte"):
        n_vac = rng.poisson(3.0 if cell.key == "macrophage" else 0.7)
        n_lip = rng.poisson(4.0 if cell.key == "macrophage" else 0.3)
        for n, target, lo, hi in ((n_vac, vacuoles, 0.45, 1.1), (n_lip, lipids, 0.3, 0.6)):
            for c in _sample_in(rng, n, cell.R, cell.in_cytoplasm(hi)):
                target += _inside(_sphere(q, c, rng.uniform(lo, hi) * cell.R / 4.5), grid.edge).reshape(grid.shape)
        np.clip(vacuoles, 0, 1, out=vacuoles)
        np.clip(lipids, 0, 1, out=lipids)
    return vacuoles, lipids


def _hhg(ri, in_cell, granules, lipids, shg_granules, *, gain, psf, acq: Acquisition, grid: Grid, rng) -> np.ndarray:
    """(2, D, H, W) THG and SHG of a cell whose (D, H, W) RI is ri.

    THG comes from interfaces (membrane, nuclear envelope), granules and lipid bodies; it grows with the
    square of the index step. SHG in leukocytes is weak; crystalline eosinophil granule cores
    (shg_granules) add a little."""
    smooth = grid.gaussian(ri - N_MEDIUM, 0.25)  # contrast to the medium: the box edge is no interface
    grad = np.linalg.norm(np.stack(np.gradient(smooth, *grid.voxel)), axis=0)  # RI per um
    thg = (grad / 0.03) ** 2 + 150 * granules**2 / 0.02 + 4.0 * lipids
    shg = 0.15 * in_cell + (4.0 * shg_granules if shg_granules is not None else 0.0)
    out = []
    for signal, scale in ((thg, 1.0), (shg, 0.15)):
        s = gain * scale * grid.gaussian(signal, psf)
        # detector background plus shot-like noise that grows with the signal
        s = acq.offset * scale + s + acq.noise * np.sqrt(scale) * np.sqrt(1 + s) * rng.standard_normal(grid.shape)
        out.append(s)
    return np.stack(out).astype(np.float32)
