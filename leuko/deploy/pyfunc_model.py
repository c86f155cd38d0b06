"""Inference code of a registered leuko model (MLflow models-from-code: stored with the model, run on load).

Input: float32 volumes (B, C, D, H, W), or one volume (C, D, H, W).
- params preprocess=true (default): raw volumes as read from files (absolute refractive index, or raw
  HHG intensities), any size; each goes through leuko.data.preprocess.process_cell with the settings the
  training data was prepared with, so a served model sees exactly what training saw. voxel_size
  (z, y, x um) is needed only when the training data was resampled.
- preprocess=false: volumes already prepared (normalised and cropped to the training shape).
Output: one row per volume: pred_label and prob_<class> per class (they sum to 1): the softmax of the net's
logits divided by the model's temperature (model_config.json calibration.temperature; 1 when it has none)
plus its class biases (calibration.bias, leuko.deploy.decisions; none by default), averaged over the model's
members and test-time views (leuko.deploy.ensemble).

Weights: artifacts/weights.safetensors, and for an ensemble of k fold models also weights_1 .. weights_<k-1>
(model_config.json ensemble.weights names the artifacts, in member order); model_config.json tta names the
test-time augmentation (leuko.deploy.tta). A model without these keys is one net without TTA, as every model
registered before them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

from leuko.deploy.ensemble import Ensemble
from leuko.deploy.inputs import VolumeModel, check_prepared
from leuko.nets import build_net

BATCH = 32  # volumes per forward pass; 32 tiny-net 32^3 volumes need well under 1 GB


class LeukoModel(VolumeModel, PythonModel):
    # The logged signature (a float32 tensor) validates the input; MLflow's type-hint validation,
    # and its warning that predict has no type hints, do not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.use_config(json.loads(Path(context.artifacts["model_config"]).read_text()))
        config = self.config
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["net_kwargs"].items()}
        names = (config.get("ensemble") or {}).get("weights") or ["weights"]
        missing = [n for n in names if n not in context.artifacts]
        if missing:
            raise ValueError(f"model_config.json ensemble.weights names {missing}, which the model's artifacts lack")
        members = []
        for name in names:
            net = build_net(config["net"], in_channels=config["in_channels"], num_classes=len(self.classes), **kwargs)
            net.load_state_dict(load_file(context.artifacts[name]), strict=True)
            members.append(net)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = Ensemble(members, self.temperature, config.get("tta", "none"), self.bias)
        self.module = self.module.to(self.device).eval()
        self.net = members[0]  # the first member: the net `leuko explain` draws

    def predict_proba(self, prepared: np.ndarray) -> np.ndarray:
        """(B, C, *shape) prepared volumes -> (B, classes) probabilities."""
        check_prepared(self.config, prepared)
        out = []
        with torch.inference_mode():
            for start in range(0, len(prepared), BATCH):
                x = torch.from_numpy(np.ascontiguousarray(prepared[start : start + BATCH])).to(self.device)
                out.append(self.module(x).cpu().numpy())  # (b, classes)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return self.predict_table(model_input, params)


mlflow.models.set_model(LeukoModel())
