"""`leuko export` and predict's ONNX Runtime path: the graph answers as PyTorch does, at any batch size."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.model_folder import CLASSES, model_folder
from leuko.cli.app import main
from leuko.deploy import export as export_module
from leuko.deploy.export import ExportError, export, real_cells
from leuko.deploy.onnx_model import INPUT, OUTPUT, PARITY, OnnxModel, cache_folder, cached, model_files
from leuko.deploy.predict import load_model, predict

TEMPERATURE = 1.7  # not 1, so that the graph must apply it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("onnx"), temperature=TEMPERATURE)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(export_module, "SECONDS", 0.2)  # the throughput timing: shorter than a user's


def test_the_graph_gives_pytorchs_calibrated_probabilities_at_two_batch_sizes(folder, tiny_cohort, tmp_path):
    out = tmp_path / "m.onnx"
    result = export(str(folder), out, source=tiny_cohort, n_cells=12, batch_size=5)
    assert result["parity"] < PARITY and result["n_cells"] == 12 and result["batch_sizes"] == [1, 5]
    assert result["onnxruntime_cells_per_s"] > 0 and result["torch_cells_per_s"] > 0

    _, impl = load_model(str(folder))
    cells = real_cells(impl, tiny_cohort, 12, None)  # (12, 1, 16, 16, 16) prepared tiny-cohort cells
    graph = OnnxModel(out, impl.config)
    expected = impl.predict_proba(cells)  # PyTorch, divided by the temperature
    for size in (3, 7):
        got = np.concatenate([graph.session.run([OUTPUT], {INPUT: cells[i : i + size]})[0] for i in range(0, 12, size)])
        assert got.shape == (12, len(CLASSES))
        assert np.abs(got - expected).max() < PARITY
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # the temperature is in the graph: softmax(logits / T), not softmax(logits)
        logits = impl.net(torch.from_numpy(cells))
    assert np.abs(got - (logits / TEMPERATURE).softmax(-1).numpy()).max() < PARITY
    assert np.abs(got - logits.softmax(-1).numpy()).max() > 10 * PARITY


def test_the_sidecar_holds_classes_preprocessing_input_shape_and_parity(folder, tmp_path):
    out = tmp_path / "deploy" / "leuko.onnx"
    result = export(str(folder), out, batch_size=4)  # no --input: the model's example cell and its mirrors
    meta = json.loads((tmp_path / "deploy" / "leuko.json").read_text())
    assert result["sidecar"] == tmp_path / "deploy" / "leuko.json"
    assert meta["classes"] == CLASSES and meta["format"] == "onnx"
    assert meta["input"]["name"] == INPUT and meta["input"]["shape"] == ["batch", 1, 16, 16, 16]
    assert meta["output"]["shape"] == ["batch", len(CLASSES)]
    assert meta["temperature"] == TEMPERATURE
    config = json.loads(model_files(folder)["model_config"].read_text())
    assert meta["preprocessing"] == config["preprocessing"]
    assert meta["parity"]["max_abs_difference"] < PARITY and meta["parity"]["n_cells"] == 8  # the cell, 7 mirrors
    assert meta["parity"]["cells"] == "the model's example cell and its mirror images"
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_export_refuses_an_unknown_format_and_an_unwritable_out(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(folder), "--format", "tflite", "--out", str(tmp_path / "m.onnx")])
    assert info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", "--model", str(folder), "--out", str(blocker / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "cannot write there" in err and str(blocker / "m.onnx") in err
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.txt")]) == 1
    assert "ending in .onnx" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--format"):
        export(str(folder), tmp_path / "m.onnx", fmt="tflite")
    assert not list(tmp_path.glob("*.onnx"))


def test_predict_with_onnx_runtime_writes_what_pytorch_writes_and_caches_the_graph(folder, tiny_cohort, tmp_path):
    by_torch = predict(str(folder), tiny_cohort, tmp_path / "torch.csv", runtime="torch", progress=False)
    first = predict(str(folder), tiny_cohort, tmp_path / "onnx.csv", runtime="onnx", progress=False)
    assert by_torch["runtime"] == "pytorch" and first["runtime"] == "onnxruntime"
    assert cached(folder) is not None  # written on the first run, after its parity check
    again = predict(str(folder), tiny_cohort, tmp_path / "again.csv", runtime="auto", batch_size=7, progress=False)
    assert again["runtime"] == "onnxruntime"
    torch_table = pd.read_csv(tmp_path / "torch.csv")
    for name in ("onnx.csv", "again.csv"):
        table = pd.read_csv(tmp_path / name)
        assert list(table.columns) == list(torch_table.columns)
        probs = [c for c in table.columns if c.startswith("prob_")]
        assert np.abs(table[probs].to_numpy() - torch_table[probs].to_numpy()).max() < PARITY
        assert (table["pred_label"] == torch_table["pred_label"]).all()


def test_the_cache_key_follows_the_weights_and_the_config(folder, tmp_path):
    files = model_files(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert cache_folder(model_files(copy)) == cache_folder(files)
    config_path = model_files(copy)["model_config"]
    config = json.loads(config_path.read_text())
    config["calibration"]["temperature"] = 2.5
    config_path.write_text(json.dumps(config))
    assert cache_folder(model_files(copy)) != cache_folder(files)
    assert model_files(tmp_path) is None  # no MLmodel: not a leuko model folder
