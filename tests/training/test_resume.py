"""A fit killed mid-epoch and resumed with --ckpt_path last ends with the weights of an uninterrupted fit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parents[1]  # tests/: the helpers package lives there


def fit(config, root, *extra, env=None):
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
        "--tracking.enabled",
        "false",
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_fit_resumes_to_the_same_weights(tiny_config, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    whole = fit(tiny_config, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    # 3 training batches per epoch on the tiny cohort: step 4 is inside the second epoch.
    kill = '{"class_path": "helpers.kill_at_step.KillAtStep", "init_args": {"step": 4}}'
    killed = fit(tiny_config, tmp_path / "cut", f"--trainer.callbacks+={kill}", env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(tiny_config, tmp_path / "cut", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "whole/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
