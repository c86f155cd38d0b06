"""`leuko evaluate`: differentials, Bland-Altman, confusion, learning curves; files with stable names; MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score

from helpers.evaluation import CLASSES, curve_value, fake_cv
from leuko.cli import main
from leuko.evaluation.agreement import bland_altman_table, differentials
from leuko.evaluation.evaluate import OUTPUTS, evaluate, load_cv, load_predictions


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-eval') / 'mlflow.db'}"


@pytest.fixture
def logged_cv(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return fake_cv(tmp_path / "runs", tracking_uri=store, name="logged")


def test_writes_every_file_with_numbers_that_match_the_analysis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no MLflow store here: files only
    cv = fake_cv(tmp_path / "runs")
    result = evaluate(load_cv(cv), tmp_path / "eval", umap=False)
    out = tmp_path / "eval"
    assert set(OUTPUTS) <= {p.name for p in out.iterdir()}
    assert not (tmp_path / "mlflow.db").exists()  # evaluate never creates a store

    oof = pd.read_csv(cv / "oof_predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())  # flat, DVC-readable
    summary = json.loads((cv / "cv_summary.json").read_text())
    assert metrics["cv/balanced_accuracy_mean"] == summary["balanced_accuracy"]["mean"]
    assert metrics["oof/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(oof["label"], oof["pred_label"]))
    recall = recall_score(oof["label"], oof["pred_label"], labels=CLASSES, average=None)
    for c, r in zip(CLASSES, recall):
        assert metrics[f"recall/{c}"] == pytest.approx(r)

    expected = bland_altman_table(differentials(oof, CLASSES), CLASSES)
    ba = pd.read_csv(out / "bland_altman.csv")
    pd.testing.assert_frame_equal(ba, expected, check_dtype=False)
    for row in expected.to_dict("records"):
        assert metrics[f"ba/{row['class']}/bias"] == pytest.approx(row["bias"])
        assert metrics[f"ba/{row['class']}/loa_high"] == pytest.approx(row["loa_high"])
    assert len(pd.read_csv(out / "differentials.csv")) == 6  # one row per patient and sample type
    assert set(pd.read_csv(out / "bland_altman_by_sample_type.csv")["sample_type"]) == {"BALF", "blood"}

    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(oof)
    assert (confusion["actual"] == oof["label"]).all()
    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["support"].sum() == len(oof)
    assert list(pd.read_csv(out / "learning_curves.csv").columns) == ["epoch", "mean"]  # header only, no MLflow
    assert result["run_id"] is None
    # the two decision rules on the same cells: balanced is the net's own argmax (the CV's pred_label)
    decisions = json.loads((out / "decisions.json").read_text())
    assert metrics["decisions/balanced/accuracy"] == decisions["balanced"]["accuracy"] == metrics["oof/accuracy"]
    assert decisions["balanced"]["bias"] == pytest.approx(expected.set_index("class")["bias"].to_dict())
    assert 0.0 <= metrics["decisions/prevalence/balanced_accuracy"] <= 1.0


def test_manual_counts_replace_the_labels_as_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs")
    oof = pd.read_csv(cv / "oof_predictions.csv")
    samples = oof[["patient_id", "sample_type"]].drop_duplicates()
    counts = samples.assign(neutrophil=60, eosinophil=10, lymphocyte=20, monocyte=10)
    counts.to_csv(tmp_path / "counts.csv", index=False)
    evaluate(load_cv(cv), tmp_path / "eval", counts=tmp_path / "counts.csv", umap=False)
    diffs = pd.read_csv(tmp_path / "eval" / "differentials.csv")
    assert (diffs["ref_neutrophil"] == 60.0).all() and (diffs["ref_eosinophil"] == 10.0).all()
    # the decision rules are scored against the same counts: the balanced rule's bias is the Bland-Altman one
    ba = pd.read_csv(tmp_path / "eval" / "bland_altman.csv").set_index("class")["bias"]
    decisions = json.loads((tmp_path / "eval" / "decisions.json").read_text())
    assert decisions["balanced"]["bias"] == pytest.approx(ba.to_dict())


def test_logs_to_the_cv_parent_run_with_learning_curves(logged_cv, store):
    result = evaluate(load_cv(logged_cv), logged_cv / "eval", umap=False)
    parent = (logged_cv / "mlflow_run_id").read_text().strip()
    assert result["run_id"] == parent  # found through runs/<name>/mlflow_run_id and the config's tracking.uri

    curves = pd.read_csv(logged_cv / "eval" / "learning_curves.csv")
    assert list(curves.columns) == ["epoch", "fold_0", "fold_1", "fold_2", "mean"]
    assert list(curves["epoch"]) == [0, 1, 2]  # the validate of the best checkpoint (0.99) is not an epoch
    assert curves.loc[1, "fold_2"] == pytest.approx(curve_value(2, 1))
    assert curves.loc[2, "mean"] == pytest.approx(np.mean([curve_value(f, 2) for f in range(3)]))

    client = mlflow.MlflowClient(store)
    run = client.get_run(parent)
    metrics = json.loads((logged_cv / "eval" / "metrics.json").read_text())
    for key, value in metrics.items():  # every number of metrics.json is the number logged
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-12), key
    artifacts = {a.path for a in client.list_artifacts(parent, "eval")}
    assert {f"eval/{name}" for name in OUTPUTS} <= artifacts


def test_finds_the_parent_run_by_name_without_the_marker_file(logged_cv, store):
    (logged_cv / "mlflow_run_id").unlink()
    result = evaluate(load_cv(logged_cv), logged_cv / "eval", umap=False)
    assert result["run_id"] is not None
    assert mlflow.MlflowClient(store).get_run(result["run_id"]).info.run_name == "logged"


def test_test_set_predictions_take_labels_from_the_prepared_index(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = pd.read_csv(tiny_prepared / "index.csv", dtype=str)
    preds = pd.DataFrame({"cell_id": index["cell_id"], "pred_label": index["label"]})
    for c in CLASSES:
        preds[f"prob_{c}"] = (index["label"] == c).astype(float)
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="--prepared"):
        load_predictions(tmp_path / "predictions.csv")
    evaluate(load_predictions(tmp_path / "predictions.csv", tiny_prepared), tmp_path / "eval", umap=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["oof/accuracy"] == 1.0 and metrics["ba/neutrophil/bias"] == 0.0
    assert not any(k.startswith(("cv/", "decisions/")) for k in metrics)  # no folds: no rule to fit elsewhere
    assert not (tmp_path / "eval" / "decisions.json").exists()


def test_cli_runs_and_reports_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs")
    assert main(["evaluate", "--cv", str(cv), "--no-umap"]) == 0
    out = capsys.readouterr().out
    assert "Bland-Altman" in out and "pooled balanced_accuracy" in out
    assert (cv / "eval" / "metrics.json").is_file()

    assert main(["evaluate", "--no-umap"]) == 2
    assert "give --cv" in capsys.readouterr().err
    assert main(["evaluate", "--cv", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "oof_predictions.csv not found" in err and "runs/<name>" in err
    assert main(["evaluate", "--predictions", "p.csv"]) == 2
    assert "--out" in capsys.readouterr().err


def test_counts_file_problems_name_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs")
    pd.DataFrame({"patient_id": ["P0"], "sample_type": ["BALF"], "neutrophil": [1]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    assert main(["evaluate", "--cv", str(cv), "--counts", str(tmp_path / "c.csv"), "--no-umap"]) == 1
    assert "c.csv: missing column(s) eosinophil" in capsys.readouterr().err
