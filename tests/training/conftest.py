from __future__ import annotations

import textwrap

import pytest


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One SQLite MLflow store for the session (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tiny_prepared, tmp_path):
    """A complete experiment file for the tiny cohort: 2 folds, 2 epochs, no workers."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            model:
              net: fishnet3d_tiny
              lr: 0.003
              warmup_epochs: 0.5
            data:
              prepared_dir: {tiny_prepared}
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
        )
    )
    return path


@pytest.fixture
def experiment(request):
    return "t_" + request.node.name[:40]
