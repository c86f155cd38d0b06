"""A leuko model folder (what `leuko register` logs, without the refit or a registry) around an untrained tiny net.

For the export, predict-runtime and explain tests: the same MLmodel, inference code, weights and config as
a registered model, saved with mlflow.pyfunc.save_model in a second instead of a sweep and a register.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from leuko.data.preprocess import normalisation_meta
from leuko.nets import build_net, constructor_kwargs
from leuko.tracking.registry import CODE, _signature

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


def model_folder(
    root: Path, *, net: str = "fishnet3d_tiny", shape=(16, 16, 16), temperature: float | None = None, seed: int = 0
) -> Path:
    """root/model: a models-from-code pyfunc of net (seeded random weights) for 1-channel RI volumes of shape."""
    import mlflow
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    kwargs = constructor_kwargs(net, {}, shape)
    model = build_net(net, in_channels=1, num_classes=len(CLASSES), **kwargs).eval()
    config = {
        "net": net,
        "net_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "in_channels": 1,
        "classes": CLASSES,
        "preprocessing": {
            "modality": "ri",
            "shape": list(shape),
            "target_voxel_size": None,
            "n_medium": 1.337,
            "ri_scale": 0.01,
            "read_options": {},
            "normalisation": normalisation_meta("ri", 1.337, 0.01),
        },
    }
    if temperature is not None:
        config["calibration"] = {"temperature": temperature}
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files / "weights.safetensors"))
    (files / "model_config.json").write_text(json.dumps(config, indent=2))
    folder = root / "model"
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(CODE),
        artifacts={"weights": str(files / "weights.safetensors"), "model_config": str(files / "model_config.json")},
        signature=_signature(config),  # its params (preprocess, voxel_size), as `leuko register` logs them
        # one prepared cell, as `leuko register` logs a test cell: a ball of RI contrast 2 in the medium
        input_example=(_ball(shape), {"preprocess": False}),
        pip_requirements=[],
    )
    return folder


def _ball(shape) -> np.ndarray:
    """(1, 1, *shape) float32: a prepared cell, a ball of contrast 2 filling half the side."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    inside = np.sqrt((grid**2).sum(0)) < min(shape) / 4
    return (2.0 * inside)[None, None].astype(np.float32)
