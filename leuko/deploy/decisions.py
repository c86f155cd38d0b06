"""How a registered model turns probabilities into labels: `leuko register --decisions balanced|prevalence`.

    balanced    (default) the net's own argmax. The recipes train on class-balanced batches, so the net
                predicts as if every class were equally common: the rule that maximises balanced accuracy
                (the mean recall over classes), at the price of calling rare classes more often than they occur.
    prevalence  one bias per class, fitted with the temperature on the out-of-fold predictions of the model's
                CV (bias-corrected temperature scaling, leuko.evaluation.calibration.fit_bias_corrected), is
                added to the logits: the probabilities then hold for the class mix of the training data, and
                their argmax maximises accuracy on data of that mix. A differential from it does not inflate the
                rare classes; balanced accuracy drops a little.

The biases live in model_config.json (calibration.bias, {class: b}) beside the temperature; the inference
code, the ONNX graph and the registered model's test scores all apply both, read through temperature() and
class_bias(). Light on purpose (no torch import), as leuko.deploy.tta:
the CLI reads DECISIONS while building its parser.
"""

from __future__ import annotations

DECISIONS = ("balanced", "prevalence")
DEFAULT_DECISIONS = "balanced"


def temperature(config: dict) -> float:
    """The temperature of a model config's calibration (1: uncalibrated)."""
    return float((config.get("calibration") or {}).get("temperature", 1.0))


def class_bias(config: dict) -> list[float] | None:
    """The class biases of a model config's calibration (in the order of its classes), or None without them."""
    bias = (config.get("calibration") or {}).get("bias")
    return None if bias is None else [float(bias[c]) for c in config["classes"]]
