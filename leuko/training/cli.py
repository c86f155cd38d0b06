"""`leuko fit | validate | test | predict`: LightningCLI over VolumeClassifier and LeukoDataModule.

Config order: the YAML files given with --config, in order (defaults, then an experiment file), then
command-line overrides. Unknown keys are errors (jsonargparse). The resolved config is saved next to
the checkpoints and logged to the MLflow run.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO

from leuko.data.datamodule import LeukoDataModule
from leuko.data.progress import is_terminal
from leuko.errors import ConfigError
from leuko.params import COMMAND_SECTIONS
from leuko.tracking.lineage import lineage_tags
from leuko.tracking.runs import DEFAULT_EXPERIMENT, TrackingCallback, config_params, make_logger
from leuko.training import run_dir
from leuko.training.epoch_log import EpochLog
from leuko.training.module import VolumeClassifier
from leuko.training.predictions import predictions_frame

MONITOR = "val/balanced_accuracy"


class MLflowSaveConfig(SaveConfigCallback):
    """Writes config.yaml next to the checkpoints and logs it (file and flattened params) to MLflow."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        text = self.parser.dump(self.config, skip_none=False)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        (root / run_dir.CONFIG).write_text(text)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id"):
            logger.experiment.log_text(logger.run_id, text, run_dir.CONFIG)
            config = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
            logger.log_hyperparams(config_params(config))


class WeightsOnlyCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading every checkpoint (--ckpt_path, a fold's best) weights-only."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        where = {} if map_location is None else {"map_location": map_location}  # else Lightning's default: CPU
        with torch.serialization.safe_globals(list(run_dir.SAFE_GLOBALS)):
            try:
                return super().load_checkpoint(path, weights_only=True, **where)
            except pickle.UnpicklingError as exc:
                raise run_dir.unsafe_checkpoint(path, exc) from None


class CSVPredictionWriter(BasePredictionWriter):
    """Writes one row per cell: cell_id, predicted label, and a probability column per class."""

    def __init__(self, path: str | Path):
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        frame = predictions_frame(predictions, pl_module.class_names)
        gathered = trainer.strategy.all_gather_object(frame) if trainer.world_size > 1 else [frame]
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pd.concat(gathered).drop_duplicates("cell_id").to_csv(self.path, index=False)
            print(f"predictions for {sum(len(f) for f in gathered)} cells -> {self.path}", file=sys.stderr)


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence three Lightning messages a leuko user cannot act on; every other message and warning stays.

    - the tip to install litlogger for Lightning's cloud platform (leuko logs to MLflow), printed by every Trainer;
    - torch's FutureWarning about `isinstance(treespec, LeafSpec)`, raised by Lightning's own _pytree module;
    - LightningCLI's warning that args= was given beside a command line: `leuko cv`, a sweep's trial and the
      benchmarks build each fit's arguments on purpose, and `leuko fit` passes its own command line.
    """
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # rank_zero_info logs through the rank_zero logger of lightning.pytorch (or of lightning.fabric)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
            logger.addFilter(_DropLitLoggerTip())


class LeukoCLI(LightningCLI):
    def __init__(self, *args, parent_run_id: str | None = None, extra_tags: dict | None = None, **kwargs):
        quiet_lightning()
        self.parent_run_id = parent_run_id
        self.extra_tags = extra_tags or {}
        kwargs.setdefault("save_config_callback", MLflowSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "save_to_log_dir": False})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # VolumeClassifier.configure_optimizers owns the optimizer and schedule (sweepable as model.* keys).
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(VolumeClassifier, LeukoDataModule, *args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters (weights-only) before any trainer exists: a file
        # that needs unpickling is refused here by name, as WeightsOnlyCheckpointIO does later.
        try:
            with torch.serialization.safe_globals(list(run_dir.SAFE_GLOBALS)):
                super()._parse_ckpt_path()
        except pickle.UnpicklingError as exc:
            raise run_dir.unsafe_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), exc) from None

    def add_arguments_to_parser(self, parser) -> None:
        # The data decides channels and classes; a net built otherwise could not train on it.
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.shape", "model.input_shape", apply_on="instantiate")
        parser.add_argument(
            "--tracking.uri", type=str | None, default=None, help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)"
        )
        parser.add_argument(
            "--tracking.experiment", type=str, default=DEFAULT_EXPERIMENT, help="MLflow experiment name"
        )
        parser.add_argument("--tracking.run_name", type=str | None, default=None, help="MLflow run name")
        parser.add_argument("--tracking.enabled", type=bool, default=True, help="log to MLflow")
        parser.add_argument(
            "--monitor",
            type=str,
            default=MONITOR,
            help="validation metric that picks best.ckpt, highest wins (lowest for a loss): e.g. val/auroc",
        )
        parser.add_argument(
            "--predictions",
            type=str | None,
            default=None,
            help="predict: CSV to write (default <run dir>/predictions.csv)",
        )
        # params.yaml also holds the sections of commands outside LeukoCLI; each is checked by its own
        # command (`leuko prepare --params params.yaml`), so here they are accepted and left alone.
        for section in COMMAND_SECTIONS:
            parser.add_argument(
                f"--{section}", type=dict | None, default={}, help=f"read by `leuko {section} --params`; ignored here"
            )

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        tracking = config.get("tracking")
        root = Path(config["trainer"].get("default_root_dir") or "runs/fit")
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = init["trainer"].get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        callbacks = configured + list(kwargs.pop("callbacks", []) or [])
        has_checkpoint = any(isinstance(c, ModelCheckpoint) for c in configured)
        validates = config["data"].get("fold") is not None
        monitor = config.get("monitor") or MONITOR
        if validates and not monitor.startswith("val/"):
            raise ConfigError(
                f"monitor {monitor!r}: best.ckpt is picked on a validation metric; give one such as val/auroc, "
                "val/balanced_accuracy, val/macro_f1 or val/loss"
            )
        if not validates:  # a refit on every non-test cell: no validation score to stop on, so no early stop
            callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        if not has_checkpoint:
            callbacks += default_checkpoints(root / run_dir.CHECKPOINTS, validates=validates, monitor=monitor)
        callbacks.append(TrackingCallback())
        if self.subcommand in (None, "fit") and not any(isinstance(c, EpochLog) for c in callbacks):
            # None: `leuko cv` builds the CLI without a subcommand and fits each fold
            bar = config["trainer"].get("enable_progress_bar")
            if bar is False or (bar is None and not is_terminal(sys.stdout)):
                kwargs["enable_progress_bar"] = False  # a bar in a log shows nothing until the run ends
                callbacks.append(EpochLog(root.name))
        if self.subcommand == "predict":
            callbacks.append(CSVPredictionWriter(config.get("predictions") or root / run_dir.PREDICTIONS))
        if tracking.enabled and config["trainer"].get("logger") in (None, True):
            prepared = config["data"]["prepared_dir"]
            kwargs["logger"] = make_logger(
                experiment=tracking.experiment,
                run_name=tracking.run_name or root.name,
                tracking_uri=tracking.uri,
                tags={**lineage_tags(prepared), "leuko.command": self.subcommand or "cv", **self.extra_tags},
                parent_run_id=self.parent_run_id,
                run_id=_resumed_run_id(root, config) if self.subcommand == "fit" else None,
            )
        kwargs["callbacks"] = callbacks
        plugins = init["trainer"].get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a configured checkpoint I/O is kept
            kwargs["plugins"] = plugins + [WeightsOnlyCheckpointIO()]
        kwargs.setdefault("default_root_dir", str(root))
        return super().instantiate_trainer(**kwargs)


def default_checkpoints(dirpath: Path, *, validates: bool, monitor: str = MONITOR) -> list[ModelCheckpoint]:
    """best.ckpt (highest `monitor`, lowest for a loss) when there is a validation set, and last.ckpt every epoch.

    last.ckpt comes from its own callback: Lightning 2.6's save_last only writes when a top-k checkpoint
    was written in the same step, so a run whose score stopped improving would resume from a stale epoch.
    """
    # ModelCheckpoint adds the .ckpt suffix itself
    last_name, best_name = Path(run_dir.LAST).stem, Path(run_dir.BEST).stem
    last = ModelCheckpoint(
        dirpath=dirpath, filename=last_name, monitor=None, save_top_k=1, enable_version_counter=False
    )
    if not validates:
        return [last]
    best = ModelCheckpoint(
        dirpath=dirpath,
        filename=best_name,
        monitor=monitor,
        mode="min" if "loss" in monitor else "max",
        save_top_k=1,
        enable_version_counter=False,
    )
    return [best, last]


def _resumed_run_id(root: Path, config) -> str | None:
    """Resuming a fit (`--ckpt_path last`) continues the MLflow run of that fit."""
    return run_dir.read_run_id(root) if config.get("ckpt_path") else None


def run(argv: list[str]) -> None:
    """Entry for `leuko fit|validate|test|predict ...`."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # args=None when argv is the real command line: LightningCLI then reads sys.argv itself.
    LeukoCLI(args=None if argv == sys.argv[1:] else argv)
