"""`leuko evaluate`'s decisions.json: the balanced and prevalence rules on the same out-of-fold cells."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from leuko.evaluation.agreement import bland_altman_table, differentials
from leuko.evaluation.decision_rules import compare_decisions, summary_line, write_decisions
from leuko.training.predictions import PRED, prob_columns

CLASSES = ["neutrophil", "eosinophil", "lymphocyte"]


def balanced_net_cells(seed: int = 0, patients: int = 12, per_patient: int = 150) -> pd.DataFrame:
    """Out-of-fold cells of 3 folds, 80/5/15 % of the classes, scored by a net trained on balanced batches: its
    logits are the log-likelihoods, the posterior under equal classes, so it calls the rare eosinophils far more
    often than they occur (the posterior of the data adds log prior: what the prevalence biases learn)."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.80, 0.05, 0.15])
    rows = []
    for p in range(patients):
        labels = rng.choice(3, size=per_patient, p=prior)
        features = 1.5 * np.eye(3)[labels] + rng.normal(0.0, 1.0, (per_patient, 3))  # x ~ N(1.5 e_y, 1)
        logits = 1.5 * features  # log p(x | y) + const: the posterior under equal classes
        probs = softmax(logits, axis=1)
        table = pd.DataFrame(probs, columns=prob_columns(CLASSES))
        table[PRED] = np.array(CLASSES)[probs.argmax(1)]
        rows.append(table.assign(patient_id=f"P{p}", sample_type="blood", fold=p % 3, label=np.array(CLASSES)[labels]))
    return pd.concat(rows, ignore_index=True)


def test_prevalence_decisions_bring_the_differential_to_the_count():
    cells = balanced_net_cells()
    found = compare_decisions(cells, CLASSES)
    balanced, prevalence = found["balanced"], found["prevalence"]
    # the balanced rule is the net's own argmax, scored as leuko.evaluation.agreement scores it
    assert balanced["accuracy"] == pytest.approx((cells[PRED] == cells["label"]).mean())
    expected = bland_altman_table(differentials(cells, CLASSES), CLASSES).set_index("class")["bias"]
    assert balanced["bias"] == pytest.approx(expected.to_dict())
    assert balanced["bias"]["eosinophil"] > 5.0  # eosinophils over-counted by over 5 points
    assert abs(prevalence["bias"]["eosinophil"]) < balanced["bias"]["eosinophil"] / 3
    assert prevalence["differential_mae"] < balanced["differential_mae"] / 2
    assert prevalence["accuracy"] > balanced["accuracy"] + 0.03
    assert prevalence["balanced_accuracy"] < balanced["balanced_accuracy"]  # the price
    assert found["closer_differential"] == "prevalence" and "other folds" in found["fitted_on"]


def test_folds_whose_others_lack_a_class_are_named():
    cells = balanced_net_cells(patients=6)
    cells = cells[(cells["label"] != "eosinophil") | (cells["fold"] == 1)]  # eosinophils in fold 1 only
    with pytest.raises(ValueError, match="the folds other than 1 have no cells of eosinophil to fit a bias on"):
        compare_decisions(cells, CLASSES)


def test_no_folds_no_comparison_and_the_flat_numbers(tmp_path, capsys):
    cells = balanced_net_cells(patients=6)
    one_fold = SimpleNamespace(cells=cells.assign(fold=0), classes=CLASSES)
    assert compare_decisions(one_fold.cells, CLASSES) == {}
    assert write_decisions(one_fold, tmp_path) == {} and not list(tmp_path.iterdir())
    numbers = write_decisions(SimpleNamespace(cells=cells, classes=CLASSES), tmp_path)
    assert (tmp_path / "decisions.json").is_file()
    assert set(numbers) == {f"decisions/{r}/{m}" for r in ("balanced", "prevalence")
                            for m in ("accuracy", "balanced_accuracy", "differential_mae")}  # fmt: skip
    assert summary_line(numbers) in capsys.readouterr().err
    assert summary_line(numbers).startswith(
        "decisions (`leuko register --decisions`"
    ) and "prevalence: accuracy" in summary_line(numbers)
    lacking = cells[(cells["label"] != "eosinophil") | (cells["fold"] == 1)]
    assert write_decisions(SimpleNamespace(cells=lacking, classes=CLASSES), tmp_path / "x") == {}  # said, not raised
    assert "decisions: not compared (the folds other than 1 have no cells of eosinophil" in capsys.readouterr().err
