import csv
import json
from pathlib import Path

import numpy as np
import pytest

from leuko.data.io import read_volume
from leuko.data.optics import DEFAULT_CLASSES, N_MEDIUM, RI_CELL_THRESHOLD
from leuko.data.phantom_cells import Acquisition, Grid, render_cell
from leuko.data.phantoms import FORMATS, MANIFEST_COLUMNS, _patient_plan, make_cohort, voxel_size_for

SMALL = dict(n_patients=4, cells_per_patient=6, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ri_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("ri") / "cohort", **SMALL)


def test_same_arguments_give_byte_identical_output(ri_cohort, tmp_path):
    again = make_cohort(tmp_path / "again", **SMALL)
    first, second = _files(ri_cohort.parent), _files(again.parent)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]


def test_other_seed_gives_other_cells(ri_cohort, tmp_path):
    other = make_cohort(tmp_path / "other", **SMALL, seed=1)
    a, b = _rows(ri_cohort), _rows(other)
    assert np.load(ri_cohort.parent / a[0]["path"]).tobytes() != np.load(other.parent / b[0]["path"]).tobytes()


def test_manifest_columns_and_relative_paths(ri_cohort):
    with open(ri_cohort, newline="") as f:
        assert tuple(next(csv.reader(f))) == MANIFEST_COLUMNS
    rows = _rows(ri_cohort)
    assert len(rows) == 4 * 6
    assert len({r["cell_id"] for r in rows}) == len(rows)
    for r in rows:
        assert not Path(r["path"]).is_absolute()
        assert (ri_cohort.parent / r["path"]).is_file()
        assert r["modality"] == "ri" and r["label"] in DEFAULT_CLASSES
        assert [float(r[f"voxel_size_{a}"]) for a in "zyx"] == [0.5, 0.5, 0.5]


def test_cohort_json_matches_manifest(ri_cohort):
    cohort = json.loads((ri_cohort.parent / "cohort.json").read_text())
    rows = _rows(ri_cohort)
    assert [p["sample_type"] for p in cohort["patients"]].count("BALF") == 2  # half of 4 patients
    for patient in cohort["patients"]:
        mine = [r for r in rows if r["patient_id"] == patient["patient_id"]]
        assert {r["sample_type"] for r in mine} == {patient["sample_type"]}
        assert {c: sum(r["label"] == c for r in mine) for c in DEFAULT_CLASSES} == patient["counts"]
        assert patient["fractions"] == pytest.approx({c: n / 6 for c, n in patient["counts"].items()}, abs=1e-6)
        assert sum(patient["sampled_fractions"].values()) == pytest.approx(1.0)
    assert {r["label"] for r in rows} == set(DEFAULT_CLASSES)


def test_default_cohort_has_every_class_several_dozen_times():
    # the plan (labels, differentials) is cheap: no volumes are rendered
    plan = _patient_plan(0, 24, 60, "ri")
    totals = {c: sum(p["counts"][c] for p in plan) for c in DEFAULT_CLASSES}
    assert min(totals.values()) >= 48, totals
    assert all(p["minimum"] == 3 for p in plan)
    assert sorted(p["sample_type"] for p in plan) == ["BALF"] * 12 + ["blood"] * 12


def test_differentials_follow_sample_type():
    for p in _patient_plan(3, 40, 60, "ri"):
        f = p["sampled_fractions"]
        assert sum(p["counts"].values()) == 60
        if p["sample_type"] == "blood":
            assert 0.5 - 1e-9 <= f["neutrophil"] <= 0.7 + 1e-9
            assert 0.2 - 1e-9 <= f["lymphocyte"] <= 0.4 + 1e-9
            assert 0.02 <= f["monocyte"] <= 0.10 and 0.01 <= f["eosinophil"] <= 0.06
        else:
            assert f["monocyte"] == max(f.values())  # macrophage-dominated lavage


def test_ri_values_are_plausible(ri_cohort):
    for r in _rows(ri_cohort):
        v = np.load(ri_cohort.parent / r["path"])
        assert v.dtype == np.float32 and v.shape == (1, 32, 32, 32)
        corners = v[0, :4, :4, :4]
        assert abs(float(np.median(corners)) - N_MEDIUM) < 0.005, r["cell_id"]
        assert 1.36 <= float(v.max()) <= 1.42, (r["cell_id"], float(v.max()))
        assert 0.02 < float((v > RI_CELL_THRESHOLD).mean()) < 0.5  # a cell, and it fits the box


