"""A fit killed mid-epoch and resumed with --ckpt_path last ends with the weights of an uninterrupted fit,
with MLflow tracking off and on (on: the resume continues the killed fit's MLflow run)."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

HERE = Path(__file__).resolve().parents[1]  # tests/: the helpers package lives there
# 3 training batches per epoch on the tiny cohort: step 4 is inside the second epoch, after the first last.ckpt.
KILL = '{"class_path": "helpers.kill_at_step.KillAtStep", "init_args": {"step": 4}}'


def fit(config, root, *extra, env=None):
    """`leuko fit` in a subprocess, in root's parent folder (which holds a tracked run's ./mlruns artifacts)."""
    cmd = [
        sys.executable,
        "-m",
        "leuko.cli",
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_epochs",
        "3",
        *extra,
    ]
    env = {**(env or os.environ), "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=Path(root).parent, env=env, capture_output=True, text=True, timeout=600)


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


@pytest.fixture(scope="module")
def uninterrupted(module_tiny_config, tmp_path_factory):
    """last.ckpt of a 3-epoch fit that nothing interrupted."""
    root = tmp_path_factory.mktemp("whole")
    whole = fit(module_tiny_config, root, "--tracking.enabled", "false")
    assert whole.returncode == 0, whole.stderr[-3000:]
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_killed_fit_resumes_to_the_same_weights(module_tiny_config, uninterrupted, tmp_path):
    untracked = ("--tracking.enabled", "false")
    killed = fit(module_tiny_config, tmp_path / "cut", f"--trainer.callbacks+={KILL}", *untracked)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(module_tiny_config, tmp_path / "cut", "--ckpt_path", "last", *untracked)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(uninterrupted, tmp_path / "cut/checkpoints/last.ckpt")


@pytest.mark.slow
def test_killed_tracked_fit_resumes_its_mlflow_run(module_tiny_config, uninterrupted, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    tracked = ("--tracking.experiment", "resume")
    killed = fit(module_tiny_config, tmp_path / "cut", f"--trainer.callbacks+={KILL}", *tracked, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(module_tiny_config, tmp_path / "cut", "--ckpt_path", "last", *tracked, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(uninterrupted, tmp_path / "cut/checkpoints/last.ckpt")

    # one run, continued by the resume and finished by it: nothing left FAILED or RUNNING
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert (tmp_path / "cut" / "mlflow_run_id").read_text().strip() == run.info.run_id
    assert run.data.params["cli.ckpt_path"] == "None"  # what the fit started with; params never change
    assert run.data.tags["leuko.resume.cli.ckpt_path"] == "last"  # how it was resumed
    # epoch 0 validated before the kill, epochs 1 and 2 after the resume: one value per epoch in one run
    assert len(client.get_metric_history(run.info.run_id, "val/balanced_accuracy")) == 3
