"""Classical and 2D MIP baselines on the same patient-grouped folds as `leuko cv`."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from leuko.cli import main
from leuko.data.folds import make_splits
from leuko.evaluation.baselines import (
    CLASSICAL,
    align,
    classical_cv,
    compare,
    cv_rows,
    feature_columns,
    format_table,
    log_baselines,
    metric_dict,
    scores,
    summarise,
    write_outputs,
)
from leuko.evaluation.mip import build_mip_net, fit_predict_mip, mip
from leuko.evaluation.morphology import FEATURES

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


def _features(n_patients=8, per_patient=15, separation=3.0, seed=0):
    """Feature table whose classes differ in volume and mean RI by `separation` sds."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for i in range(per_patient):
            k = rng.integers(len(CLASSES))
            values = rng.normal(0, 1, len(FEATURES))
            values[0] += separation * k
            values[5] += separation * (k % 2)
            rows.append(
                {
                    "cell_id": f"P{p}_{i}",
                    "patient_id": f"P{p}",
                    "label": CLASSES[k],
                    "sample_type": ["BALF", "blood"][p % 2],
                    "modality": "ri",
                    **dict(zip(FEATURES, values)),
                }
            )
    return pd.DataFrame(rows)


def test_scores_and_summary_use_the_sample_std():
    s = scores(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert s["accuracy"] == 0.75 and s["balanced_accuracy"] == 0.75
    per_fold = pd.DataFrame(
        {
            "method": "m",
            "key": "k",
            "input": "x",
            "fold": ["0", "1", "2"],
            "balanced_accuracy": [0.5, 0.6, 0.7],
            "accuracy": 0.5,
            "macro_f1": 0.4,
        }
    )
    row = summarise(per_fold).iloc[0]
    assert row["balanced_accuracy_mean"] == pytest.approx(0.6)
    assert row["balanced_accuracy_std"] == pytest.approx(0.1)  # ddof=1, as cv_summary.json
    assert row["n_folds"] == 3


def test_classical_models_learn_separable_features_on_patient_folds():
    features = _features()
    splits = make_splits(features, k=3, test_fraction=0.25, seed=0)
    folds = sorted(set(splits["fold"]) - {"test"})
    per_fold = classical_cv(features, splits, folds)
    assert sorted(set(per_fold["key"])) == sorted(k for k, _ in CLASSICAL)
    assert len(per_fold) == 5 * 3
    table = summarise(per_fold).set_index("key")
    assert (table["balanced_accuracy_mean"] > 0.8).all()  # 3-sd separation: every model gets it
    # knn5 uses k=5, and every model scales its inputs first
    from leuko.evaluation.baselines import classical_models

    models = classical_models()
    assert models["knn5"][-1].n_neighbors == 5
    assert all(type(m[0]).__name__ == "StandardScaler" for m in models.values())


def test_test_patients_are_never_used():
    features = _features()
    splits = make_splits(features, k=3, test_fraction=0.25, seed=0)
    test_ids = set(splits.loc[splits["fold"] == "test", "cell_id"])
    # poison the test cells: a model that trained on them would be wrecked
    poisoned = features.copy()
    poisoned.loc[poisoned["cell_id"].isin(test_ids), "label"] = "monocyte"
    poisoned.loc[poisoned["cell_id"].isin(test_ids), list(FEATURES)] = 1e6
    folds = sorted(set(splits["fold"]) - {"test"})
    a = classical_cv(features, splits, folds)
    b = classical_cv(poisoned, splits, folds)
    pd.testing.assert_frame_equal(a, b)


def test_feature_columns_drop_unmeasured_ri_features_and_reject_gaps():
    hhg = _features().assign(dry_mass_pg=np.nan, protein_density_g_dl=np.nan, mean_ri=np.nan)
    assert feature_columns(hhg) == ["volume_fl", "surface_area_um2", "sphericity"]
    gappy = _features()
    gappy.loc[3, "volume_fl"] = np.nan
    with pytest.raises(ValueError, match="volume_fl are missing for some cells"):
        feature_columns(gappy)
    with pytest.raises(ValueError, match="leuko features"):
        feature_columns(gappy.drop(columns="sphericity"))


def test_cells_without_features_are_named():
    features = _features()
    splits = make_splits(features, k=3, test_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match=r"2 cell\(s\) of the folds have no morphology features"):
        align(features.iloc[2:], splits)


def test_mip_is_the_maximum_along_z():
    volumes = np.zeros((2, 1, 4, 3, 3), np.float32)
    volumes[0, 0, 2, 1, 1] = 5.0
    volumes[1, 0, 0, 0, 2] = 2.0
    projected = mip(volumes)
    assert projected.shape == (2, 1, 3, 3)
    assert projected[0, 0, 1, 1] == 5.0 and projected[1, 0, 0, 2] == 2.0 and projected.sum() == 7.0
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        mip(volumes[0])


def test_mip_net_trains_and_predicts():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    x = rng.normal(0, 0.1, (40, 1, 16, 16)).astype(np.float32)
    x[y == 1, :, 4:12, 4:12] += 2.0  # class 1: a bright square
    pred = fit_predict_mip(x[:32], y[:32], x[32:], num_classes=2, epochs=2, batch_size=8)
    assert pred.shape == (8,) and set(pred) <= {0, 1}
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        build_mip_net("resnet_nope", in_chans=1, num_classes=2)


def test_compare_on_prepared_folds_matches_the_datamodule(tiny_cohort, tiny_prepared):
    from leuko.data.datamodule import LeukoDataModule
    from leuko.evaluation.morphology import features_table

    features = features_table(tiny_cohort, progress=False)
    table, per_fold, settings = compare(
        features, prepared_dir=tiny_prepared, k=2, test_fraction=0.2, seed=0, mip_epochs=1, progress=None
    )
    assert list(table["key"]) == [k for k, _ in CLASSICAL] + ["mip2d_resnet10t"]
    assert (table["n_folds"] == 2).all() and settings["folds"] == ["0", "1"]
    dm = LeukoDataModule(prepared_dir=str(tiny_prepared), k=2, test_fraction=0.2, seed=0, fold=0)
    assert settings["fold_source"] == "make_splits(k=2, test_fraction=0.2, seed=0)"
    assert len(dm.subset("val")) > 0
    text = format_table(table)
    assert "KNN (k=5)" in text and "±" in text and "2D resnet10t on MIP" in text


def test_cv_rows_and_logging(tmp_path):
    cv = tmp_path / "runs" / "mycv"
    (cv / "fold_0").mkdir(parents=True)
    (cv / "fold_0" / "config.yaml").write_text("model:\n  net: vit3d_tiny\n")
    pd.DataFrame(
        {
            "fold": [0, 1],
            "balanced_accuracy": [0.8, 0.9],
            "accuracy": [0.85, 0.95],
            "macro_f1": [0.7, 0.8],
            "loss": [0.5, 0.4],
        }
    ).to_csv(cv / "cv_metrics.csv", index=False)
    rows = cv_rows(cv)
    assert set(rows["method"]) == {"3D vit3d_tiny (mycv)"} and set(rows["key"]) == {"cv3d_vit3d_tiny_mycv"}
    table = summarise(rows)
    assert table.loc[0, "balanced_accuracy_mean"] == pytest.approx(0.85)

    write_outputs(tmp_path / "out", table, rows, {"seed": 0})
    assert json.loads((tmp_path / "out" / "baselines.json").read_text()) == {"seed": 0}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("b")).info.run_id
    log_baselines(client, run_id, tmp_path / "out", table)
    logged = client.get_run(run_id).data.metrics
    assert logged == pytest.approx(metric_dict(table))
    assert logged["baselines/cv3d_vit3d_tiny_mycv/balanced_accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert {"baselines/baselines.csv", "baselines/baselines_folds.csv"} <= {
        a.path for a in client.list_artifacts(run_id, "baselines")
    }
    with pytest.raises(ValueError, match="no cv_metrics.csv"):
        cv_rows(tmp_path)


