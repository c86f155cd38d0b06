"""Bootstrap confidence intervals: the patient as the unit for pooled metrics, the cell within its sample for
differentials, the sample for Bland-Altman; metrics_ci.json, differentials_ci.csv, MLflow and the report."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers.evaluation import CLASSES, fake_cv
from leuko.evaluation.agreement import bland_altman_table, differentials
from leuko.evaluation.evaluate import evaluate, load_cv
from leuko.evaluation.intervals import (
    DIFFERENTIALS_CI,
    METRICS_CI,
    bland_altman_intervals,
    differential_intervals,
    format_ci,
    metric_intervals,
)
from leuko.evaluation.metrics import confusion, per_class_table, pooled_metrics
from leuko.evaluation.report import write_report
from leuko.training.predictions import PRED, prob_columns


def cohort(n_patients: int, cells_per_patient: int = 40, *, patient_effect: bool, seed: int = 0) -> pd.DataFrame:
    """Cells with labels, predictions and probabilities. patient_effect: each patient's cells are all right or
    all wrong (perfectly correlated within the patient); else every cell is right or wrong on its own."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient_right = rng.random() < 0.75
        for i in range(cells_per_patient):
            label = CLASSES[i % len(CLASSES)]
            right = patient_right if patient_effect else rng.random() < 0.75
            pred = label if right else CLASSES[(CLASSES.index(label) + 1) % len(CLASSES)]
            probs = np.full(len(CLASSES), 0.1)
            probs[CLASSES.index(pred)] = 0.7 + 0.05 * rng.random()
            probs /= probs.sum()
            rows.append(
                {
                    "cell_id": f"P{p}_C{i}",
                    "patient_id": f"P{p}",
                    "sample_type": "blood",
                    "label": label,
                    PRED: pred,
                    **dict(zip(prob_columns(CLASSES), probs)),
                }
            )
    return pd.DataFrame(rows)


def width(entry: dict) -> float:
    return entry["ci_high"] - entry["ci_low"]


def test_estimates_are_the_pooled_metrics_and_lie_in_their_intervals():
    cells = cohort(12, patient_effect=False)
    ci = metric_intervals(cells, CLASSES)
    pooled = pooled_metrics(cells, CLASSES)
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        assert ci[key]["estimate"] == pytest.approx(pooled[key], abs=1e-12), key
    recall = per_class_table(confusion(cells, CLASSES), CLASSES)
    for c, r in zip(recall["class"], recall["recall"]):
        assert ci[f"recall/{c}"]["estimate"] == pytest.approx(r)
    for key, entry in ci.items():
        assert set(entry) == {"estimate", "ci_low", "ci_high"}
        assert entry["ci_low"] <= entry["estimate"] <= entry["ci_high"], key
    assert metric_intervals(cells, CLASSES) == ci  # a fixed seed: the same bounds every time


def test_interval_narrows_with_more_patients():
    few = metric_intervals(cohort(8, patient_effect=True), CLASSES)["balanced_accuracy"]
    many = metric_intervals(cohort(96, patient_effect=True, seed=1), CLASSES)["balanced_accuracy"]
    assert 0 < width(many) < 0.6 * width(few)  # about 1/sqrt(12) as wide in theory


def test_patients_not_cells_are_resampled():
    """Cells of one patient all right or all wrong: 40 cells per patient carry the information of one, so the
    interval over patients is far wider than one that treats the cells as independent."""
    cells = cohort(20, patient_effect=True)
    by_patient = metric_intervals(cells, CLASSES)["balanced_accuracy"]
    by_cell = metric_intervals(cells, CLASSES, unit="cell_id")["balanced_accuracy"]
    assert by_patient["estimate"] == pytest.approx(by_cell["estimate"])
    assert width(by_patient) > 3 * width(by_cell)
    # without a patient effect, the two units agree
    independent = cohort(20, patient_effect=False)
    ratio = width(metric_intervals(independent, CLASSES)["balanced_accuracy"]) / width(
        metric_intervals(independent, CLASSES, unit="cell_id")["balanced_accuracy"]
    )
    assert 0.6 < ratio < 1.6


def test_one_patient_has_no_interval():
    ci = metric_intervals(cohort(1, patient_effect=False), CLASSES)["balanced_accuracy"]
    assert ci["estimate"] is not None and ci["ci_low"] is None and ci["ci_high"] is None
    assert format_ci(ci, 2) == f"{ci['estimate']:.2f}"


