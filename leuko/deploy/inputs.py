"""What a registered model takes: a raw volume, prepared exactly as `leuko prepare` prepared its training data.

Shared by the model's inference code (leuko.deploy.pyfunc_model), its ONNX Runtime twin
(leuko.deploy.onnx_model) and `leuko predict` (read_cells: many volume files at once), and free of torch so
that the latter two start without it. The settings come from the model's model_config.json: in_channels
and preprocessing {modality, shape, target_voxel_size, n_medium, ri_scale, read_options}.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import pandas as pd

from leuko.data.io import VolumeError, read_volume
from leuko.data.preprocess import STACK_BYTES, process_cell, process_cells
from leuko.deploy.decisions import class_bias, temperature
from leuko.training.predictions import probability_table

UNREADABLE = (VolumeError, ValueError, OSError)  # what read_cells reports for a cell instead of preparing it


def prepare_volume(config: dict, volume: np.ndarray, voxel_size: Sequence[float] | None = None) -> np.ndarray:
    """A raw (C, D, H, W) volume (or (D, H, W) for one channel) -> (C, *shape) float32.

    ValueError when the channel count is not the model's, or when the model resamples and voxel_size
    (z, y, x um) is missing."""
    window, _ = process_cell(_checked(config, volume, voxel_size), _size(voxel_size), **_settings(config))
    return window


def prepare_volumes(
    config: dict, volumes: Sequence[np.ndarray], voxel_sizes: Sequence[Sequence[float] | None]
) -> np.ndarray:
    """prepare_volume on each volume (ValueError as it gives for the first that fails): (B, C, *shape), equal
    to prepare_volume's windows, computed a stack of equal-shape volumes at a time."""
    checked = [_checked(config, v, s) for v, s in zip(volumes, voxel_sizes)]
    if not checked:
        return np.zeros((0, config["in_channels"], *config["preprocessing"]["shape"]), dtype=np.float32)
    windows, _ = process_cells(checked, [_size(s) for s in voxel_sizes], **_settings(config))
    return windows


def read_cells(
    config: dict, paths: Sequence[str], voxel_sizes: Sequence[Sequence[float] | None]
) -> tuple[np.ndarray, list[int], dict[int, Exception]]:
    """Read the volume files at paths and prepare them for this model: the (k, C, *shape) windows of the k
    cells that could be, their indexes in paths, and {index: the error} (one of UNREADABLE) of the others.

    Volumes are prepared a stack at a time (prepare_volumes), so at most about STACK_BYTES of raw voxels
    are held at once."""
    options = config["preprocessing"].get("read_options") or {}
    parts: list[np.ndarray] = []
    kept: list[int] = []
    errors: dict[int, Exception] = {}
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        try:
            parts.append(prepare_volumes(config, [v for _, v in pending], [voxel_sizes[i] for i, _ in pending]))
            kept.extend(i for i, _ in pending)
        except UNREADABLE:  # one cell the stack cannot take: find it, keep the others
            for i, volume in pending:
                try:
                    parts.append(prepare_volume(config, volume, voxel_sizes[i])[None])
                    kept.append(i)
                except UNREADABLE as exc:
                    errors[i] = exc
        pending.clear()

    held = 0  # bytes in pending
    for i, path in enumerate(paths):
        try:
            volume = _checked(config, read_volume(path, **options), voxel_sizes[i])
        except UNREADABLE as exc:
            errors[i] = exc
            continue
        pending.append((i, volume))
        held += volume.nbytes
        if held >= STACK_BYTES:
            flush()
            held = 0
    if pending:
        flush()
    windows = np.concatenate(parts) if parts else prepare_volumes(config, [], [])
    return windows, kept, dict(sorted(errors.items()))


def _checked(config: dict, volume: np.ndarray, voxel_size: Sequence[float] | None) -> np.ndarray:
    """volume as (C, D, H, W) float32; ValueError when this model cannot take it (prepare_volume)."""
    settings = config["preprocessing"]
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4 or len(volume) != config["in_channels"]:
        raise ValueError(
            f"volume of shape {volume.shape}: this model takes (C, D, H, W) with C={config['in_channels']} "
            f"({settings['modality']} data)"
        )
    target = settings.get("target_voxel_size")
    if target is not None and not (voxel_size is not None and len(voxel_size) == 3):
        raise ValueError(
            f"the model was trained on volumes resampled to {target} um; give each volume's voxel size "
            "(z, y, x um): the manifest's voxel_size_* columns, --voxel-size, or the voxel_size param"
        )
    return volume


def _size(voxel_size: Sequence[float] | None) -> tuple:
    return tuple(voxel_size) if voxel_size is not None and len(voxel_size) == 3 else (1.0, 1.0, 1.0)


def _settings(config: dict) -> dict:
    settings = config["preprocessing"]
    return {
        "modality": settings["modality"],
        "shape": tuple(settings["shape"]),
        "target_voxel_size": settings.get("target_voxel_size"),
        "n_medium": settings["n_medium"],
        "ri_scale": settings["ri_scale"],
    }


def check_prepared(config: dict, prepared: np.ndarray) -> None:
    """ValueError unless prepared is (B, C, *shape) for this model."""
    expected = (config["in_channels"], *config["preprocessing"]["shape"])
    if prepared.ndim != 5 or tuple(prepared.shape[1:]) != expected:
        raise ValueError(
            f"prepared volumes of shape {tuple(prepared.shape)}: expected (B, {', '.join(map(str, expected))}); "
            "send raw volumes with preprocess=true instead"
        )


class VolumeModel(ABC):
    """What the model's inference code (leuko.deploy.pyfunc_model) and its ONNX Runtime twin
    (leuko.deploy.onnx_model) share: the settings read from model_config.json, raw volumes prepared as for
    training, and the output table. A subclass sets `config` (with use_config) and defines predict_proba."""

    config: dict
    classes: list[str]
    temperature: float  # 1: uncalibrated
    bias: list[float] | None  # class biases added after the temperature (`--decisions prevalence`), else None

    def use_config(self, config: dict) -> None:
        self.config = config
        self.classes = list(config["classes"])
        self.temperature = temperature(config)
        self.bias = class_bias(config)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.config["preprocessing"]["shape"])

    def preprocess(self, volume: np.ndarray, voxel_size=None) -> np.ndarray:
        """A raw (C, D, H, W) volume -> (C, *shape) float32, exactly as `leuko prepare` did for training."""
        return prepare_volume(self.config, volume, voxel_size)

    @abstractmethod
    def predict_proba(self, prepared: np.ndarray) -> np.ndarray:
        """(B, C, *shape) prepared volumes -> (B, classes) probabilities."""

    def predict_table(self, model_input, params=None) -> pd.DataFrame:
        """pred_label and prob_<class> per volume; params preprocess (default true) and voxel_size."""
        params = params or {}
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 4:
            x = x[None]  # one volume
        if params.get("preprocess", True):
            voxel_size = params.get("voxel_size") or None
            x = np.stack([self.preprocess(v, voxel_size) for v in x]) if len(x) else x
        return probability_table(self.predict_proba(x), self.classes)
