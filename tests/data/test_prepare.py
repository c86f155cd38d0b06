import os
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from helpers.cells import LABELS, N_MEDIUM, ri_cell, snapshot, write_cohort
from leuko.data.io import write_volume
from leuko.data.manifest import ManifestError
from leuko.data.prepare import prepare
from leuko.data.prepared import PrepareError, load_prepared
from leuko.data.preprocess import centre_crop_or_pad, process_cell, resample


def test_prepare_writes_memmap_index_and_meta(tmp_path):
    manifest = write_cohort(tmp_path / "raw")
    result = prepare(manifest, tmp_path / "prep", shape=(8, 12, 10), progress=False)
    assert (result.n_cells, result.n_skipped, result.up_to_date) == (6, 0, False)
    assert os.fspath(result) == str(tmp_path / "prep")

    volumes, index, meta = load_prepared(tmp_path / "prep")
    assert isinstance(volumes, np.memmap) and volumes.mode == "r"
    assert volumes.shape == (6, 1, 8, 12, 10) and volumes.dtype == np.float32
    assert index.columns.tolist() == [
        *("row", "cell_id", "label", "label_index", "patient_id", "sample_type"),
        *("voxel_size_z", "voxel_size_y", "voxel_size_x"),
    ]
    assert index["cell_id"].tolist() == [f"c{i}" for i in range(6)]
    assert index["label_index"].tolist() == [0, 1, 2, 3, 0, 1]
    assert index["voxel_size_z"].tolist() == [0.5] * 6
    assert meta["shape"] == [8, 12, 10] and meta["channels"] == 1 and meta["n_cells"] == 6
    assert meta["voxel_size"] == {"resampled_to": None, "manifest_values": [[0.5, 0.2, 0.2]]}
    assert meta["classes"] == list(LABELS) and meta["modality"] == "ri"
    assert meta["normalisation"]["n_medium"] == N_MEDIUM and meta["normalisation"]["ri_scale"] == 0.01
    assert len(meta["manifest_sha256"]) == 64 and len(meta["fingerprint"]) == 64
    assert not (tmp_path / "prep" / "skipped.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_ri_normalisation_and_padding_with_the_medium():
    volume = ri_cell(shape=(6, 8, 10), centre=(3, 4, 5), radius=2)[None]
    window, clipped = process_cell(volume, (1, 1, 1), modality="ri", shape=(12, 12, 12))
    assert window.shape == (1, 12, 12, 12) and not clipped
    np.testing.assert_allclose(window.max(), (1.37 - 1.337) / 0.01, rtol=1e-5)  # 3.3
    assert window.min() == 0.0  # medium and padding both map to 0
    assert np.count_nonzero(window) == np.count_nonzero(volume > N_MEDIUM)  # nothing lost


def test_off_centre_cell_ends_up_centred():
    volume = ri_cell(shape=(30, 40, 36), centre=(6, 30, 9), radius=3)[None]
    window, _ = process_cell(volume, (1, 1, 1), modality="ri", shape=(16, 16, 16))
    centre = ndimage.center_of_mass(window[0] > 1)
    np.testing.assert_allclose(centre, (7.5, 7.5, 7.5), atol=0.51)
    assert np.count_nonzero(window > 1) == np.count_nonzero(volume > 1.35)


def test_crop_or_pad_fills_outside_voxels():
    volume = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    out = centre_crop_or_pad(volume, (0, 0, 0), (3, 3, 3), fill=np.array([-1, -2]))
    assert out[0, 0, 0, 0] == -1 and out[1, 0, 0, 0] == -2
    assert out[0, 1, 1, 1] == volume[0, 0, 0, 0] and out[1, 2, 2, 2] == volume[1, 1, 1, 1]


def test_hhg_scaling_is_robust_per_volume_and_channel(tmp_path):
    rng = np.random.default_rng(0)
    cells = {}
    for i in range(3):
        thg = rng.normal(100, 5, (16, 16, 16)) + 2000 * (ri_cell((16, 16, 16), (8, 8, 8), 4) > 1.35)
        shg = rng.normal(3, 0.1, (16, 16, 16)) + 40 * (ri_cell((16, 16, 16), (8, 7, 8), 3) > 1.35)
        cells[i] = np.stack([thg, shg * (i + 1)]).astype(np.float32)
    manifest = write_cohort(tmp_path / "raw", 3, volumes=cells, extra_columns=",modality")
    manifest.write_text(
        "\n".join(line + ("" if n == 0 else ",hhg") for n, line in enumerate(manifest.read_text().splitlines())) + "\n"
    )
    prepare(manifest, tmp_path / "prep", shape=(16, 16, 16), progress=False)
    volumes, _, meta = load_prepared(tmp_path / "prep")
    assert meta["modality"] == "hhg" and meta["channels"] == 2
    flat = np.asarray(volumes).reshape(3, 2, -1)
    np.testing.assert_allclose(np.median(flat, axis=2), 0, atol=1e-5)
    spread = np.percentile(flat, 99.5, axis=2) - np.percentile(flat, 0.5, axis=2)
    np.testing.assert_allclose(spread, 1, rtol=1e-3)  # the same for every cell and channel: no cross-cell statistic


def test_resample_to_a_target_voxel_size(tmp_path):
    assert resample(np.ones((2, 10, 40, 40), np.float32), (1.0, 0.25, 0.25), (0.5, 0.5, 0.5)).shape == (2, 20, 20, 20)
    # A ball of radius 4 voxels at 0.2 um in-plane becomes radius 2 at 0.4 um.
    manifest = write_cohort(tmp_path / "raw", 2, voxel_size=(0.4, 0.2, 0.2))
    result = prepare(manifest, tmp_path / "prep", shape=(16, 16, 16), target_voxel_size=(0.4, 0.4, 0.4), progress=False)
    volumes, index, meta = load_prepared(result.out_dir)
    assert meta["voxel_size"]["resampled_to"] == [0.4, 0.4, 0.4]
    assert index[["voxel_size_z", "voxel_size_y", "voxel_size_x"]].values.tolist() == [[0.4, 0.4, 0.4]] * 2
    unresampled = process_cell(ri_cell(centre=(6, 9, 8))[None], (1, 1, 1), modality="ri", shape=(16, 16, 16))[0]
    ratio = np.count_nonzero(volumes[0] > 1) / np.count_nonzero(unresampled > 1)
    assert 0.15 < ratio < 0.35  # in-plane area shrinks by about 4


def _bad_manifest(folder):
    """Good cells plus one of every kind of bad row."""
    rows = [
        "c6,cells/nope.npy,neutrophil,p0,blood,0.5,0.2,0.2",  # line 8: missing file
        "c7,cells/trunc.npy,basophil,p1,blood,0.5,0.2,0.2",  # line 9: unknown label
        "c8,cells/trunc.npy,neutrophil,p1,blood,0.5,0.2,0.2",  # line 10: truncated file
        "c9,cells/two.npy,neutrophil,p1,blood,0.5,0.2,0.2",  # line 11: two channels
        "c10,cells/nan.npy,neutrophil,p1,blood,0.5,0.2,0.2",  # line 12: NaN voxel
        "c11,cells/dri.npy,neutrophil,p1,blood,0.5,0.2,0.2",  # line 13: RI differences, not RI
    ]
    manifest = write_cohort(folder, 6, extra=rows)
    data = write_volume(folder / "cells" / "trunc.npy", ri_cell()).read_bytes()
    (folder / "cells" / "trunc.npy").write_bytes(data[: len(data) // 2])
    write_volume(folder / "cells" / "two.npy", np.stack([ri_cell(), ri_cell()]))
    nan = ri_cell()
    nan[1, 2, 3] = np.nan
    write_volume(folder / "cells" / "nan.npy", nan)
    write_volume(folder / "cells" / "dri.npy", ri_cell() - N_MEDIUM)
    return manifest


def test_reports_every_bad_cell_and_leaves_the_previous_output_intact(tmp_path):
    good = write_cohort(tmp_path / "raw", 6)
    prepare(good, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    before = snapshot(tmp_path / "prep")

    manifest = _bad_manifest(tmp_path / "raw")
    with pytest.raises(ManifestError) as info:
        prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    text = str(info.value)
    assert text.startswith(f"{manifest}: 6 problems:")
    assert f"line 8 (cell_id c6): file not found: {tmp_path / 'raw' / 'cells' / 'nope.npy'}" in text
    assert "line 9 (cell_id c7): label 'basophil' is not one of" in text
    assert "line 10 (cell_id c8): " + str(tmp_path / "raw" / "cells" / "trunc.npy") + ": cannot be read" in text
    assert "line 11 (cell_id c9): " in text and "two.npy has 2 channel(s) but 6 of the 7 readable cells have 1" in text
    assert "line 12 (cell_id c10): " in text and "has 1 NaN and 0 Inf voxels" in text
    assert "line 13 (cell_id c11): " in text and "does not look like a refractive index" in text
    assert "pass --skip-bad to leave them out" in text and "Nothing was written" in text

    assert snapshot(tmp_path / "prep") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep", "raw"]  # no temp folders left


def test_fails_without_output_when_nothing_existed(tmp_path):
    with pytest.raises(ManifestError):
        prepare(_bad_manifest(tmp_path / "raw"), tmp_path / "prep", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_skip_bad_keeps_the_good_cells_and_lists_the_rest(tmp_path):
    manifest = _bad_manifest(tmp_path / "raw")
    result = prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), skip_bad=True, progress=False)
    assert (result.n_cells, result.n_skipped) == (6, 6)
    volumes, index, meta = load_prepared(tmp_path / "prep")
    assert volumes.shape == (6, 1, 8, 8, 8) and index["row"].tolist() == list(range(6))
    assert index["cell_id"].tolist() == [f"c{i}" for i in range(6)]
    assert meta["n_skipped"] == 6
    skipped = pd.read_csv(tmp_path / "prep" / "skipped.csv")
    assert skipped.columns.tolist() == ["cell_id", "line", "reason"]
    assert skipped["line"].tolist() == [8, 9, 10, 11, 12, 13]
    assert skipped["reason"].str.contains("file not found").iloc[0]
    # The compacted array holds the same values as a run on the good cells alone.
    good = write_cohort(tmp_path / "raw2", 6)
    prepare(good, tmp_path / "prep2", shape=(8, 8, 8), progress=False)
    np.testing.assert_array_equal(volumes, load_prepared(tmp_path / "prep2")[0])


def test_skip_bad_still_stops_on_problems_of_the_whole_file(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("cell_id,path,label\nc1,a.npy,neutrophil\n")
    with pytest.raises(ManifestError, match="line 1: missing required column"):
        prepare(manifest, tmp_path / "prep", skip_bad=True, progress=False)


def test_second_run_with_unchanged_inputs_does_nothing(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 4)
    prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    stamp = (tmp_path / "prep" / "volumes.npy").stat().st_mtime_ns
    again = prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert again.up_to_date and again.n_cells == 4
    assert (tmp_path / "prep" / "volumes.npy").stat().st_mtime_ns == stamp

    assert not prepare(manifest, tmp_path / "prep", shape=(8, 8, 10), progress=False).up_to_date  # settings changed
    os.utime(tmp_path / "raw" / "cells" / "c0.npy", ns=(1, 1))  # a volume changed
    assert not prepare(manifest, tmp_path / "prep", shape=(8, 8, 10), progress=False).up_to_date
    assert prepare(manifest, tmp_path / "prep", shape=(8, 8, 10), progress=False).up_to_date


def test_output_bytes_are_deterministic(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 4)
    prepare(manifest, tmp_path / "a", shape=(8, 8, 8), progress=False)
    prepare(manifest, tmp_path / "b", shape=(8, 8, 8), progress=False)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_classes_none_uses_the_labels_found(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 3)
    manifest.write_text(manifest.read_text().replace("eosinophil", "basophil"))
    prepare(manifest, tmp_path / "prep", classes=None, shape=(8, 8, 8), progress=False)
    _, index, meta = load_prepared(tmp_path / "prep")
    assert meta["classes"] == ["basophil", "lymphocyte", "neutrophil"]
    assert index["label_index"].tolist() == [2, 0, 1]


def test_split_column_is_kept(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 2, extra_columns=",split")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1] + ",train", lines[2] + ",TEST"]) + "\n")
    prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert load_prepared(tmp_path / "prep")[1]["split"].tolist() == ["train", "test"]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(
        PrepareError, match=r"mine exists and is not a leuko prepared folder.*choose a new or empty folder"
    ):
        prepare(manifest, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_load_prepared_says_how_to_make_the_folder(tmp_path):
    with pytest.raises(
        PrepareError, match=r"folder not found.*run `leuko prepare --manifest MANIFEST --out .*nothing` first"
    ):
        load_prepared(tmp_path / "nothing")
    manifest = write_cohort(tmp_path / "raw", 2)
    prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    (tmp_path / "prep" / "index.csv").unlink()
    with pytest.raises(PrepareError, match=r"incomplete \(missing index\.csv\); run `leuko prepare"):
        load_prepared(tmp_path / "prep")


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    prepare(write_cohort(tmp_path / "raw", 2), tmp_path / "prep", shape=(8, 8, 8), progress=True)
    captured = capsys.readouterr()
    assert "prepare" in captured.err and captured.out == ""


def test_memory_stays_flat_while_streaming(tmp_path):
    n_cells, shape = 200, (32, 32, 32)
    folder = tmp_path / "raw"
    base = ri_cell(shape=(36, 36, 36), centre=(18, 18, 18), radius=6)
    manifest = write_cohort(folder, n_cells, volumes=dict.fromkeys(range(n_cells), base))
    total = n_cells * np.prod(shape) * 4  # bytes of the prepared array
    tracemalloc.start()
    try:
        prepare(manifest, tmp_path / "prep", shape=shape, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert load_prepared(tmp_path / "prep")[0].shape[0] == n_cells
    assert peak < total / 10, f"peak {peak / 1e6:.1f} MB while preparing {total / 1e6:.1f} MB"


def test_registered_models_still_find_process_cell_in_prepare():
    # the pyfunc_model.py stored with a registered model imports it from leuko.data.prepare
    import leuko.data.prepare

    assert leuko.data.prepare.process_cell is process_cell
    assert leuko.data.prepare.load_prepared is load_prepared


def _forged_npy(path):
    """An .npy whose header claims 10^12 float32 voxels (3.6 TiB) over 64 bytes of data."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10_000, 10_000, 10_000)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)


def test_a_forged_header_is_a_row_error_and_skip_bad_skips_it(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 4, extra=["c4,cells/forged.npy,neutrophil,p0,blood,0.5,0.2,0.2"])
    _forged_npy(tmp_path / "raw" / "cells" / "forged.npy")
    with pytest.raises(ManifestError, match=r"line 6 \(cell_id c4\): .*forged\.npy: .*claims .*TiB"):
        prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    result = prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), skip_bad=True, progress=False)
    assert (result.n_cells, result.n_skipped) == (4, 1)
    skipped = pd.read_csv(tmp_path / "prep" / "skipped.csv")
    assert skipped["cell_id"].tolist() == ["c4"] and "claims" in skipped["reason"].iloc[0]


def test_the_majority_sets_the_channels_not_the_first_cell(tmp_path):
    # a stray 2-channel file on the first row of a 1-channel cohort
    manifest = write_cohort(tmp_path / "raw", 6, volumes={0: np.stack([ri_cell(), ri_cell()])})
    result = prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), skip_bad=True, progress=False)
    assert (result.n_cells, result.n_skipped) == (5, 1)
    volumes, index, meta = load_prepared(tmp_path / "prep")
    assert meta["channels"] == 1 and volumes.shape == (5, 1, 8, 8, 8)
    assert index["cell_id"].tolist() == ["c1", "c2", "c3", "c4", "c5"] and index["row"].tolist() == list(range(5))
    reason = pd.read_csv(tmp_path / "prep" / "skipped.csv").set_index("cell_id").loc["c0", "reason"]
    assert "c0.npy has 2 channel(s) but 5 of the 6 readable cells have 1" in reason
    # the values match a run on the good cells alone
    good = write_cohort(tmp_path / "raw2", 6)
    prepare(good, tmp_path / "prep2", shape=(8, 8, 8), progress=False)
    np.testing.assert_array_equal(volumes, load_prepared(tmp_path / "prep2")[0][1:])

    with pytest.raises(ManifestError, match=r"(?s)1 problem:.*line 2 \(cell_id c0\): .*has 2 channel\(s\) but 5 of"):
        prepare(manifest, tmp_path / "prep3", shape=(8, 8, 8), progress=False)


def test_a_tie_in_channel_counts_is_an_error_even_with_skip_bad(tmp_path):
    two = np.stack([ri_cell(), ri_cell()])
    manifest = write_cohort(tmp_path / "raw", 4, volumes={0: two, 1: two})
    with pytest.raises(ManifestError, match=r"no majority: 2 cells have 1 channel\(s\) \(lines 4, 5\), 2 have 2"):
        prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), skip_bad=True, progress=False)
    assert not (tmp_path / "prep").exists()


def test_out_cannot_be_the_current_folder_or_hold_the_inputs(tmp_path, monkeypatch):
    manifest = write_cohort(tmp_path / "raw", 2)
    prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    before = snapshot(tmp_path / "prep")
    for cwd in (tmp_path / "prep", tmp_path / "prep" / "sub"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        out = "." if cwd.name == "prep" else ".."
        with pytest.raises(PrepareError, match=r"prep.* is the current folder or holds it; .*cd"):
            prepare(manifest, out, shape=(8, 8, 8), progress=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prep" / "sub").rmdir()
    assert snapshot(tmp_path / "prep") == before

    # inputs inside an earlier prepared folder: replacing it would delete them
    inner = write_cohort(tmp_path / "prep" / "raw", 2)
    with pytest.raises(PrepareError, match=r"prep holds the input .*manifest\.csv.*choose a folder outside"):
        prepare(inner, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert (tmp_path / "prep" / "raw" / "cells" / "c0.npy").is_file()
    with pytest.raises(PrepareError, match=r"holds the input"):
        prepare(manifest, tmp_path / "raw", shape=(8, 8, 8), progress=False)
