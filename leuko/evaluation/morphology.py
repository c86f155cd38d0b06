"""The six handcrafted cell features of the RI study (Ryu et al. 2021): cell volume, surface area,
sphericity, dry mass, protein density and mean refractive index (RI).

The cell is the largest connected group of voxels above an RI threshold (1.35; medium 1.337), so noise
specks and neighbouring debris do not count. Protein density follows the linear RI increment of protein,
C = (n - n_medium) / increment with increment = 0.2 mL/g, and dry mass is C integrated over the cell.

Units: 1 um^3 = 1 fL = 1e-12 mL, so C [g/mL] * V [um^3] = C * V * 1e-12 g = C * V pg.

HHG volumes (THG, SHG) carry no refractive index: their cell mask comes from a threshold on the THG
channel (0), and dry mass, protein density and mean RI are NaN. THG lights up interfaces (membrane,
nuclear envelope), so the thresholded THG is a shell: the largest one is closed by one voxel and its
inside filled, in 3D and plane by plane. The HHG cell volume is therefore the volume inside the outer
edge of the membrane signal, which the optical blur makes larger than the RI-threshold volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import measure

from leuko.data.io import read_volume
from leuko.data.manifest import read_manifest
from leuko.data.optics import DEFAULT_CLASSES, N_MEDIUM, RI_CELL_THRESHOLD, RI_INCREMENT_ML_PER_G
from leuko.data.progress import progress as progress_bar
from leuko.errors import LeukoError

# Without a THG threshold: background median + this many noise sds, where 1.4826 * MAD estimates the
# sd of the background that fills most of a single-cell field of view. The cell's own signal inflates
# that estimate, so 3 estimated sds already sit clear of the noise. A rough default: THG units depend
# on the instrument, so set hhg_threshold from a few volumes' histograms for real measurements.
HHG_NOISE_SDS = 3.0
# Gaussian sd, in voxels, that rounds the voxel staircase before marching cubes. Measured on digitised
# spheres and ellipsoids (semi-axes 4-45 voxels, isotropic and anisotropic voxels, off-grid centres):
# plain marching cubes on the binary mask overestimates the area by 7-11%; with sd 1 voxel and the
# volume-preserving iso-level the error is within +-1.5%, -2.4% for a 3-voxel radius and +3.3% for 4:1
# anisotropic voxels. Below ~4 voxels radius sphericity can come out slightly above 1.
SURFACE_SMOOTHING_VOXELS = 1.0


class FeatureError(LeukoError, ValueError):
    """Cells of a manifest whose features cannot be measured; the message lists each with its line and fix."""


FEATURES = ("volume_fl", "surface_area_um2", "sphericity", "dry_mass_pg", "protein_density_g_dl", "mean_ri")
FEATURE_TITLES = {  # (panel title, axis label with unit)
    "volume_fl": ("Cell volume", "volume (fL)"),
    "surface_area_um2": ("Surface area", "area (µm²)"),
    "sphericity": ("Sphericity", "sphericity (1 = sphere)"),
    "dry_mass_pg": ("Dry mass", "dry mass (pg)"),
    "protein_density_g_dl": ("Protein density", "protein density (g/dL)"),
    "mean_ri": ("Mean refractive index", "mean RI"),
}
MODALITIES = ("ri", "hhg")


def cell_features(
    volume: np.ndarray,
    voxel_size_um: Sequence[float],
    *,
    threshold: float = RI_CELL_THRESHOLD,
    n_medium: float = N_MEDIUM,
    increment: float = RI_INCREMENT_ML_PER_G,
    modality: str = "ri",
    hhg_threshold: float | None = None,
    surface_smoothing: float = SURFACE_SMOOTHING_VOXELS,
    name: str = "volume",
) -> dict[str, float]:
    """The six features of one cell.

    volume: RI as (D, H, W) or (1, D, H, W) for modality "ri"; (C, D, H, W) with THG in channel 0 (or a
    (D, H, W) THG volume) for "hhg". voxel_size_um: (z, y, x). hhg_threshold: THG intensity that counts
    as cell; None takes the background median + 3 noise sds (rough, see HHG_NOISE_SDS).
    surface_smoothing: Gaussian sd in voxels applied to the mask before marching cubes; 0 gives plain
    marching cubes on the binary mask (voxel staircase, ~+9% area).
    name: how errors refer to the cell (file name or cell_id).
    Raises ValueError naming the cell when no voxel is above the threshold.
    """
    voxel = _check_voxel_size(voxel_size_um, name)
    if modality not in MODALITIES:
        raise ValueError(f"{name}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    volume = np.asarray(volume)
    if modality == "ri":
        ri = _single_channel(volume, name)
        if not increment > 0:
            raise ValueError(f"{name}: increment must be positive (mL/g), got {increment}")
        mask = _largest_component(ri > threshold, name, f"RI threshold {threshold:g}", float(ri.max()))
    else:
        thg = volume if volume.ndim == 3 else _first_channel(volume, name)
        thg = thg.astype(np.float64)
        if hhg_threshold is None:
            hhg_threshold = _background_threshold(thg)
        shell = _largest_component(thg > hhg_threshold, name, f"THG threshold {hhg_threshold:g}", float(thg.max()))
        mask = _fill_shell(shell)

    voxel_volume = float(np.prod(voxel))  # um^3 = fL
    volume_fl = float(mask.sum()) * voxel_volume
    area = surface_area(mask, voxel, smoothing=surface_smoothing)
    sphericity = math.pi ** (1 / 3) * (6 * volume_fl) ** (2 / 3) / area

    if modality == "ri":
        n = ri[mask].astype(np.float64)
        density = (n - n_medium) / increment  # g/mL
        dry_mass_pg = float(density.sum()) * voxel_volume  # g/mL * um^3 = pg (see module docstring)
        protein_density_g_dl = float(density.mean()) * 100.0  # g/mL -> g/dL
        mean_ri = float(n.mean())
    else:
        dry_mass_pg = protein_density_g_dl = mean_ri = math.nan
    return {
        "volume_fl": volume_fl,
        "surface_area_um2": area,
        "sphericity": sphericity,
        "dry_mass_pg": dry_mass_pg,
        "protein_density_g_dl": protein_density_g_dl,
        "mean_ri": mean_ri,
    }


def surface_area(
    mask: np.ndarray, voxel_size_um: Sequence[float], *, smoothing: float = SURFACE_SMOOTHING_VOXELS
) -> float:
    """Area in um^2 of the closed marching-cubes surface around a (D, H, W) boolean mask.

    The mask is padded so the surface closes at the volume's edge. With smoothing > 0 the mask is blurred
    (sd in voxels) and the iso-level chosen so the blurred region keeps the mask's voxel count: blurring
    alone would pull the 0.5 level inwards on curved surfaces and shrink small cells.
    """
    pad = 2 + math.ceil(4 * smoothing)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    field = np.pad(mask[box], pad).astype(np.float32)
    level = 0.5
    if smoothing > 0:
        field = ndimage.gaussian_filter(field, smoothing, mode="constant")
        k = int(mask.sum())
        top = -np.partition(-field.ravel(), (k - 1, k))[k - 1 : k + 1]  # k-th and (k+1)-th largest
        level = float(top.mean())
    verts, faces, _, _ = measure.marching_cubes(field, level, spacing=tuple(float(v) for v in voxel_size_um))
    return float(measure.mesh_surface_area(verts, faces))


def features_table(
    manifest_path: str | Path,
    *,
    threshold: float = RI_CELL_THRESHOLD,
    n_medium: float = N_MEDIUM,
    increment: float = RI_INCREMENT_ML_PER_G,
    hhg_threshold: float | None = None,
    surface_smoothing: float = SURFACE_SMOOTHING_VOXELS,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per cell of a manifest: cell_id, patient_id, label, sample_type, modality and FEATURES.

    Every cell is measured before failing; a ValueError then lists each file that could not be measured.
    """
    cells = read_manifest(manifest_path, classes=None, check_files=True)
    rows, problems = [], []
    for cell in progress_bar(cells.itertuples(index=False), total=len(cells), desc="features", enabled=progress):
        voxel = (cell.voxel_size_z, cell.voxel_size_y, cell.voxel_size_x)
        try:
            volume = read_volume(cell.abs_path)  # (C, D, H, W)
            features = cell_features(
                volume,
                voxel,
                threshold=threshold,
                n_medium=n_medium,
                increment=increment,
                modality=cell.modality,
                hhg_threshold=hhg_threshold,
                surface_smoothing=surface_smoothing,
                name=cell.abs_path,
            )
        except ValueError as exc:  # VolumeError is a ValueError; both name the file
            problems.append(f"line {cell.line} (cell_id {cell.cell_id}): {exc}")
            continue
        rows.append(
            {
                "cell_id": cell.cell_id,
                "patient_id": cell.patient_id,
                "label": cell.label,
                "sample_type": cell.sample_type,
                "modality": cell.modality,
                **features,
            }
        )
    if problems:
        raise FeatureError(
            f"{manifest_path}: {len(problems)} of {len(cells)} cells could not be measured:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nFix or leave out these cells (or change the threshold) and run again."
        )
    return pd.DataFrame(rows, columns=["cell_id", "patient_id", "label", "sample_type", "modality", *FEATURES])


