"""`leuko predict --model`: a registered model on volume files, in a fresh process with only the registry."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers.sweep import env_with, registered_model
from leuko.cli.app import _wants_model, main
from leuko.deploy.predict import PredictError, find_cells


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
