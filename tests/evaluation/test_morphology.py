import csv
import math

import numpy as np
import pytest

from leuko.data.io import write_volume
from leuko.evaluation.morphology import FEATURES, cell_features, feature_plot, features_table

N_MEDIUM = 1.337
N_CELL = 1.37
VOXEL = (0.3, 0.2, 0.2)  # anisotropic, z coarser as in optical diffraction tomography


def _coords(shape, voxel, offset=(0.13, 0.07, -0.11)):
    """Voxel-centre coordinates in um, centred, shifted off the grid so no symmetry flatters the estimate."""
    axes = [(np.arange(n) - (n - 1) / 2) * v + o for n, v, o in zip(shape, voxel, offset)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(a, b, c, voxel=VOXEL, n_cell=N_CELL, margin=6):
    shape = [int(2 * max(a, b, c) / v) + 2 * margin for v in voxel]
    z, y, x = _coords(shape, voxel)
    inside = (z / a) ** 2 + (y / b) ** 2 + (x / c) ** 2 <= 1
    return np.where(inside, n_cell, N_MEDIUM).astype(np.float32)


def _knud_thomsen_area(a, b, c, p=1.6075):
    """Ellipsoid surface area, Knud Thomsen's approximation (relative error at most 1.061%)."""
    return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)


def _sphericity(volume, area):
    return math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area


def test_sphere_matches_analytic_values():
    r = 3.0
    f = cell_features(_ellipsoid(r, r, r), VOXEL)
    volume = 4 / 3 * math.pi * r**3
    density = (N_CELL - N_MEDIUM) / 0.2  # g/mL
    # measured: volume -0.4%, area +0.4%, sphericity 0.993
    assert f["volume_fl"] == pytest.approx(volume, rel=0.03)
    assert f["surface_area_um2"] == pytest.approx(4 * math.pi * r**2, rel=0.05)
    assert f["sphericity"] == pytest.approx(1.0, abs=0.05)
    assert f["dry_mass_pg"] == pytest.approx(density * volume, rel=0.03)
    assert f["protein_density_g_dl"] == pytest.approx(density * 100, rel=0.01)
    assert f["mean_ri"] == pytest.approx(N_CELL, rel=0.01)


def test_plain_marching_cubes_overestimates_area():
    # why surface_smoothing exists: the voxel staircase adds ~9% area (measured +9.4% here)
    r = 3.0
    smooth = cell_features(_ellipsoid(r, r, r), VOXEL)["surface_area_um2"]
    plain = cell_features(_ellipsoid(r, r, r), VOXEL, surface_smoothing=0)["surface_area_um2"]
    assert plain / (4 * math.pi * r**2) - 1 > 0.05
    assert abs(smooth / (4 * math.pi * r**2) - 1) < 0.02


def test_ellipsoid_volume_and_sphericity():
    a, b, c = 2.5, 3.0, 4.5
    f = cell_features(_ellipsoid(a, b, c), VOXEL)
    sphere = cell_features(_ellipsoid(3.0, 3.0, 3.0), VOXEL)
    volume = 4 / 3 * math.pi * a * b * c
    area = _knud_thomsen_area(a, b, c)
    # measured: volume +0.1%, area +0.6%, sphericity 0.951 vs analytic 0.956
    assert f["volume_fl"] == pytest.approx(volume, rel=0.03)
    assert f["surface_area_um2"] == pytest.approx(area, rel=0.05)
    assert f["sphericity"] < sphere["sphericity"]
    assert f["sphericity"] == pytest.approx(_sphericity(volume, area), rel=0.05)


def test_noise_speck_is_ignored():
    ri = _ellipsoid(3.0, 3.0, 3.0)
    clean = cell_features(ri, VOXEL)
    ri[1:3, 1:3, 1:3] = 1.40  # a bright speck in a corner, apart from the cell
    assert cell_features(ri, VOXEL) == pytest.approx(clean)


def test_accepts_single_channel_cdhw():
    ri = _ellipsoid(2.0, 2.0, 2.0)
    assert cell_features(ri[None], VOXEL) == pytest.approx(cell_features(ri, VOXEL))


def _thg_shell(r, w, noise_sd=0.0, voxel=VOXEL):
    """THG bright at the membrane: a Gaussian shell of radius r and width w um, plus an SHG channel."""
    shape = [int(2 * (r + 3 * w) / v) + 12 for v in voxel]
    z, y, x = _coords(shape, voxel)
    rho = np.sqrt(z**2 + y**2 + x**2)
    thg = np.exp(-(((rho - r) / w) ** 2)) + noise_sd * np.random.default_rng(0).standard_normal(shape)
    return np.stack([thg, 0.1 * (rho < r)]).astype(np.float32)


