from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

TINY = """
seed_everything: 0
model:
  net: fishnet3d_tiny
  lr: 0.003
  warmup_epochs: 0.5
data:
  prepared_dir: {prepared}
  k: 2
  test_fraction: 0.2
  batch_size: 8
  num_workers: 0
  augment:
    elastic: 1.0
    noise: 0.05
    flip: 0.5
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
"""


def write_tiny_config(path: Path, prepared: Path) -> Path:
    path.write_text(textwrap.dedent(TINY).format(prepared=prepared))
    return path


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One SQLite MLflow store for the session (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tiny_prepared, tmp_path):
    """A complete experiment file for the tiny cohort: 2 folds, 2 epochs, no workers."""
    return write_tiny_config(tmp_path / "tiny.yaml", tiny_prepared)


@pytest.fixture(scope="module")
def module_tiny_config(tiny_prepared, tmp_path_factory):
    """tiny_config, written once for a test module whose tests share one fit."""
    return write_tiny_config(tmp_path_factory.mktemp("config") / "tiny.yaml", tiny_prepared)


@pytest.fixture
def experiment(request):
    return "t_" + request.node.name[:40]
