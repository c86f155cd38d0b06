"""Serving a registered model over REST, and a team MLflow server that a sweep logs and registers to."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import mlflow
import numpy as np
import pytest

from helpers.sweep import BIN, REPO, env_with, free_port, registered_model, stop, wait_http, write_base, write_space
from leuko.cli import main
from leuko.data.io import read_volume


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_prepared):
    return registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_with_class_probabilities(registry, tiny_cohort, tiny_prepared, tmp_path):
    port = free_port()
    env = env_with(MLFLOW_TRACKING_URI=registry["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/leuko@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        paths = sorted((tiny_cohort.parent / "volumes" / "P01").iterdir())[:2]
        raw = np.stack([read_volume(p) for p in paths])  # (2, 1, 16, 16, 16) absolute refractive index
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": raw.tolist()})["predictions"]
        assert len(answer) == 2
        classes = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]
        for row in answer:
            probs = [row[f"prob_{c}"] for c in classes]
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)
            assert row["pred_label"] == classes[int(np.argmax(probs))]
        # the same answer as the library on the same volumes
        mlflow.set_tracking_uri(registry["tracking_uri"])
        local = mlflow.pyfunc.load_model("models:/leuko@champion").predict(raw)
        assert np.allclose(
            [[r[f"prob_{c}"] for c in classes] for r in answer], local[[f"prob_{c}" for c in classes]], atol=1e-5
        )
        # volumes already prepared (normalised, cropped) go in with preprocess=false
        prepared = np.asarray(np.load(tiny_prepared / "volumes.npy", mmap_mode="r")[:2])
        answer = _post(
            f"http://127.0.0.1:{port}/invocations", {"inputs": prepared.tolist(), "params": {"preprocess": False}}
        )
        local = mlflow.pyfunc.load_model("models:/leuko@champion").predict(prepared, params={"preprocess": False})
        assert np.allclose(
            [[r[f"prob_{c}"] for c in classes] for r in answer["predictions"]],
            local[[f"prob_{c}" for c in classes]],
            atol=1e-5,
        )
    finally:
        stop(server)
    assert server.returncode is not None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_make_mlflow_server_takes_a_sweep_and_a_registration_over_http(tiny_prepared, tmp_path, monkeypatch):
    port = free_port()
    db = tmp_path / "server" / "mlflow.db"
    artifacts = tmp_path / "server" / "artifacts"
    server = subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "-o",
            ".venv/.installed",
            "mlflow-server",
            f"BIN={BIN}",
            f"MLFLOW_PORT={port}",
            f"MLFLOW_BACKEND=sqlite:///{db}",
            f"MLFLOW_ARTIFACTS={artifacts}",
        ],
        env=env_with(),
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", server, timeout=180)
        base = write_base(tmp_path, tiny_prepared)
        space = write_space(
            tmp_path,
            base,
            study="remote",
            trials=1,
            fixed={"tracking.experiment": "t_remote", "trainer.log_every_n_steps": 50},
        )
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)
        assert main(["sweep", "--space", str(space)]) == 0
        assert main(["register", "--space", str(space), "--name", "leuko-remote"]) == 0
        client = mlflow.MlflowClient(uri)
        version = client.get_model_version_by_alias("leuko-remote", "champion")
        assert version.tags["leuko.decision"].startswith("champion")
        exp = client.get_experiment_by_name("t_remote")
        runs = client.search_runs([exp.experiment_id])
        assert {"sweep-remote", "remote-trial000", "remote-trial000/fold_0"} <= {r.info.run_name for r in runs}
        assert db.is_file()
        # the server stores the artifacts (model files included) in its own folder, proxied over HTTP
        assert any(p.name == "weights.safetensors" for p in artifacts.rglob("*"))
    finally:
        stop(server)
