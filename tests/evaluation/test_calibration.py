"""Temperature scaling and the calibration error: a known T is recovered, the NLL drops, ECE is torchmetrics'."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from helpers.evaluation import CLASSES, fake_cv
from leuko.evaluation.calibration import (
    calibrate,
    calibration_error,
    class_calibration_errors,
    fit_bias_corrected,
    fit_temperature,
    nll,
    reliability_bins,
    scale,
)
from leuko.evaluation.evaluate import evaluate, load_cv


def synthetic(n: int, true_temperature: float, seed: int = 0, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, k), labels (n,)): a net's softmax(z), with labels drawn from softmax(z / true_temperature).

    true_temperature > 1: the net is over-confident by that factor; the T that calibrates it is that factor."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, k))
    truth = softmax(logits / true_temperature, axis=1)
    labels = np.array([rng.choice(k, p=p) for p in truth])
    return softmax(logits, axis=1), labels


@pytest.mark.parametrize("true_temperature", [2.5, 0.6])
def test_a_known_temperature_is_recovered_and_the_nll_drops(true_temperature):
    probs, labels = synthetic(20_000, true_temperature)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(true_temperature, rel=0.05)
    scaled = scale(probs, temperature)
    assert nll(scaled, labels) < nll(probs, labels) - 0.01
    assert calibration_error(scaled, labels) < calibration_error(probs, labels) / 2
    assert (scaled.argmax(1) == probs.argmax(1)).all()  # no prediction changes
    assert np.allclose(scaled.sum(1), 1.0)


def test_scaling_probabilities_is_scaling_logits():
    logits = np.random.default_rng(1).normal(0, 4, size=(50, 4))
    for t in (0.3, 1.0, 2.7):
        assert np.allclose(scale(softmax(logits, axis=1), t), softmax(logits / t, axis=1), atol=1e-12)


def test_bias_corrected_scaling_recovers_a_known_temperature_and_class_bias():
    """Labels drawn from softmax(z / 2 + b): a net that predicts softmax(z) is over-confident and blind to the
    class mix b; BCTS recovers both, and its argmax gains accuracy where temperature alone changes none."""
    rng = np.random.default_rng(3)
    logits, bias = rng.normal(0.0, 3.0, size=(20_000, 3)), np.array([0.0, -2.0, 1.0])
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits / 2.0 + bias, axis=1)])
    probs = softmax(logits, axis=1)
    temperature, fitted = fit_bias_corrected(probs, labels)
    assert temperature == pytest.approx(2.0, rel=0.05) and np.allclose(fitted, bias, atol=0.1)
    scaled = scale(probs, temperature, fitted)
    assert np.allclose(scaled.sum(1), 1.0) and nll(scaled, labels) < nll(scale(probs, 2.0), labels) - 0.05
    assert (scaled.argmax(1) == labels).mean() > (probs.argmax(1) == labels).mean() + 0.02
    assert np.allclose(scale(probs, 1.7, np.zeros(3)), scale(probs, 1.7))


def test_bias_corrected_scaling_refuses_no_cells_and_classes_without_cells():
    with pytest.raises(ValueError, match="no cells"):
        fit_bias_corrected(np.empty((0, 3)), np.empty(0))
    probs, labels = synthetic(300, 1.0)
    with pytest.raises(ValueError, match=r"no cells of class index\(es\) 2 to fit their biases on"):
        fit_bias_corrected(probs[labels != 2], labels[labels != 2])


def test_a_calibrated_net_keeps_a_temperature_near_one():
    probs, labels = synthetic(20_000, 1.0, seed=2)
    assert fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.05)


def test_the_ece_is_torchmetrics_overall_and_per_class():
    probs, labels = synthetic(3_000, 2.0, seed=3)
    overall = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")
    overall.update(torch.tensor(probs), torch.tensor(labels))
    assert calibration_error(probs, labels) == pytest.approx(float(overall.compute()), abs=1e-9)
    for k, value in enumerate(class_calibration_errors(probs, labels)):
        binary = BinaryCalibrationError(n_bins=15, norm="l1")
        binary.update(torch.tensor(probs[:, k]), torch.tensor(labels == k).long())
        assert value == pytest.approx(float(binary.compute()), abs=1e-9)
    # and by hand: the cell-weighted gap between accuracy and mean confidence per bin
    bins = reliability_bins(probs, labels)
    by_hand = float((bins["n"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / len(labels))
    assert calibration_error(probs, labels) == pytest.approx(by_hand, abs=1e-6)  # torchmetrics bins in float32


def test_calibrate_scores_the_temperature_on_held_out_folds_too(tmp_path):
    oof = pd.read_csv(fake_cv(tmp_path / "runs", error=0.1) / "oof_predictions.csv")
    summary, scaled = calibrate(oof, CLASSES, fitted_on="test")
    assert set(summary) >= {"temperature", "ece_before", "ece_after", "ece_after_held_out", "per_class"}
    assert list(summary["per_class"]) == CLASSES
    assert summary["nll_after"] <= summary["nll_before"]
    assert scaled.shape == (len(oof), len(CLASSES))


def test_evaluate_writes_calibration_and_logs_its_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs", error=0.1)
    evaluate(load_cv(cv), tmp_path / "eval", umap=False)
    calibration = json.loads((tmp_path / "eval" / "calibration.json").read_text())
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("temperature", "ece_before", "ece_after", "ece_after_held_out"):
        assert metrics[f"calibration/{key}"] == calibration[key]
    assert calibration["ece_after"] < calibration["ece_before"]  # the fake CV is over-confident
    assert calibration["n_bins"] == 15 and calibration["norm"] == "l1"
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 10_000


def test_the_diagrams_and_numbers_go_to_the_cvs_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cv = fake_cv(tmp_path / "runs", error=0.1, tracking_uri=store)
    result = evaluate(load_cv(cv), cv / "eval", umap=False)
    client = mlflow.MlflowClient(store)
    logged = {a.path for a in client.list_artifacts(result["run_id"], "eval")}
    names = ("calibration.json", "reliability.png", "coverage.csv", "coverage.png", "review.json")
    assert {f"eval/{n}" for n in names} <= logged
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["calibration/temperature"] == pytest.approx(result["metrics"]["calibration/temperature"])
    assert metrics["review/coverage"] == pytest.approx(result["metrics"]["review/coverage"])
