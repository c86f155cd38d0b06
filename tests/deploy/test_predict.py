"""`leuko predict --model`: a registered model on volume files, in a fresh process with only the registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers.sweep import env_with, registered_model
from leuko.cli.app import _wants_model, main
from leuko.deploy.intensity import LEVELS, out_of_distribution, training_intensities
from leuko.deploy.predict import PredictError, differential, find_cells, predict


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_prepared):
    return registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)


def test_predict_routes_model_uris_to_the_registry_and_yaml_to_lightning():
    assert _wants_model(["--model", "models:/leuko@champion", "--input", "x"])
    assert _wants_model(["--input", "x", "--model=runs:/abc/model"])
    assert not _wants_model(["--config", "c.yaml", "--model", "conf/model/vit3d_tiny.yaml"])
    assert not _wants_model(["--config", "c.yaml", "--model.net", "vit3d_tiny"])


def test_find_cells_in_folders_and_manifests(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/c1.npy", "a/b/c2.nii.gz", "a/b/notes.txt", "c3.tif"):
        (tmp_path / name).write_bytes(b"")
    cells, groups = find_cells(tmp_path)
    assert groups == ["folder"]
    assert list(cells["cell_id"]) == ["a/b/c2", "a/c1", "c3"]
    assert list(cells["folder"]) == ["a/b", "a", "."]
    manifest = tmp_path / "m.csv"
    manifest.write_text("cell_id,path,patient_id\nx,a/c1.npy,P1\n")
    cells, groups = find_cells(manifest)
    assert groups == ["patient_id"] and cells["path"][0] == str(tmp_path / "a" / "c1.npy")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p, "no volume files"),
        (lambda p: (p / "m.csv").write_text("cell_id,file\nx,y.npy\n") and p / "m.csv", "has no `path` column"),
    ],
)
def test_bad_inputs_say_what_to_give(tmp_path, setup, message):
    with pytest.raises(PredictError, match=message):
        find_cells(setup(tmp_path))


@pytest.mark.slow
def test_predict_in_a_fresh_process_matches_the_prepared_data(registry, tiny_cohort, tiny_prepared, tmp_path):
    out = tmp_path / "pred" / "predictions.csv"
    env = env_with(MLFLOW_TRACKING_URI=registry["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "leuko.cli",
            "predict",
            "--model",
            "models:/leuko@champion",
            "--input",
            str(tiny_cohort.parent),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predict:" in done.stderr  # the progress bar
    cells = pd.read_csv(out)
    manifest = pd.read_csv(tiny_cohort)
    assert sorted(cells["cell_id"]) == sorted(manifest["cell_id"])
    probs = cells.filter(like="prob_")
    assert list(probs.columns) == [f"prob_{c}" for c in ("neutrophil", "eosinophil", "lymphocyte", "monocyte")]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert not cells["out_of_distribution"].any()  # the held-out test cells too: the same kind of data

    diff = pd.read_csv(out.parent / "predictions_differential.csv")
    assert list(diff.columns[:3]) == ["patient_id", "sample_type", "n_cells"]
    assert diff["n_cells"].sum() == len(manifest)
    assert np.allclose(diff.filter(like="pred_").sum(axis=1), 100.0)
    assert np.allclose(diff.filter(like="ref_").sum(axis=1), 100.0)  # the manifest's labels

    # The same preprocessing as `leuko prepare`: the model on the prepared memmap gives the same probabilities.
    mlflow.set_tracking_uri(registry["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/leuko@champion")
    index = pd.read_csv(tiny_prepared / "index.csv")
    volumes = np.load(tiny_prepared / "volumes.npy", mmap_mode="r")
    expected = model.predict(np.asarray(volumes[index["row"].to_numpy()]), params={"preprocess": False})
    expected.index = index["cell_id"]
    got = cells.set_index("cell_id").loc[index["cell_id"], probs.columns]
    assert np.allclose(got.to_numpy(), expected[probs.columns].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_unreadable_volumes_are_reported_and_skipped(registry, tiny_cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    folder = tmp_path / "scans"
    for patient in ("P01", "P02"):
        (folder / patient).mkdir(parents=True)
        for src in sorted((tiny_cohort.parent / "volumes" / patient).iterdir())[:3]:
            (folder / patient / src.name).write_bytes(src.read_bytes())
    (folder / "P02" / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (folder / "P02" / "empty.npy").write_bytes(b"")
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--model", "models:/leuko@champion", "--input", str(folder), "--out", str(out), "--quiet"])
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped P02/broken" in err and "skipped P02/empty" in err
    cells = pd.read_csv(out)
    assert len(cells) == 6 and set(cells["folder"]) == {"P01", "P02"}
    skipped = pd.read_csv(tmp_path / "p_skipped.csv")
    assert sorted(skipped["cell_id"]) == ["P02/broken", "P02/empty"]
    assert skipped["reason"].str.contains("cannot be read|corrupt|empty", regex=True).all()
    diff = pd.read_csv(tmp_path / "p_differential.csv")
    assert list(diff["folder"]) == ["P01", "P02"] and list(diff["n_cells"]) == [3, 3]


@pytest.mark.slow
def test_unknown_model_names_the_store_and_the_fix(registry, tiny_cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    code = main(
        [
            "predict",
            "--model",
            "models:/nope@champion",
            "--input",
            str(tiny_cohort.parent),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    assert code == 1
    assert "set MLFLOW_TRACKING_URI" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- input checks
CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


def test_duplicate_cell_ids_are_an_error_that_names_them(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("cell_id,path\nc1,a.npy\nc2,b.npy\nc1,c.npy\nc3,d.npy\nc3,e.npy\n")
    with pytest.raises(PredictError, match=r"duplicate cell_id\(s\) c1 \(lines 2, 4\), c3 \(lines 5, 6\)"):
        find_cells(manifest)
    for name in ("x.npy", "x.nii.gz"):  # one cell id from two files of a folder
        (tmp_path / "scans" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "scans" / name).write_bytes(b"")
    with pytest.raises(PredictError, match=r"duplicate cell_id\(s\) x \(x.nii.gz, x.npy\)"):
        find_cells(tmp_path / "scans")


def test_a_header_only_manifest_says_so_and_points_to_no_unwritten_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("cell_id,path,patient_id\n")
    with pytest.raises(PredictError, match="no cell rows") as info:
        predict("models:/leuko@champion", manifest, tmp_path / "p.csv")
    assert "skipped" not in str(info.value) and not list(tmp_path.glob("p*.csv"))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any model was looked up


def _cells(labels, patients, sample_types, preds):
    return pd.DataFrame({"patient_id": patients, "sample_type": sample_types, "label": labels, "pred_label": preds})


def test_the_differential_lists_only_the_samples_that_occur():
    cells = _cells(["x"] * 4, ["P1", "P1", "P2", "P2"], ["blood", "blood", "BALF", "BALF"], CLASSES[:2] * 2)
    table = differential(cells.drop(columns="label"), CLASSES, ["patient_id", "sample_type"])
    assert table[["patient_id", "sample_type"]].values.tolist() == [["P1", "blood"], ["P2", "BALF"]]
    assert list(table["n_cells"]) == [2, 2] and np.allclose(table.filter(like="pred_").sum(axis=1), 100.0)


def test_an_unknown_label_keeps_the_reference_of_the_known_classes_and_is_named(capsys):
    labels = ["neutrophil", "basophil", "lymphocyte", "neutrophil", "", "monocyte"]
    cells = _cells(labels, ["P1"] * 3 + ["P2"] * 3, ["blood"] * 6, ["neutrophil"] * 6)
    table = differential(cells, CLASSES, ["patient_id", "sample_type"]).set_index("patient_id")
    assert "basophil" in capsys.readouterr().err
    ref = [f"ref_{c}" for c in CLASSES]
    # P1: 3 labelled cells, one of them a basophil; P2: 2 labelled cells (one has no label)
    assert table.loc["P1", ref].tolist() == pytest.approx([100 / 3, 0, 100 / 3, 0])
    assert table.loc["P1", "ref_other"] == pytest.approx(100 / 3)
    assert table.loc["P2", ref].tolist() == pytest.approx([50, 0, 0, 50]) and table.loc["P2", "ref_other"] == 0
    assert table.loc["P1", "n_cells"] == 3 and table.loc["P1", "pred_neutrophil"] == 100


@pytest.fixture(scope="module")
def thg_cells(tmp_path_factory):
    """8 one-channel THG intensity volumes (phantoms): a folder, with a manifest whose modality is hhg."""
    from leuko.data.io import read_volume
    from leuko.data.phantoms import make_cohort

    root = tmp_path_factory.mktemp("thg")
    source = make_cohort(
        root / "hhg", n_patients=2, cells_per_patient=4, shape=(16, 16, 16), modality="hhg", progress=False
    )
    table = pd.read_csv(source)
    folder = root / "thg"
    folder.mkdir()
    for cell_id, path in zip(table["cell_id"], table["path"]):
        np.save(folder / f"{cell_id}.npy", read_volume(source.parent / path)[:1])  # (1, D, H, W) THG
    table["path"] = [f"{c}.npy" for c in table["cell_id"]]
    table.to_csv(folder / "manifest_hhg.csv", index=False)
    return folder


@pytest.mark.slow
def test_a_modality_mismatch_is_refused_naming_both(registry, thg_cells, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", "models:/leuko@champion", "--input", str(thg_cells / "manifest_hhg.csv")]
    assert main([*argv, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "modality hhg" in err and "trained on ri" in err and not out.exists()


def _mixed_folder(tmp_path, tiny_cohort, thg_cells, n_ri: int, n_thg: int):
    folder = tmp_path / "scans"
    folder.mkdir(parents=True)
    for src in sorted((tiny_cohort.parent / "volumes" / "P01").iterdir())[:n_ri]:
        (folder / src.name).write_bytes(src.read_bytes())
    for src in sorted(thg_cells.glob("*.npy"))[:n_thg]:
        (folder / f"thg_{src.name}").write_bytes(src.read_bytes())
    return folder


@pytest.mark.slow
def test_out_of_distribution_cells_are_flagged_and_a_mostly_foreign_input_refused(
    registry, tiny_cohort, thg_cells, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    model = ["predict", "--model", "models:/leuko@champion", "--quiet"]
    # a minority of foreign cells: predicted, and flagged
    few = _mixed_folder(tmp_path / "few", tiny_cohort, thg_cells, n_ri=6, n_thg=2)
    assert main([*model, "--input", str(few), "--out", str(tmp_path / "few.csv")]) == 0
    cells = pd.read_csv(tmp_path / "few.csv").set_index("cell_id")
    assert cells["out_of_distribution"].to_dict() == {c: c.startswith("thg_") for c in cells.index}
    assert "2 of 8 cells are out of the training data's intensity range" in capsys.readouterr().err
    # only foreign cells (no manifest to say the modality): refused, unless asked for
    thg = _mixed_folder(tmp_path / "all", tiny_cohort, thg_cells, n_ri=0, n_thg=8)
    assert main([*model, "--input", str(thg), "--out", str(tmp_path / "thg.csv")]) == 1
    err = capsys.readouterr().err
    assert "8 of 8 cells" in err and "--allow-out-of-distribution" in err and not (tmp_path / "thg.csv").exists()
    argv = [*model, "--input", str(thg), "--out", str(tmp_path / "thg.csv"), "--allow-out-of-distribution"]
    assert main(argv) == 0
    assert pd.read_csv(tmp_path / "thg.csv")["out_of_distribution"].all()


@pytest.mark.slow
def test_a_model_registered_before_the_checks_still_predicts(registry, tiny_cohort, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    mlflow.set_tracking_uri(registry["tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts("models:/leuko@champion", dst_path=str(tmp_path / "old")))
    config_path = folder / "artifacts" / "model_config.json"
    config = json.loads(config_path.read_text())
    config.pop("intensity")
    config_path.write_text(json.dumps(config))
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), "--input", str(tiny_cohort), "--out", str(out), "--quiet"]) == 0
    assert "out-of-distribution check is off" in capsys.readouterr().err
    cells = pd.read_csv(out)
    assert len(cells) == len(pd.read_csv(tiny_cohort)) and "out_of_distribution" not in cells.columns


class _PickledModel(mlflow.pyfunc.PythonModel):
    """A pyfunc model stored as a pickle; unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))

    def predict(self, context, model_input, params=None):
        return model_input


