"""What `leuko register` logs as a model: the model_config.json of a LeukoCLI's model and data, the signature,
the pinned requirements, and the pyfunc itself (a weight file per member, config, code, MODEL_CARD.md) logged
to the refit run. The layout of the logged model: leuko.deploy.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path

from leuko import __version__

PACKAGE = Path(__file__).parents[1]  # the leuko package: logged with the model as its code path
CODE = PACKAGE / "deploy" / "pyfunc_model.py"  # the logged inference code
# What the inference code imports (pyfunc_model.py, leuko.nets, leuko.data.preprocess), pinned as installed here.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "monai", "numpy", "pandas", "scipy", "safetensors")


def model_config(cli) -> dict:
    # heavy imports here (torch, numpy), as in leuko.tracking.registry
    from leuko.deploy.intensity import training_intensities
    from leuko.nets import constructor_kwargs

    model, meta = cli.model, cli.datamodule.meta
    hp = model.hparams
    settings = meta.get("settings", {})
    return {
        "net": hp.net,
        # what VolumeClassifier built the net with: net_kwargs plus what the net takes from the input shape
        "net_kwargs": constructor_kwargs(hp.net, hp.net_kwargs, hp.input_shape),
        "in_channels": int(hp.in_channels),
        "classes": list(model.class_names),
        "preprocessing": {
            "modality": meta["modality"],
            "shape": list(meta["shape"]),
            "target_voxel_size": settings.get("target_voxel_size"),
            "n_medium": settings.get("n_medium"),
            "ri_scale": settings.get("ri_scale"),
            "read_options": settings.get("read_options", {}),
            "normalisation": meta.get("normalisation"),
        },
        # what `leuko predict` checks each cell against (leuko.deploy.intensity): the cells it was fit on
        "intensity": training_intensities(cli.datamodule.volumes_path, cli.datamodule.subset("train")["row"]),
        "prepared_fingerprint": meta.get("fingerprint"),
        "manifest_sha256": meta.get("manifest_sha256"),
        "leuko_version": __version__,
    }


def signature(config: dict):
    # heavy imports here, as in leuko.tracking.registry
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from leuko.training.predictions import PRED, prob_columns

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], -1, -1, -1))])
    outputs = Schema([ColSpec("string", PRED)] + [ColSpec("double", c) for c in prob_columns(config["classes"])])
    params = ParamSchema([ParamSpec("preprocess", "boolean", True), ParamSpec("voxel_size", "double", [], shape=(-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def requirements() -> list[str]:
    """Pins of the public packages the inference code needs; leuko itself travels as the model's code path."""
    return [f"{p}=={metadata.version(p).split('+')[0]}" for p in REQUIREMENTS]


def weight_names(n: int) -> list[str]:
    """The artifact names of n members' weights: weights (weights.safetensors, as a single net's), weights_1, ..."""
    return ["weights"] + [f"weights_{i}" for i in range(1, n)]


def log_model(client, cli, config: dict, cv: dict, run_id: str, card: str | None, members: list, metrics: dict) -> str:
    """Log the CV scores, the test report's metrics and the pyfunc model (a weight file per member, config,
    code, MODEL_CARD.md) to the refit run: its URI.

    The run is addressed by id, never made the active run, so its status stays what the register set.
    """
    # heavy imports here, as in leuko.tracking.registry
    import mlflow
    import numpy as np
    from mlflow.entities import Metric
    from safetensors.torch import save_file

    from leuko.tracking.model_card import MODEL_CARD
    from leuko.tracking.runs import log_batch

    now = int(time.time() * 1000)
    logged = [Metric(f"cv/{k}_{stat}", v[stat], now, 0) for k, v in cv.items() for stat in ("mean", "std")]
    log_batch(client, run_id, metrics=logged + [Metric(k, v, now, 0) for k, v in metrics.items()])
    datamodule = cli.datamodule
    test_rows = datamodule.subset("test")["row"].to_numpy()
    volumes = np.load(datamodule.volumes_path, mmap_mode="r")
    example = np.asarray(volumes[test_rows[:1]], dtype=np.float32)  # (1, C, D, H, W), one prepared test cell
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, net in zip(weight_names(len(members)), members):
            files[key] = str(Path(tmp) / f"{key}.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, files[key])
        files["model_config"] = str(Path(tmp) / "model_config.json")
        Path(files["model_config"]).write_text(json.dumps(config, indent=2) + "\n")
        if card is not None:  # beside the weights and config, in the model's artifacts/
            (Path(tmp) / MODEL_CARD).write_text(card, encoding="utf-8")
            files["model_card"] = str(Path(tmp) / MODEL_CARD)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        info = mlflow.models.Model.log(
            artifact_path=None,  # deprecated in favour of name, but still a required argument
            name="model",
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model passes for a code file
            run_id=run_id,
            python_model=str(CODE),
            code_paths=[str(PACKAGE)],
            artifacts=files,
            signature=signature(config),
            input_example=(example, {"preprocess": False}),
            pip_requirements=requirements(),
            metadata={
                "classes": config["classes"],
                "preprocessing": config["preprocessing"],
                "ensemble_size": len(members),
                "tta": config["tta"],
            },
        )
    return info.model_uri
