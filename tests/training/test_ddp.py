"""Real DDP: 2 CPU processes (gloo) train one model, shard the data, and log exactly one MLflow run."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from leuko.data.datamodule import LeukoDataModule

HERE = Path(__file__).resolve().parents[1]  # tests/: the helpers package lives there


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_config, tiny_prepared, tracking_uri, experiment, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "OMP_NUM_THREADS": "1",
    }
    record = '{"class_path": "helpers.record_cells.RecordCells", "init_args": {"out": "%s"}}' % (tmp_path / "cells")
    cmd = [
        sys.executable,
        "-m",
        "leuko.cli",
        "fit",
        "--config",
        str(tiny_config),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--tracking.experiment",
        experiment,
        f"--trainer.callbacks+={record}",
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # one epoch line from rank 0, though every rank reads the synced scores (rank 0 alone would deadlock)
    assert done.stderr.count("run: epoch 1/1  ") == 1, done.stderr[-4000:]

    # Each rank trained on its own shard; together they cover the training set.
    ranks = [set((tmp_path / "cells" / f"epoch0_rank{r}.txt").read_text().split()) for r in (0, 1)]
    train = set(LeukoDataModule(prepared_dir=str(tiny_prepared), k=2, num_workers=0).subset("train")["cell_id"])
    assert ranks[0] and ranks[1]
    assert ranks[0] | ranks[1] == train
    # DistributedSampler pads the shorter shard with at most one repeated cell per rank
    assert len(ranks[0] & ranks[1]) <= 1

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert "val/balanced_accuracy" in runs[0].data.metrics
    assert runs[0].data.params["trainer.strategy"] == "ddp"
