"""The cluster path on a real PostgreSQL server: `make mlflow-server` backed by it, a CV and a register through it."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from helpers.postgres import postgres_server
from helpers.sweep import BIN, REPO, env_with, free_port, stop, wait_http, write_base

pytestmark = pytest.mark.slow


@pytest.mark.timeout(500)
def test_mlflow_server_on_postgres_takes_a_cv_and_a_registration(tiny_prepared, tmp_path):
    port = free_port()
    artifacts = tmp_path / "artifacts"
    with postgres_server("mlflow") as backend, open(tmp_path / "server.log", "w") as log:
        make = ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", "mlflow-server"]
        make += [f"BIN={BIN}", f"MLFLOW_PORT={port}", f"MLFLOW_BACKEND={backend}", f"MLFLOW_ARTIFACTS={artifacts}"]
        server = subprocess.Popen(make, env=env_with(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{uri}/health", server, timeout=240)
            base = write_base(tmp_path, tiny_prepared)
            # as a user runs them: separate processes pointed at the server by the environment
            env = env_with(MLFLOW_TRACKING_URI=uri)
            experiment = ["--tracking.experiment", "t_postgres"]
            cv = ["cv", "--config", str(base), "--name", "pgcv", "--folds", "0", *experiment]
            register = ["register", "--config", str(base), "--name", "leuko-pg", "--out", str(tmp_path / "reg")]
            for args in (cv, register + experiment):
                done = subprocess.run(
                    [sys.executable, "-m", "leuko.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
                )
                assert done.returncode == 0, done.stderr[-3000:]
            client = mlflow.MlflowClient(uri, registry_uri=uri)
            runs = client.search_runs([client.get_experiment_by_name("t_postgres").experiment_id])
            names = {r.info.run_name: r.info.status for r in runs}
            assert names.get("pgcv") == "FINISHED" and names.get("pgcv/fold_0") == "FINISHED", names
            version = client.get_model_version_by_alias("leuko-pg", "champion")
            assert version.tags["leuko.decision"].startswith("champion")
            assert any(p.name == "weights.safetensors" for p in artifacts.rglob("*"))
        finally:
            stop(server)
        # the runs really are in the database, not in a local file store
        import sqlalchemy

        with sqlalchemy.create_engine(backend).connect() as conn:
            count = conn.execute(sqlalchemy.text("select count(*) from runs")).scalar()
        assert count >= 3
