"""`leuko cv`: every dev cell predicted once by the model that never saw its patient; runs nested in MLflow."""

import json

import mlflow
import pandas as pd
import pytest

from leuko.cli import main


@pytest.mark.slow
def test_cv_writes_out_of_fold_predictions_and_nested_runs(
    tiny_config, tiny_prepared, tracking_uri, experiment, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "cv",
            "--config",
            str(tiny_config),
            "--name",
            "cvtest",
            "--out",
            str(tmp_path / "runs"),
            "--tracking.experiment",
            experiment,
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert code == 0
    out = tmp_path / "runs" / "cvtest"
    oof = pd.read_csv(out / "oof_predictions.csv")
    index = pd.read_csv(tiny_prepared / "index.csv")
    from leuko.data.folds import make_splits

    splits = make_splits(index, k=2, test_fraction=0.2, seed=0)
    dev = splits[splits["fold"] != "test"]
    assert sorted(oof["cell_id"]) == sorted(dev["cell_id"])  # each dev cell exactly once, no test cell
    fold_of = dict(zip(dev["cell_id"], dev["fold"].astype(int)))
    assert all(fold_of[c] == f for c, f in zip(oof["cell_id"], oof["fold"]))
    assert (oof.filter(like="prob_").sum(axis=1) - 1).abs().max() < 1e-5

    metrics = pd.read_csv(out / "cv_metrics.csv")
    summary = json.loads((out / "cv_summary.json").read_text())
    assert list(metrics["fold"]) == [0, 1]
    assert summary["balanced_accuracy"]["mean"] == pytest.approx(metrics["balanced_accuracy"].mean())
    assert summary["balanced_accuracy"]["std"] == pytest.approx(metrics["balanced_accuracy"].std(ddof=1))

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["leuko.fold"] for r in children) == ["0", "1"]
    assert parent.data.metrics["cv/balanced_accuracy_mean"] == pytest.approx(summary["balanced_accuracy"]["mean"])
    assert parent.data.params["model.net"] == "fishnet3d_tiny"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"oof_predictions.csv", "cv_metrics.csv", "confusion_matrix_oof.png", "config.yaml"} <= artifacts
    child_artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"checkpoints", "confusion_matrix_val_best.png"} <= child_artifacts
    assert all(r.info.status == "FINISHED" for r in runs)


def test_cv_rejects_unknown_fold(tiny_config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["cv", "--config", str(tiny_config), "--folds", "0,7", "--tracking.enabled", "false"])
    assert code == 1
    assert "[7]" in capsys.readouterr().err
