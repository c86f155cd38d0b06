"""The numbers cross-validation, `leuko evaluate` and `leuko baselines` share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leuko.evaluation.metrics import (
    SCORES,
    confusion,
    mean_std,
    per_class_table,
    pooled_metrics,
    sample_type_metrics,
    scores,
)

CLASSES = ["a", "b", "c"]


def _cells() -> pd.DataFrame:
    label = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "b", "a"]
    probs = np.eye(3)[[CLASSES.index(p) for p in pred]] * 0.8 + 0.2 / 3
    return pd.DataFrame(
        {"label": label, "pred_label": pred, **{f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)}}
    )


def test_confusion_rows_are_the_true_class():
    matrix = confusion(_cells(), CLASSES)
    np.testing.assert_array_equal(matrix, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    with pytest.raises(KeyError):
        confusion(_cells(), ["a", "b"])  # a label outside the class list


def test_scores_trio():
    out = scores(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert tuple(out) == SCORES
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_pooled_metrics_and_per_class_agree():
    cells = _cells()
    pooled = pooled_metrics(cells, CLASSES)
    table = per_class_table(confusion(cells, CLASSES), CLASSES)
    assert pooled["balanced_accuracy"] == pytest.approx(table["recall"].mean())
    assert 0.0 <= pooled["auroc"] <= 1.0
    assert table.loc[2, "recall"] == 0.0 and np.isnan(table.loc[2, "precision"])  # c never predicted


def test_mean_std_is_the_sample_std():
    assert mean_std([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2)}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


def test_sample_type_metrics_score_each_sample_type_on_its_own_cells():
    classes = ["a", "b"]
    cells = pd.DataFrame(
        {
            "label": ["a", "b", "a", "b", "a", "b"],
            "pred_label": ["a", "b", "a", "a", "a", "a"],  # BALF all right, blood calls every cell a
            "prob_a": [0.9, 0.2, 0.8, 0.6, 0.7, 0.9],
            "prob_b": [0.1, 0.8, 0.2, 0.4, 0.3, 0.1],
            "sample_type": ["BALF", "BALF", "BALF", "blood", "blood", "blood"],
        }
    )
    out = sample_type_metrics(cells, classes)
    assert out["oof_BALF/balanced_accuracy"] == pytest.approx(1.0)
    assert out["oof_blood/balanced_accuracy"] == pytest.approx(0.5)
    assert out["oof_blood/accuracy"] == pytest.approx(1 / 3)
    assert sample_type_metrics(cells[cells["sample_type"] == "BALF"], classes) == {}  # one sample type: nothing
