"""Cells for review: entropy, the coverage curve, a threshold that holds on held-out cells, the report's sections."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from helpers.evaluation import CLASSES, fake_cv
from leuko.evaluation.evaluate import evaluate, load_cv
from leuko.evaluation.report import write_report
from leuko.evaluation.review import (
    choose_threshold,
    coverage_curve,
    flags,
    predictive_entropy,
    review_differential,
)


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs, correct): labels drawn from the probabilities themselves, so they are calibrated."""
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0.0, 5.0, size=(n, 4)), axis=1)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    return probs, probs.argmax(1) == labels


def test_entropy_is_zero_for_certainty_and_log_k_for_a_coin():
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.5, 0.5, 0.0, 0.0]])
    assert predictive_entropy(probs) == pytest.approx([0.0, math.log(4), math.log(2)])


def test_the_curve_keeps_ties_together():
    curve = coverage_curve(np.array([0.1, 0.3, 0.1, 0.2]), np.array([True, False, False, True]))
    assert curve["threshold"].tolist() == [0.1, 0.2, 0.3]
    assert curve["n_retained"].tolist() == [2, 3, 4]
    assert curve["accuracy"].tolist() == pytest.approx([0.5, 2 / 3, 0.5])


def test_the_threshold_is_the_largest_coverage_that_reaches_the_target():
    uncertainty = np.arange(10) / 10
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    settings = choose_threshold(uncertainty, correct, target=0.8)
    # retained accuracies: 1, 1, 1, 1, .8, .83, .86, .875, .89, .8: all ten reach 0.8
    assert settings["coverage"] == 1.0 and settings["threshold"] == pytest.approx(0.9)
    settings = choose_threshold(uncertainty, correct, target=0.85)
    assert settings["coverage"] == pytest.approx(0.9) and settings["accuracy"] == pytest.approx(8 / 9)
    assert flags(uncertainty, settings["threshold"]).tolist() == [False] * 9 + [True]


def test_an_unreachable_target_flags_every_cell():
    settings = choose_threshold(np.array([0.1, 0.2]), np.array([False, True]), target=0.99)
    assert settings["threshold"] is None and settings["coverage"] == 0.0
    assert flags(np.array([0.0, 5.0]), None).all()
    with pytest.raises(ValueError, match="target accuracy 1.5"):
        choose_threshold(np.array([0.1]), np.array([True]), target=1.5)


def test_the_threshold_reaches_the_target_on_held_out_cells():
    probs, correct = calibrated(20_000, seed=0)
    settings = choose_threshold(predictive_entropy(probs), correct, target=0.99)
    assert 0.2 < settings["coverage"] < 0.95 and settings["accuracy"] >= 0.99
    probs, correct = calibrated(20_000, seed=1)  # new cells, the same net
    kept = ~flags(predictive_entropy(probs), settings["threshold"])
    assert correct[kept].mean() >= 0.985  # the target, within the sampling error of the choice
    assert kept.mean() == pytest.approx(settings["coverage"], abs=0.03)
    lower = choose_threshold(predictive_entropy(probs), correct, target=0.95)
    assert lower["coverage"] > settings["coverage"]


def test_the_differential_without_flagged_cells():
    cells = pd.DataFrame(
        {
            "patient_id": ["P1"] * 4 + ["P2"] * 2,
            "pred_label": ["neutrophil", "neutrophil", "eosinophil", "lymphocyte", "monocyte", "monocyte"],
            "review": [False, False, True, False, True, True],
        }
    )
    table = review_differential(cells, CLASSES, ["patient_id"], "pred_label")
    assert table["n_review"].to_dict() == {"P1": 1, "P2": 2}
    assert table.loc["P1", [f"retained_{c}" for c in CLASSES]].tolist() == pytest.approx([200 / 3, 0, 100 / 3, 0])
    assert table.loc["P2", [f"retained_{c}" for c in CLASSES]].isna().all()  # every cell flagged


def test_evaluate_writes_the_curve_and_the_report_shows_every_trust_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs", error=0.1)
    evaluate(load_cv(cv), cv / "eval", umap=False)
    review = json.loads((cv / "eval" / "review.json").read_text())
    curve = pd.read_csv(cv / "eval" / "coverage.csv")
    assert list(curve.columns) == ["threshold", "n_retained", "coverage", "accuracy"]
    assert curve["coverage"].iloc[-1] == 1.0 and review["target_accuracy"] == 0.99
    assert review["uncertainty"] == "entropy" and review["n_cells"] == curve["n_retained"].iloc[-1]
    metrics = json.loads((cv / "eval" / "metrics.json").read_text())
    assert metrics["review/coverage"] == review["coverage"]
    html = write_report(str(cv), tmp_path / "report.html")["out"].read_text()
    for anchor in ("calibration", "review", "leakage"):
        assert f'<section id="{anchor}">' in html
    assert html.index('id="agreement"') < html.index('id="calibration"') < html.index('id="baselines"')
    assert "Each of the 6 patients has all their out-of-fold cells in one fold" in html
