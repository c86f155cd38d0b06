"""What a registered model stores to be trusted: temperature, review threshold, hashed training patients; and
how `leuko predict` applies them (calibrated probabilities, uncertainty, review, seen_patient)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.evaluation import CLASSES, fake_cv
from helpers.sweep import registered_model
from leuko.cli.app import main
from leuko.data.folds import TEST, make_splits
from leuko.deploy.trust import add_trust_columns, seen_patients, training_patients, trust_config
from leuko.evaluation.review import predictive_entropy
from leuko.training.predictions import prob_columns, probability_table


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_prepared):
    return registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)


def test_training_patients_are_salted_hashes_that_match_only_those_patients():
    stored = training_patients(["P01", "P02 ", "P02"])
    assert stored["n_patients"] == 2 and len(stored["sha256"]) == 2 and len(stored["salt"]) == 32
    assert "P01" not in json.dumps(stored)
    assert seen_patients(pd.Series(["P01", " P02", "P03", "p01"]), stored).tolist() == [True, True, False, False]
    again = training_patients(["P01", "P02"])
    assert again["salt"] != stored["salt"] and not set(again["sha256"]) & set(stored["sha256"])


def test_trust_config_fits_on_a_cvs_out_of_fold_cells_or_says_why_not(tmp_path, capsys):
    alone = trust_config(None, CLASSES, ["P1"])
    assert set(alone) == {"training_patients"}
    assert "registered without a temperature or review threshold" in capsys.readouterr().err
    cv = fake_cv(tmp_path / "runs", error=0.1)
    config = trust_config(cv, CLASSES, ["P1"])
    assert config["calibration"]["temperature"] < 1.0  # the fake CV is under-confident
    assert config["calibration"]["ece_after"] < config["calibration"]["ece_before"]
    assert "per_class" not in config["calibration"]
    assert config["review"]["target_accuracy"] == 0.99 and config["review"]["uncertainty"] == "entropy"
    assert "T = " in capsys.readouterr().err


def test_predict_columns_follow_what_the_model_stores(capsys):
    probs = np.array([[0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1], [0.25] * 4])
    table = probability_table(probs, CLASSES, cell_id=["a", "b", "c"], patient_id=["P1", "P2", "P1"])
    config = {"review": {"threshold": 0.5}, "training_patients": training_patients(["P1"])}
    result = add_trust_columns(table, config, CLASSES, "m")
    assert table["uncertainty"].to_numpy() == pytest.approx(predictive_entropy(probs))
    assert table["review"].tolist() == [False, True, True]
    assert table["seen_patient"].tolist() == [True, False, True]
    assert result == {"n_review": 2, "n_seen_patient": 2}
    assert "2 of 3 cells come from patients m was trained on (P1)" in capsys.readouterr().err
    bare = probability_table(probs, CLASSES, cell_id=["a", "b", "c"])
    assert add_trust_columns(bare, {}, CLASSES, "old") == {"n_review": None, "n_seen_patient": None}
    assert list(bare.columns) == ["cell_id", "pred_label", *prob_columns(CLASSES)]  # as before
    err = capsys.readouterr().err
    assert "without a review threshold" in err and "does not record its training patients" in err


def _training_patients(tiny_prepared: Path) -> set[str]:
    """The patients the register refit trained on: every non-test patient of the config's split."""
    index = pd.read_csv(tiny_prepared / "index.csv", dtype=str)
    splits = make_splits(index, k=2, test_fraction=0.2, seed=0)  # helpers.sweep.write_base's data settings
    train = index.set_index("cell_id").loc[splits.loc[splits["fold"] != TEST, "cell_id"], "patient_id"]
    return set(train)