def test_cli_needs_folds_and_features(tmp_path, monkeypatch, capsys, tiny_prepared):
    monkeypatch.chdir(tmp_path)
    assert main(["baselines", "--manifest", "m.csv"]) == 2
    assert "--cv runs/NAME" in capsys.readouterr().err
    assert main(["baselines", "--prepared", str(tiny_prepared), "--features", "missing.csv"]) == 2
    assert "missing.csv does not exist; give --manifest" in capsys.readouterr().err


def test_cli_on_prepared_data_without_the_mip_net(tiny_cohort, tiny_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "baselines",
                "--prepared",
                str(tiny_prepared),
                "--manifest",
                str(tiny_cohort),
                "--k",
                "2",
                "--no-mip",
                "--no-mlflow",
                "--quiet",
                "--out",
                "bl",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "SVM (RBF)" in out and "MIP" not in out
    assert (tmp_path / "bl" / "features.csv").is_file() and (tmp_path / "bl" / "baselines.csv").is_file()
    assert not (tmp_path / "mlflow.db").exists()
    # the features just written are reused when named with --features
    assert (
        main(
            [
                "baselines",
                "--prepared",
                str(tiny_prepared),
                "--features",
                "bl/features.csv",
                "--k",
                "2",
                "--no-mip",
                "--no-mlflow",
                "--out",
                "bl2",
            ]
        )
        == 0
    )
    assert "features from bl/features.csv" in capsys.readouterr().err
