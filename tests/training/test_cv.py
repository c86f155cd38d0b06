"""`leuko cv`: every dev cell predicted once by the model that never saw its patient; runs nested in MLflow."""

import json

import mlflow
import pandas as pd
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from leuko.cli import main
from leuko.training.cv import fold_seed_args


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
            "2",
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
    # each fold model starts from its own weights: fold k is seeded with the config's seed (0) + k
    seeds = [yaml.safe_load((out / f"fold_{k}" / "config.yaml").read_text())["seed_everything"] for k in (0, 1)]
    assert seeds == [0, 1]
    # the out-of-fold predictions come from the checkpoint each fold's row scored (best.ckpt, epoch 1 or 2)
    for fold, cells in oof.groupby("fold"):
        row = metrics.set_index("fold").loc[fold]
        assert balanced_accuracy_score(cells["label"], cells["pred_label"]) == pytest.approx(row["balanced_accuracy"])
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


@pytest.mark.slow
def test_cv_never_writes_into_another_cvs_folder(tiny_config, tmp_path, monkeypatch, capsys):
    """Two CVs started in the same second get two folders; an explicit --name that holds a CV is refused."""
    import time

    real, fixed = time.strftime, time.localtime()
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: real(fmt, fixed if t is None else t))  # one second
    monkeypatch.chdir(tmp_path)
    quick = ["--config", str(tiny_config), "--folds", "0", "--tracking.enabled", "false", "--out", "runs"]
    quick += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert main(["cv", *quick]) == 0
    (first,) = sorted((tmp_path / "runs").iterdir())
    metrics = (first / "cv_metrics.csv").read_text()
    assert main(["cv", *quick]) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and first in folders  # same second, another folder
    assert all((f / "cv_summary.json").is_file() for f in folders)
    assert (first / "cv_metrics.csv").read_text() == metrics
    capsys.readouterr()

    # an explicit name whose folder holds a CV: refused, naming the folder and the ways out
    before = sorted(p.relative_to(first) for p in first.rglob("*"))
    assert main(["cv", *quick, "--name", first.name]) == 1
    err = capsys.readouterr().err
    assert f"runs/{first.name} already holds a CV" in err and "--name" in err and "--replace" in err
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before
    # --replace: the old CV's folder is removed and the new CV written alone into it
    (first / "eval").mkdir()
    assert main(["cv", *quick, "--name", first.name, "--replace"]) == 0
    assert (first / "cv_summary.json").is_file() and not (first / "eval").exists()


def test_fold_seeds_offset_a_fixed_seed_and_leave_a_random_one_alone():
    assert fold_seed_args(7, 0) == ["--seed_everything", "7"]
    assert fold_seed_args(7, 3) == ["--seed_everything", "10"]
    assert fold_seed_args(True, 2) == [] and fold_seed_args(None, 2) == [] and fold_seed_args(False, 1) == []