def test_hhg_has_thg_and_shg_channels(tmp_path):
    manifest = make_cohort(tmp_path / "hhg", n_patients=1, cells_per_patient=4, modality="hhg", progress=False)
    cohort = json.loads((tmp_path / "hhg" / "cohort.json").read_text())
    assert cohort["channels"] == ["thg", "shg"]
    for r in _rows(manifest):
        v = np.load(manifest.parent / r["path"])
        assert v.shape == (2, 32, 32, 32) and r["modality"] == "hhg"
        assert v[0].max() > 3 * v[1].max()  # THG strong, SHG weak


def test_cell_sizes_overlap_between_classes():
    # Ryu et al.: sizes overlap, so volume alone must not separate lymphocytes from monocytes
    grid = Grid((32, 32, 32), voxel_size_for((32, 32, 32)))
    acq = Acquisition(gain=1.0, offset=0.0, noise=0.001, blur_z_um=0.5, blur_xy_um=0.25)
    fl = {
        label: [
            float(
                (
                    render_cell(label, "blood", "ri", acq, grid, np.random.default_rng([9, i]))[0] > RI_CELL_THRESHOLD
                ).sum()
            )
            * 0.125
            for i in range(25)
        ]
        for label in ("lymphocyte", "monocyte")
    }
    assert np.median(fl["lymphocyte"]) < np.median(fl["monocyte"])
    assert max(fl["lymphocyte"]) > min(fl["monocyte"]), fl


def test_voxel_size_scales_with_shape(tmp_path):
    volumes = {}
    for shape in [(32, 32, 32), (48, 96, 96)]:
        manifest = make_cohort(
            tmp_path / "x".join(map(str, shape)), n_patients=1, cells_per_patient=2, shape=shape, progress=False
        )
        row = _rows(manifest)[0]
        voxel = [float(row[f"voxel_size_{a}"]) for a in "zyx"]
        assert voxel == pytest.approx([16 / s for s in shape], abs=1e-6)
        v = np.load(manifest.parent / row["path"])
        assert v.shape == (1, *shape)
        volumes[shape] = float((v > RI_CELL_THRESHOLD).sum() * np.prod(voxel))
    # the same cell, measured in um^3, whatever the sampling
    assert volumes[(48, 96, 96)] == pytest.approx(volumes[(32, 32, 32)], rel=0.15)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back(tmp_path, fmt):
    reference = make_cohort(tmp_path / "npy", n_patients=1, cells_per_patient=2, progress=False)
    manifest = make_cohort(tmp_path / fmt, n_patients=1, cells_per_patient=2, fmt=fmt, progress=False)
    for ref, row in zip(_rows(reference), _rows(manifest)):
        assert row["path"].endswith(f".{fmt}")
        v = read_volume(manifest.parent / row["path"])
        np.testing.assert_array_equal(v, np.load(reference.parent / ref["path"]))


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    make_cohort(tmp_path / "quiet", n_patients=1, cells_per_patient=1, progress=False)
    assert capsys.readouterr().err == ""
    make_cohort(tmp_path / "loud", n_patients=1, cells_per_patient=1, progress=True)
    captured = capsys.readouterr()
    assert "cell" in captured.err and captured.out == ""


def test_rerun_replaces_a_cohort_but_not_other_folders(tmp_path):
    make_cohort(tmp_path / "c", n_patients=2, cells_per_patient=2, progress=False)
    make_cohort(tmp_path / "c", n_patients=1, cells_per_patient=1, progress=False)
    assert len(list((tmp_path / "c" / "volumes").rglob("*.npy"))) == 1  # no cells left over from the first run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        make_cohort(tmp_path / "mine", n_patients=1, cells_per_patient=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modality="ct"), r"modality='ct'.*ri, hhg"),
        (dict(fmt="png"), r"fmt='png'.*npy, tif, nii.gz, h5"),
        (dict(shape=(32, 32)), r"shape=\(32, 32\)"),
        (dict(shape=(8, 32, 32)), r"shape=.*>= 16"),
        (dict(shape=(32.5, 32, 32)), r"shape="),
        (dict(n_patients=0), r"n_patients=0"),
        (dict(cells_per_patient=-1), r"cells_per_patient=-1"),
        (dict(seed=-1), r"seed=-1"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_choices(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cohort(tmp_path / "bad", **{"progress": False, **kwargs})
    assert not (tmp_path / "bad").exists()
