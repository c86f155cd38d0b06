"""MLflow runs: where they go (the tracking URI), the experiment, batched logging, the Lightning logger and
the callback that logs a fit's confusion matrices and best checkpoint, and the config as flat params.

What every run is tagged with (code and data lineage): leuko.tracking.lineage.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from leuko.tracking.figures import log_confusion
from leuko.tracking.uri import DEFAULT_TRACKING_URI, resolve_tracking_uri  # noqa: F401 (re-exported)
from leuko.training import run_dir

DEFAULT_EXPERIMENT = "leuko"


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing (two processes may race to create it)."""
    from mlflow.exceptions import MlflowException  # mlflow loads in seconds: only when a run is made

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


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, able to continue a run (`leuko fit --ckpt_path last` after an interruption).

    MLflow never changes a logged param. A param already logged keeps its value; one whose value differs
    in the resumed fit (cli.ckpt_path None -> last, a changed trainer setting) is recorded as the run tag
    leuko.resume.<key> with the new value, so the resume neither fails nor loses what it changed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged: dict[str, str] | None = None  # the run's params, read once

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param  # mlflow loads in seconds: only when a run is made

        # as MLFlowLogger.log_hyperparams: flat keys, values cut to 250 characters
        values = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        if self._logged is None:
            self._logged = dict(self.experiment.get_run(self.run_id).data.params)
        new = {k: v for k, v in values.items() if k not in self._logged}
        log_batch(self.experiment, self.run_id, params=[Param(k, v) for k, v in new.items()])
        self._logged.update(new)
        for key, value in values.items():
            if self._logged[key] != value:
                self.experiment.set_tag(self.run_id, f"leuko.resume.{key}", value)


def make_logger(
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> ResumableMLFlowLogger:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # The logger creates its run lazily and only on global rank 0, so DDP gives one run.
    return ResumableMLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=resolve_tracking_uri(tracking_uri),
        tags=tags,
        run_id=run_id,
        log_model=False,
    )


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
            run_dir.write_run_id(trainer.default_root_dir, logger.run_id)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        self._log_confusion(logger, pl_module, "val")
        ckpt = trainer.checkpoint_callback
        if self.log_checkpoint and ckpt is not None and ckpt.best_model_path:
            log_file(logger, ckpt.best_model_path, "checkpoints")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is not None and trainer.is_global_zero:
            self._log_confusion(logger, pl_module, "test")

    def _log_confusion(self, logger: MLFlowLogger, pl_module: L.LightningModule, stage: str) -> None:
        matrix = getattr(pl_module, "last_confusion", {}).get(stage)  # (K, K) counts of the last epoch
        if matrix is not None:
            name = f"confusion_matrix_{stage}"
            log_confusion(logger.experiment, logger.run_id, matrix.numpy(), pl_module.class_names, name)