def test_differential_intervals_resample_the_cells_of_each_sample():
    cells = cohort(3, 200, patient_effect=False)
    small = cohort(3, 20, patient_effect=False)
    table = differential_intervals(cells, CLASSES)
    assert len(table) == 3 * len(CLASSES)
    diffs = differentials(cells, CLASSES).set_index("patient_id")
    for row in table.to_dict("records"):
        assert row["estimate"] == pytest.approx(diffs.loc[row["patient_id"], f"pred_{row['class']}"])
        assert row["ci_low"] <= row["estimate"] <= row["ci_high"]
    # ten times the cells: about a third of the width
    assert (table["ci_high"] - table["ci_low"]).mean() < 0.5 * (
        differential_intervals(small, CLASSES).eval("ci_high - ci_low").mean()
    )


def test_bland_altman_intervals_resample_samples():
    cells = cohort(16, patient_effect=False)
    diffs = differentials(cells, CLASSES)
    table = bland_altman_table(diffs, CLASSES).set_index("class")
    ci = bland_altman_intervals(diffs, CLASSES)
    for c in CLASSES:
        for stat in ("bias", "loa_low", "loa_high"):
            entry = ci[f"ba/{c}/{stat}"]
            assert entry["estimate"] == pytest.approx(table.loc[c, stat])
            assert entry["ci_low"] <= entry["estimate"] <= entry["ci_high"]


def test_format_ci():
    assert format_ci({"estimate": 0.912, "ci_low": 0.871, "ci_high": 0.944}) == "0.91 (0.87-0.94)"
    assert format_ci({"estimate": -2.5, "ci_low": -4.0, "ci_high": -1.0}, 1, dash=" to ") == "-2.5 (-4.0 to -1.0)"
    assert format_ci(None) == "–"


# ---------------------------------------------------------------------------------------------- leuko evaluate
def test_evaluate_writes_metrics_ci_json_and_differentials_ci(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs")
    result = evaluate(load_cv(cv), tmp_path / "eval", umap=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ci = json.loads((tmp_path / "eval" / METRICS_CI).read_text())
    assert ci == result["intervals"]
    expected = {"oof/balanced_accuracy", "oof/auroc", *(f"recall/{c}" for c in CLASSES)}
    expected |= {f"ba/{c}/{s}" for c in CLASSES for s in ("bias", "loa_low", "loa_high")}
    assert expected <= set(ci)
    for key, entry in ci.items():
        assert set(entry) == {"estimate", "ci_low", "ci_high"}, key
        assert entry["estimate"] == pytest.approx(metrics[key], abs=1e-12), key  # the number of metrics.json
        assert all(isinstance(v, float) for v in entry.values()), key
        assert entry["ci_low"] <= entry["estimate"] <= entry["ci_high"], key
    table = pd.read_csv(tmp_path / "eval" / DIFFERENTIALS_CI)
    assert list(table.columns) == ["patient_id", "sample_type", "class", "n_cells", "estimate", "ci_low", "ci_high"]
    assert len(table) == 6 * len(CLASSES)  # one row per sample and class


def test_bounds_are_logged_and_shown_in_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cv = fake_cv(tmp_path / "runs", tracking_uri=store, name="ci")
    result = evaluate(load_cv(cv), cv / "eval", umap=False)
    logged = mlflow.MlflowClient(store).get_run(result["run_id"]).data.metrics
    ba = result["intervals"]["oof/balanced_accuracy"]
    assert logged["oof/balanced_accuracy_ci_low"] == pytest.approx(ba["ci_low"])
    assert logged["ba/neutrophil/bias_ci_high"] == pytest.approx(result["intervals"]["ba/neutrophil/bias"]["ci_high"])

    report = write_report(str(cv), tmp_path / "report.html")
    assert report["mismatches"] == [] and "oof/balanced_accuracy_ci_low" in report["numbers"]
    html = (tmp_path / "report.html").read_text()
    assert format_ci(ba, 3) in html  # "0.xxx (0.xxx-0.xxx)"
    assert format_ci(result["intervals"]["recall/monocyte"], 3) in html
    assert "Predicted differential per sample" in html