def test_a_model_stored_as_a_pickle_is_refused_without_unpickling(tmp_path, monkeypatch, tiny_cohort):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=_PickledModel(marker), pip_requirements=[])
    assert not marker.exists()  # saving only pickled it
    with pytest.raises(PredictError, match="pickle") as info:
        predict(str(tmp_path / "model"), tiny_cohort, tmp_path / "p.csv")
    assert str(tmp_path / "model") in str(info.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- the batched path
@pytest.fixture(scope="module")
def checked_model(tmp_path_factory, tiny_prepared):
    """A tiny untrained model folder whose config has an intensity range, a review threshold and training patients."""
    import json

    from helpers.model_folder import model_folder
    from leuko.deploy.trust import training_patients

    folder = model_folder(tmp_path_factory.mktemp("checked"), temperature=1.3)
    path = folder / "artifacts" / "model_config.json"
    config = json.loads(path.read_text())
    config["intensity"] = training_intensities(tiny_prepared / "volumes.npy", np.arange(40))
    config["review"] = {"threshold": 1.2}
    config["training_patients"] = training_patients(["P01", "P04"])
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def mixed_manifest(tiny_cohort, thg_cells, tmp_path_factory):
    """The tiny cohort plus cells the batches must handle: larger fields, unreadable and foreign volumes."""
    from leuko.data.io import read_volume, write_volume

    folder = tmp_path_factory.mktemp("mixed")
    table = pd.read_csv(tiny_cohort)
    table["path"] = [str(tiny_cohort.parent / p) for p in table["path"]]
    extra = []
    for i, path in enumerate(table["path"][:7]):  # the same cells in a larger field of medium
        volume = np.pad(read_volume(path), ((0, 0), (3, 5), (0, 6), (4, 1)), constant_values=1.337)
        extra.append(("wide", i, write_volume(folder / f"wide{i}.npy", volume)))
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    extra.append(("broken", 0, folder / "broken.npy"))
    extra.append(("two", 0, write_volume(folder / "two.npy", np.concatenate([read_volume(table["path"][0])] * 2))))
    for i, path in enumerate(sorted(thg_cells.glob("*.npy"))[:3]):  # THG intensities through an RI model
        extra.append(("thg", i, path))
    rows = [dict(table.iloc[i % len(table)], cell_id=f"{kind}{i}", path=str(p)) for kind, i, p in extra]
    mixed = pd.concat([table.iloc[:25], pd.DataFrame(rows), table.iloc[25:]], ignore_index=True)
    mixed.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _plain_per_cell(folder, manifest, runtime):
    """What predict computes, one cell at a time: read, the model's own preprocess, np.quantile, the net on one cell."""
    from leuko.data.io import VolumeError, read_volume
    from leuko.deploy.predict import load_model

    _, impl = load_model(str(folder), runtime=runtime)
    cells, _ = find_cells(manifest)
    kept, windows, skipped = [], [], []
    for cell in cells.itertuples(index=False):
        try:
            windows.append(impl.preprocess(read_volume(cell.path), None))
            kept.append(cell.cell_id)
        except (VolumeError, ValueError, OSError):
            skipped.append(cell.cell_id)
    windows = np.stack(windows)  # (N, C, D, H, W)
    probs = np.concatenate([impl.predict_proba(windows[i : i + 1]) for i in range(len(windows))])
    quantiles = np.moveaxis(np.quantile(windows.reshape(len(windows), 1, -1), LEVELS, axis=-1), 0, -1)
    ood = [out_of_distribution(q, impl.config["intensity"]) != "" for q in quantiles]
    return kept, probs, ood, skipped, impl.classes


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_batches_on_worker_threads_give_the_plain_per_cell_predictions(
    checked_model, mixed_manifest, tmp_path, runtime, capsys
):
    kept, probs, ood, skipped, classes = _plain_per_cell(checked_model, mixed_manifest, runtime)
    assert len(kept) == 70 and skipped == ["broken0", "two0"] and sum(ood) == 3  # the THG cells
    for batch_size, workers in [(4, 3), (32, None)]:
        out = tmp_path / f"b{batch_size}" / "p.csv"
        result = predict(
            str(checked_model), mixed_manifest, out, batch_size=batch_size, workers=workers, runtime=runtime
        )
        assert result["runtime"] == ("pytorch" if runtime == "torch" else "onnxruntime")
        got = pd.read_csv(out)
        assert list(got["cell_id"]) == kept
        assert np.abs(got[[f"prob_{c}" for c in classes]].to_numpy() - probs).max() < 1e-5
        assert list(got["pred_label"]) == [classes[i] for i in probs.argmax(axis=1)]
        assert list(got["out_of_distribution"]) == ood
        assert got["seen_patient"].sum() == got["patient_id"].isin(["P01", "P04"]).sum() > 0
        assert list(got["review"]) == list(got["uncertainty"] > 1.2)
        assert list(pd.read_csv(tmp_path / f"b{batch_size}" / "p_skipped.csv")["cell_id"]) == skipped
        err = capsys.readouterr().err
        assert "skipped broken0: " in err and "skipped two0: " in err and "C=1" in err
        assert "predict: 72/72 cells (100%)" in err  # progress lines, as in a log


def test_workers_must_be_at_least_one(tmp_path):
    with pytest.raises(PredictError, match="--workers 0: must be at least 1"):
        predict("models:/leuko@champion", tmp_path, tmp_path / "p.csv", workers=0)