def test_hhg_uses_thg_threshold_and_fills_the_shell():
    r, w = 3.0, 0.4
    f = cell_features(_thg_shell(r, w), VOXEL, modality="hhg", hhg_threshold=0.5)
    outer = r + w * math.sqrt(math.log(2))  # where the shell falls to 0.5
    assert f["volume_fl"] == pytest.approx(4 / 3 * math.pi * outer**3, rel=0.03)
    assert f["surface_area_um2"] == pytest.approx(4 * math.pi * outer**2, rel=0.05)
    assert f["sphericity"] == pytest.approx(1.0, abs=0.05)
    assert all(math.isnan(f[k]) for k in ("dry_mass_pg", "protein_density_g_dl", "mean_ri"))


def test_hhg_default_threshold_sits_above_background_noise():
    r, w, noise = 3.0, 0.4, 0.01
    f = cell_features(_thg_shell(r, w, noise_sd=noise), VOXEL, modality="hhg")
    outer = r + w * math.sqrt(math.log(1 / (3 * noise)))  # threshold ~ 3 noise sds over a zero background
    assert f["volume_fl"] == pytest.approx(4 / 3 * math.pi * outer**3, rel=0.05)


def test_hhg_shell_open_at_the_poles_is_still_filled():
    # THG from interfaces facing the optical axis is weakest: cut the caps off the shell
    r, w = 3.0, 0.4
    volume = _thg_shell(r, w)
    z = _coords(volume.shape[1:], VOXEL)[0]
    volume[0][np.abs(z) > 0.8 * r] = 0.0
    f = cell_features(volume, VOXEL, modality="hhg", hhg_threshold=0.5)
    assert f["volume_fl"] > 0.7 * 4 / 3 * math.pi * r**3


def test_empty_mask_names_the_cell():
    ri = np.full((20, 20, 20), N_MEDIUM, np.float32)
    ri[5, 5, 5] = 1.345
    with pytest.raises(ValueError, match=r"cell_7: no voxel above the RI threshold 1\.35.*lower the threshold"):
        cell_features(ri, VOXEL, name="cell_7")


def test_bad_arguments_are_rejected():
    ri = _ellipsoid(2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="voxel size"):
        cell_features(ri, (0.2, 0.2))
    with pytest.raises(ValueError, match="modality 'oct'"):
        cell_features(ri, VOXEL, modality="oct")
    with pytest.raises(ValueError, match="set modality to hhg"):
        cell_features(np.stack([ri, ri]), VOXEL)


def _write_cohort(tmp_path, volumes, modality="ri"):
    rows = []
    for i, (label, volume) in enumerate(volumes):
        name = f"c{i}.npy"
        write_volume(tmp_path / name, volume)
        rows.append([f"c{i}", name, label, f"P{i % 2}", "blood", *VOXEL, modality])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "cell_id",
                "path",
                "label",
                "patient_id",
                "sample_type",
                "voxel_size_z",
                "voxel_size_y",
                "voxel_size_x",
                "modality",
            ]
        )
        w.writerows(rows)
    return manifest


def test_features_table_and_plot(tmp_path):
    manifest = _write_cohort(
        tmp_path,
        [
            ("lymphocyte", _ellipsoid(2.0, 2.0, 2.0)),
            ("monocyte", _ellipsoid(2.5, 3.0, 3.5)),
            ("lymphocyte", _ellipsoid(2.2, 2.0, 2.0, n_cell=1.365)),
        ],
    )
    table = features_table(manifest, progress=False)
    assert list(table.columns) == ["cell_id", "patient_id", "label", "sample_type", "modality", *FEATURES]
    assert list(table["cell_id"]) == ["c0", "c1", "c2"]
    assert (table["modality"] == "ri").all()
    assert table.loc[0, "volume_fl"] == pytest.approx(4 / 3 * math.pi * 8, rel=0.03)
    png = feature_plot(table, tmp_path / "features.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_table_hhg(tmp_path):
    manifest = _write_cohort(
        tmp_path, [("lymphocyte", _thg_shell(2.5, 0.4)), ("monocyte", _thg_shell(3.5, 0.4))], modality="hhg"
    )
    table = features_table(manifest, hhg_threshold=0.5, progress=False)
    assert (table["modality"] == "hhg").all()
    assert table.loc[1, "volume_fl"] > table.loc[0, "volume_fl"] > 0
    assert table[["dry_mass_pg", "protein_density_g_dl", "mean_ri"]].isna().all().all()
    assert feature_plot(table, tmp_path / "hhg.png").is_file()


def test_features_table_lists_every_cell_it_cannot_measure(tmp_path):
    blank = np.full((12, 12, 12), N_MEDIUM, np.float32)
    blank[0, 0, 0] = 1.34  # not constant (read_volume rejects that), but nothing above 1.35
    manifest = _write_cohort(
        tmp_path, [("lymphocyte", _ellipsoid(2.0, 2.0, 2.0)), ("monocyte", blank), ("monocyte", blank)]
    )
    with pytest.raises(ValueError) as info:
        features_table(manifest, progress=False)
    message = str(info.value)
    assert "2 of 3 cells could not be measured" in message
    assert "line 3 (cell_id c1)" in message and "c1.npy" in message
    assert "line 4 (cell_id c2)" in message and "c2.npy" in message