def feature_plot(table: pd.DataFrame, path: str | Path, *, classes: Sequence[str] | None = None) -> Path:
    """One panel per feature: its distribution per class (box plot with every cell as a jittered dot), as in
    Figure 2 of the RI study. classes: order on the x axis (default: DEFAULT_CLASSES order, then the rest sorted).
    Features that are all NaN (RI features of HHG cells) get an empty panel that says so."""
    # heavy import here: matplotlib takes half a second to load. No pyplot: no GUI backend, no global figure state
    from matplotlib.figure import Figure

    missing = [c for c in ("label", *FEATURES) if c not in table.columns]
    if missing:
        raise ValueError(f"feature table lacks column(s) {', '.join(missing)}; make it with features_table")
    if classes is None:
        present = set(table["label"])
        classes = [c for c in DEFAULT_CLASSES if c in present] + sorted(present - set(DEFAULT_CLASSES))
    rng = np.random.default_rng(0)  # fixed jitter: the same table gives the same picture
    fig = Figure(figsize=(4.2 * 3, 3.6 * 2), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, feature in zip(axes.ravel(), FEATURES):
        groups = [table.loc[table["label"] == c, feature].to_numpy(dtype=float) for c in classes]
        groups = [g[np.isfinite(g)] for g in groups]
        title, ylabel = FEATURE_TITLES[feature]
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if not any(len(g) for g in groups):
            ax.set_xticks(range(1, len(classes) + 1), classes, rotation=20)
            ax.set_xlim(0.5, len(classes) + 0.5)
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not available\n(no RI channel)", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.boxplot(
            groups, positions=range(1, len(classes) + 1), widths=0.6, showfliers=False, medianprops={"color": "black"}
        )
        for i, g in enumerate(groups, start=1):
            ax.plot(i + rng.uniform(-0.18, 0.18, len(g)), g, "o", ms=2.5, alpha=0.5, color=f"C{i - 1}")
        ax.set_xticks(range(1, len(classes) + 1), classes, rotation=20)  # after boxplot, which sets its own
    fig.suptitle(f"Handcrafted morphology features by class ({len(table)} cells)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _check_voxel_size(voxel_size_um: Sequence[float], name: str) -> np.ndarray:
    voxel = np.asarray(voxel_size_um, dtype=float)
    if voxel.shape != (3,) or not np.all(np.isfinite(voxel)) or not np.all(voxel > 0):
        raise ValueError(f"{name}: voxel size must be three positive numbers (z, y, x) in um, got {voxel_size_um!r}")
    return voxel


def _single_channel(volume: np.ndarray, name: str) -> np.ndarray:
    if volume.ndim == 4 and volume.shape[0] == 1:
        return volume[0]
    if volume.ndim == 3:
        return volume
    raise ValueError(
        f"{name}: an RI volume must be (D, H, W) or (1, D, H, W), got shape {volume.shape}; "
        "set modality to hhg for two-channel THG/SHG volumes"
    )


def _first_channel(volume: np.ndarray, name: str) -> np.ndarray:
    if volume.ndim != 4:
        raise ValueError(f"{name}: an HHG volume must be (C, D, H, W) with THG in channel 0, got shape {volume.shape}")
    return volume[0]


def _background_threshold(signal: np.ndarray) -> float:
    median = float(np.median(signal))
    noise_sd = 1.4826 * float(np.median(np.abs(signal - median)))
    return median + HHG_NOISE_SDS * noise_sd


def _fill_shell(shell: np.ndarray) -> np.ndarray:
    """The inside of a thresholded THG shell. One closing bridges one-voxel gaps; the per-plane fill then
    closes shells left open at the top and bottom, where THG from interfaces facing the axis is weakest."""
    closed = ndimage.binary_closing(np.pad(shell, 1), structure=np.ones((3, 3, 3), bool))[1:-1, 1:-1, 1:-1]
    filled = ndimage.binary_fill_holes(closed | shell)
    planes = np.stack([ndimage.binary_fill_holes(plane) for plane in filled])  # each z plane
    return ndimage.binary_fill_holes(planes)


def _largest_component(mask: np.ndarray, name: str, what: str, highest: float) -> np.ndarray:
    labels, n = ndimage.label(mask)  # face connectivity: specks touching only at an edge or corner stay apart
    if n == 0:
        raise ValueError(
            f"{name}: no voxel above the {what} (highest value {highest:.4g}), so there is no cell to measure; "
            "check that the volume holds absolute values (not a normalised copy) or lower the threshold"
        )
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1
