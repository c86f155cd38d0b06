"""What a registered model takes: a raw volume, prepared exactly as `leuko prepare` prepared its training data.

Shared by the model's inference code (leuko.deploy.pyfunc_model) and its ONNX Runtime twin
(leuko.deploy.onnx_model), and free of torch so that the latter starts without it. The settings come from
the model's model_config.json: in_channels and preprocessing {modality, shape, target_voxel_size, n_medium,
ri_scale}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from leuko.data.preprocess import process_cell


def prepare_volume(config: dict, volume: np.ndarray, voxel_size: Sequence[float] | None = None) -> np.ndarray:
    """A raw (C, D, H, W) volume (or (D, H, W) for one channel) -> (C, *shape) float32.

    ValueError when the channel count is not the model's, or when the model resamples and voxel_size
    (z, y, x um) is missing."""
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
    window, _ = process_cell(
        volume,
        tuple(voxel_size) if voxel_size is not None and len(voxel_size) == 3 else (1.0, 1.0, 1.0),
        modality=settings["modality"],
        shape=tuple(settings["shape"]),
        target_voxel_size=target,
        n_medium=settings["n_medium"],
        ri_scale=settings["ri_scale"],
    )
    return window


def check_prepared(config: dict, prepared: np.ndarray) -> None:
    """ValueError unless prepared is (B, C, *shape) for this model."""
    expected = (config["in_channels"], *config["preprocessing"]["shape"])
    if prepared.ndim != 5 or tuple(prepared.shape[1:]) != expected:
        raise ValueError(
            f"prepared volumes of shape {tuple(prepared.shape)}: expected (B, {', '.join(map(str, expected))}); "
            "send raw volumes with preprocess=true instead"
        )
