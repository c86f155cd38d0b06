"""MLflow tracking: where runs go, what every run is tagged with, and the artifacts a run logs."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

# MLflow 3 rejects the old file store and the registry needs a database; Lightning's MLFlowLogger
# would default to file:./mlruns, so leuko always passes a URI.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "leuko"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the config's value, then a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri or DEFAULT_TRACKING_URI


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing (two processes may race to create it)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def log_batch(client, run_id: str, *, metrics: list | None = None, params: list | None = None) -> None:
    """MlflowClient.log_batch in chunks under the REST limits (1,000 metrics, 100 params per call)."""
    metrics, params = list(metrics or []), list(params or [])
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def git_commit(path: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def lineage_tags(prepared_dir: str | Path) -> dict[str, str]:
    """Tags that tie a run to the code and the exact data it saw (DVC data hash: see leuko.tracking.lineage)."""
    from leuko.tracking.lineage import data_version_tags

    meta_path = Path(prepared_dir) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {
        "leuko.git_commit": git_commit(),
        "leuko.manifest_sha256": str(meta.get("manifest_sha256", "unknown")),
        "leuko.prepared_fingerprint": str(meta.get("fingerprint", "unknown")),
        "leuko.prepared_dir": str(Path(prepared_dir).resolve()),
        **data_version_tags(meta.get("manifest_sha256")),
    }


def make_logger(
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> MLFlowLogger:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # The logger creates its run lazily and only on global rank 0, so DDP gives one run.
    return MLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=resolve_tracking_uri(tracking_uri),
        tags=tags,
        run_id=run_id,
        log_model=False,
    )


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    row_sums = matrix.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.1 * len(class_names) + 1.5))
    ax.imshow(matrix / row_sums, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if matrix[i, j] / row_sums[i, 0] > 0.5 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_confusion(logger: MLFlowLogger, matrix: np.ndarray, class_names: list[str], name: str) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, class_names, name.replace("_", " "))
    logger.experiment.log_figure(logger.run_id, fig, f"{name}.png")
    plt.close(fig)


def log_text(logger: MLFlowLogger, text: str, artifact_file: str) -> None:
    logger.experiment.log_text(logger.run_id, text, artifact_file)


def log_file(logger: MLFlowLogger, path: str | Path, artifact_path: str | None = None) -> None:
    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.lr": "0.001", ...}; MLflow params are flat strings of at most 6000 chars."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def config_params(config: dict) -> dict[str, str]:
    """A resolved LightningCLI config as flat MLflow params.

    Top-level scalars (seed_everything, ckpt_path) go under "cli." so they cannot clash with the
    model's hyperparameters that Lightning logs under their bare names.
    """
    nested = {k: v for k, v in config.items() if isinstance(v, dict)}
    nested["cli"] = {k: v for k, v in config.items() if not isinstance(v, dict) and k != "config"}
    return flatten(nested)


class TrackingCallback(L.Callback):
    """Logs the confusion matrix after fit and test, and the best checkpoint, to the run of an MLFlowLogger."""

    def __init__(self, log_checkpoint: bool = True):
        self.log_checkpoint = log_checkpoint

    def _logger(self, trainer: L.Trainer) -> MLFlowLogger | None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                return logger
        return None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Remembered so that `--ckpt_path last` after an interruption continues the same run.
        logger = self._logger(trainer)
        if logger is not None and trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            (root / "mlflow_run_id").write_text(logger.run_id)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        matrix = getattr(pl_module, "last_confusion", {}).get("val")
        if matrix is not None:
            log_confusion(logger, matrix.numpy(), pl_module.class_names, "confusion_matrix_val")
        ckpt = trainer.checkpoint_callback
        if self.log_checkpoint and ckpt is not None and ckpt.best_model_path:
            log_file(logger, ckpt.best_model_path, "checkpoints")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        matrix = getattr(pl_module, "last_confusion", {}).get("test")
        if logger is not None and trainer.is_global_zero and matrix is not None:
            log_confusion(logger, matrix.numpy(), pl_module.class_names, "confusion_matrix_test")


def write_temp_and_log(logger: MLFlowLogger, name: str, write) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        write(path)
        log_file(logger, path)