@pytest.mark.slow
def test_a_registered_model_is_calibrated_flags_cells_and_knows_its_patients(
    registry, tiny_cohort, tiny_prepared, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    mlflow.set_tracking_uri(registry["tracking_uri"])
    impl = mlflow.pyfunc.load_model("models:/leuko@champion").unwrap_python_model()
    config = impl.config
    assert "out-of-fold cells of" in config["calibration"]["fitted_on"]  # the trial's CV
    assert impl.temperature == config["calibration"]["temperature"] > 0
    trained = _training_patients(tiny_prepared)
    assert config["training_patients"]["n_patients"] == len(trained)
    assert not any(p in json.dumps(config) for p in trained)  # hashes only
    # the net's logits divided by T, then the softmax
    volumes = np.load(tiny_prepared / "volumes.npy", mmap_mode="r")
    x = np.array(volumes[:8], dtype=np.float32)
    with torch.inference_mode():
        logits = impl.net(torch.from_numpy(x).to(impl.device)).float().cpu()
    expected = (logits / impl.temperature).softmax(-1).numpy()
    assert np.allclose(impl.predict_proba(x), expected, atol=1e-6)

    out = tmp_path / "p.csv"
    assert main(["predict", "--model", "models:/leuko@champion", "--input", str(tiny_cohort), "--out", str(out)]) == 0
    cells = pd.read_csv(out, dtype={"patient_id": str})
    held_out = set(cells["patient_id"]) - trained
    assert held_out and trained <= set(cells["patient_id"])
    assert cells["seen_patient"].tolist() == cells["patient_id"].isin(trained).tolist()
    err = capsys.readouterr().err
    assert f"{cells['seen_patient'].sum()} of {len(cells)} cells come from patients" in err
    assert cells["uncertainty"].to_numpy() == pytest.approx(
        predictive_entropy(cells[prob_columns(CLASSES)].to_numpy()), abs=1e-9
    )
    threshold = config["review"]["threshold"]
    flagged = np.ones(len(cells), bool) if threshold is None else cells["uncertainty"].to_numpy() > threshold
    assert cells["review"].tolist() == flagged.tolist()

    diff = pd.read_csv(tmp_path / "p_differential.csv", dtype={"patient_id": str})
    assert diff["n_review"].tolist() == cells.groupby(["patient_id", "sample_type"])["review"].sum().tolist()
    retained = diff[[f"retained_{c}" for c in CLASSES]]
    some = (diff["n_review"] < diff["n_cells"]).to_numpy()
    assert np.allclose(retained[some].sum(axis=1), 100.0) and retained[~some].isna().all(axis=None)


@pytest.mark.slow
def test_a_model_without_the_trust_settings_predicts_as_before(registry, tiny_cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    mlflow.set_tracking_uri(registry["tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts("models:/leuko@champion", dst_path=str(tmp_path / "old")))
    config_path = folder / "artifacts" / "model_config.json"
    config = json.loads(config_path.read_text())
    for key in ("calibration", "review", "training_patients"):
        config.pop(key)
    config_path.write_text(json.dumps(config))
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), "--input", str(tiny_cohort), "--out", str(out), "--quiet"]) == 0
    cells = pd.read_csv(out)
    assert not {"uncertainty", "review", "seen_patient"} & set(cells.columns)
    assert not any(c.startswith("n_review") or "retained" in c for c in pd.read_csv(tmp_path / "p_differential.csv"))
    err = capsys.readouterr().err
    assert "without a review threshold" in err and "does not record its training patients" in err
    impl = mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()
    assert impl.temperature == 1.0


def test_out_of_fold_predictions_of_other_classes_are_refused_by_name(tmp_path):
    from leuko.deploy.trust import TrustError

    cv = fake_cv(tmp_path / "runs")
    with pytest.raises(TrustError, match=r"lacks prob_basophil.*same config"):
        trust_config(cv, [*CLASSES, "basophil"], ["P1"])


def test_prevalence_decisions_store_class_biases_fitted_with_the_temperature(tmp_path, capsys):
    from leuko.deploy.trust import TrustError
    from leuko.evaluation.calibration import fit_bias_corrected, label_indices, scale

    cv = fake_cv(tmp_path / "runs", error=0.1)
    config = trust_config(cv, CLASSES, ["P1"], decisions="prevalence")
    cells = pd.read_csv(cv / "oof_predictions.csv", dtype={"label": str})
    probs, labels = cells[prob_columns(CLASSES)].to_numpy(), label_indices(cells, CLASSES)
    temperature, bias = fit_bias_corrected(probs, labels)
    calibration = config["calibration"]
    assert calibration["temperature"] == pytest.approx(temperature)
    assert list(calibration["bias"]) == CLASSES and np.allclose(list(calibration["bias"].values()), bias)
    assert calibration["decisions"] == "prevalence" and calibration["bias"]["neutrophil"] == 0.0
    assert config["review"]["fitted_on"].endswith("scaled by T and the class biases")
    assert "(class biases neutrophil +0.00, eosinophil" in capsys.readouterr().err
    assert "bias" not in trust_config(cv, CLASSES, ["P1"])["calibration"]
    assert np.allclose(scale(probs, temperature, bias).sum(1), 1.0)
    with pytest.raises(TrustError, match=r"--decisions prevalence: .* and this model has none; pass --cv DIR"):
        trust_config(None, CLASSES, ["P1"], decisions="prevalence")
    with pytest.raises(TrustError, match=r"missing/oof_predictions.csv is not there"):
        trust_config(tmp_path / "missing", CLASSES, ["P1"], decisions="prevalence")
    cells[cells["label"] != "eosinophil"].to_csv(cv / "oof_predictions.csv", index=False)  # a class without cells
    with pytest.raises(TrustError, match=r"oof_predictions.csv: no cells of class\(es\) eosinophil among the"):
        trust_config(cv, CLASSES, ["P1"], decisions="prevalence")
