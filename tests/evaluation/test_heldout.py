"""Baselines on the held-out test patients: trained on every other cell, scored once on the test patients."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from leuko.data.folds import TEST, make_splits
from leuko.data.prepared import load_prepared
from leuko.evaluation.heldout import SETTINGS, TABLE, format_heldout, heldout_baselines
from leuko.evaluation.metrics import SCORES


@pytest.mark.slow
def test_heldout_baselines_score_the_test_patients_and_are_cached(tiny_cohort, tiny_prepared, tmp_path):
    _, index, _ = load_prepared(tiny_prepared)
    splits = make_splits(index, k=2, test_fraction=0.2, seed=0)
    n_test = int((splits["fold"] == TEST).sum())
    assert 0 < n_test < len(splits)

    table = heldout_baselines(
        tiny_prepared, tiny_cohort, k=2, test_fraction=0.2, seed=0, mip_epochs=1, cache=tmp_path, progress=None
    )
    assert list(table["key"]) == ["svm", "knn5", "lda", "naive_bayes", "decision_tree", "mip2d"]
    assert (table["n_test"] == n_test).all()
    for metric in SCORES:
        assert table[metric].between(0, 1).all()
    # accuracy on n_test cells is a multiple of 1 / n_test: they were scored on exactly the test cells
    assert ((table["accuracy"] * n_test).round(6) % 1 == 0).all()

    # the cache answers for the same data and settings (a planted value comes back) ...
    planted = table.assign(balanced_accuracy=0.123)
    planted.to_csv(tmp_path / TABLE, index=False)
    again = heldout_baselines(
        tiny_prepared, tiny_cohort, k=2, test_fraction=0.2, seed=0, mip_epochs=1, cache=tmp_path, progress=None
    )
    assert (again["balanced_accuracy"] == 0.123).all()
    # ... and not for other settings
    other = heldout_baselines(
        tiny_prepared, tiny_cohort, k=2, test_fraction=0.2, seed=1, mip_net=None, cache=tmp_path, progress=None
    )
    assert "mip2d" not in set(other["key"]) and not (other["balanced_accuracy"] == 0.123).all()
    assert json.loads((tmp_path / SETTINGS).read_text())["seed"] == 1


def test_format_heldout_puts_the_champion_first():
    table = pd.DataFrame(
        [
            {"method": "naive Bayes", "key": "naive_bayes", "input": "6 morphology features", "n_test": 10}
            | dict.fromkeys(SCORES, 0.5)
        ]
    )
    lines = format_heldout(table, champion=dict.fromkeys(SCORES, 0.9)).splitlines()
    assert lines[1].startswith("champion") and "0.900" in lines[1]
    assert lines[2].startswith("naive Bayes") and "0.500" in lines[2]
