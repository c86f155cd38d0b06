"""`leuko register --ensemble --tta`: the fold models of a CV as one registered model, its test report, and
the CVs it refuses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.sweep import write_base
from leuko.cli.app import main
from leuko.nets import build_net
from leuko.tracking.fold_ensemble import EnsembleError, _check_no_test_patients, held_out_report, table_lines
from leuko.tracking.registry import RegisterError, Source, print_summary, register
from leuko.training import run_dir

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_prepared):
    """A SQLite store, its artifacts and runs in one folder, and the tiny 2-fold config (vit3d_tiny, 1 epoch)."""
    folder = tmp_path_factory.mktemp("ensemble")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    base = write_base(folder, tiny_prepared)
    return {"folder": folder, "uri": uri, "base": base, "overrides": ["--tracking.uri", uri]}


@contextlib.contextmanager
def on_store(store):
    """Every MLflow URI on the store while it lasts, the process-wide ones included (register_model's fluent
    registry), and the artifacts (./mlruns) in its folder; afterwards nothing of it stays process-wide, neither
    the pinned URIs nor the MLFLOW_*_URI variables mlflow exports when they are set, which later tests would
    otherwise find."""
    mp = pytest.MonkeyPatch()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mp.chdir(store["folder"])
    mlflow.set_registry_uri(store["uri"])
    try:
        yield store
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)  # register pins it to the store
        mp.undo()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def pinned(store):
    with on_store(store):
        yield store


@pytest.fixture(scope="module")
def ensemble(store):
    """`leuko register --ensemble --tta flip` without --cv-dir: it runs the 2-fold CV itself first."""
    with on_store(store):
        source = Source(configs=[str(store["base"])], overrides=list(store["overrides"]))
        result = register(source, name="ens", out=store["folder"] / "runs", ensemble=True, tta="flip")
        client = mlflow.MlflowClient(store["uri"], registry_uri=store["uri"])
        where = client.get_model_version_download_uri("ens", result["version"])
        local = Path(mlflow.artifacts.download_artifacts(where, tracking_uri=store["uri"]))
    cv = next((store["folder"] / "runs").glob("register-*-cv"))
    return {"result": result, "local": local, "cv": cv, "client": client, **store}


def member_probabilities(cv: Path, config: dict, x: np.ndarray) -> np.ndarray:
    """(members, N, classes): softmax(logits / T) of each fold's best checkpoint, built here from its file."""
    temperature = config["calibration"]["temperature"]
    out = []
    for fold in ("0", "1"):
        state = run_dir.load_checkpoint(run_dir.checkpoint(cv, fold))["state_dict"]
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["net_kwargs"].items()}
        net = build_net(config["net"], in_channels=1, num_classes=len(CLASSES), **kwargs).eval()
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        with torch.no_grad():
            out.append((net(torch.from_numpy(x)) / temperature).softmax(-1).numpy())
    return np.stack(out)


@pytest.mark.slow
def test_the_ensemble_is_registered_with_its_members_tta_and_test_report(ensemble):
    result, client, local = ensemble["result"], ensemble["client"], ensemble["local"]
    config = json.loads((local / "artifacts" / "model_config.json").read_text())
    assert config["ensemble"]["weights"] == ["weights", "weights_1"] and config["ensemble"]["folds"] == ["0", "1"]
    assert config["tta"] == "flip" and Path(config["ensemble"]["cv_dir"]) == ensemble["cv"]
    assert {"weights.safetensors", "weights_1.safetensors"} <= {p.name for p in (local / "artifacts").iterdir()}
    # calibrated on the fold models' own out-of-fold cells
    assert str(ensemble["cv"]) in config["calibration"]["fitted_on"]

    rows = result["comparison"]
    assert [r["model"] for r in rows] == [
        "fold model alone, mean of 2",
        "fold model alone, min of 2",
        "fold model alone, max of 2",
        "ensemble of 2",
        "ensemble of 2 + TTA flip (registered)",
    ]
    assert rows[1]["balanced_accuracy"] <= rows[0]["balanced_accuracy"] <= rows[2]["balanced_accuracy"]
    assert result["score"] == rows[-1]["balanced_accuracy"] == result["test"]["balanced_accuracy"]

    version = client.get_model_version("ens", result["version"])
    assert float(version.tags["leuko.score"]) == pytest.approx(result["score"], abs=1e-6)
    assert "ensemble of 2 vit3d_tiny fold models" in version.description
    assert "test-time augmentation flip (8 views averaged)" in version.description
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    for stat in ("single_mean", "single_min", "single_max", "ensemble", "ensemble_tta"):
        assert f"test/{stat}_balanced_accuracy" in metrics
    assert metrics["test/balanced_accuracy"] == pytest.approx(result["score"])
    assert metrics["test/ensemble_balanced_accuracy"] == pytest.approx(rows[3]["balanced_accuracy"])
    assert run.data.params["data.fold"] == "None" and run.info.status == "FINISHED"
    card = (local / "artifacts" / "MODEL_CARD.md").read_text()
    assert "ensemble of 2 vit3d_tiny fold models (folds 0, 1 of a 2-fold CV" in card


@pytest.mark.slow
def test_the_loaded_model_averages_its_members_and_flips(ensemble, tiny_prepared):
    local = ensemble["local"]
    config = json.loads((local / "artifacts" / "model_config.json").read_text())
    model = mlflow.pyfunc.load_model(str(local))
    x = np.load(tiny_prepared / "volumes.npy", mmap_mode="r")[:5].astype(np.float32)  # (5, 1, 16, 16, 16)
    got = model.predict(x, params={"preprocess": False}).filter(like="prob_").to_numpy()

    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    views = [member_probabilities(ensemble["cv"], config, np.flip(x, f).copy() if f else x) for f in flips]
    assert np.abs(got - np.mean(views, axis=(0, 1))).max() < 1e-5
    # the TTA is what makes it invariant: each member alone is not, the registered model is
    alone = views[0]
    for axis in (2, 3, 4):
        flipped = np.flip(x, axis).copy()
        assert np.abs(member_probabilities(ensemble["cv"], config, flipped) - alone).max() > 1e-4
        again = model.predict(flipped, params={"preprocess": False}).filter(like="prob_").to_numpy()
        assert np.abs(again - got).max() < 1e-5


@pytest.mark.slow
def test_a_given_cv_dir_is_used_as_it_is(ensemble, pinned):
    """--cv-dir: no new CV; without TTA the report stops at the ensemble."""
    before = sorted(p.name for p in (pinned["folder"] / "runs").iterdir())
    source = Source(configs=[str(pinned["base"])], overrides=list(pinned["overrides"]))
    result = register(source, name="ens-given", out=pinned["folder"] / "runs", ensemble=True, cv_dir=ensemble["cv"])
    after = sorted(p.name for p in (pinned["folder"] / "runs").iterdir())
    assert [n for n in after if n not in before and n.endswith("-cv")] == []
    assert [r["model"] for r in result["comparison"]][-1] == "ensemble of 2 (registered)"
    # the same members and temperature: the ensemble row of the TTA register, now the registered score
    assert result["score"] == pytest.approx(ensemble["result"]["comparison"][3]["balanced_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_prevalence_decisions_ship_class_biases_fitted_on_the_cvs_out_of_fold_cells(ensemble, pinned, tiny_prepared):
    """--decisions prevalence: the model config holds (T, b) of bias-corrected temperature scaling on the CV's
    out-of-fold table; the loaded model returns the members' softmax(logits / T + b), and the registered score
    is that model's balanced accuracy on the held-out test patients."""
    from sklearn.metrics import balanced_accuracy_score

    from leuko.data.folds import TEST, make_splits
    from leuko.evaluation.calibration import fit_bias_corrected, label_indices

    source = Source(configs=[str(pinned["base"])], overrides=list(pinned["overrides"]))
    runs = pinned["folder"] / "runs"
    result = register(source, name="ens-prev", out=runs, ensemble=True, cv_dir=ensemble["cv"], decisions="prevalence")
    client = mlflow.MlflowClient(pinned["uri"], registry_uri=pinned["uri"])
    where = client.get_model_version_download_uri("ens-prev", result["version"])
    local = Path(mlflow.artifacts.download_artifacts(where, tracking_uri=pinned["uri"]))
    config = json.loads((local / "artifacts" / "model_config.json").read_text())
    oof = pd.read_csv(ensemble["cv"] / run_dir.OOF, dtype={"label": str})
    temperature, bias = fit_bias_corrected(oof[[f"prob_{c}" for c in CLASSES]].to_numpy(), label_indices(oof, CLASSES))
    assert config["calibration"]["temperature"] == pytest.approx(temperature)
    assert np.allclose([config["calibration"]["bias"][c] for c in CLASSES], bias)
    assert "Bias-corrected temperature scaling" in (local / "artifacts" / "MODEL_CARD.md").read_text()

    index = pd.read_csv(tiny_prepared / "index.csv", dtype=str)
    splits = make_splits(index, k=2, test_fraction=0.2, seed=0)  # helpers.sweep.write_base's data settings
    test = index.set_index("cell_id").loc[splits.loc[splits["fold"] == TEST, "cell_id"]]
    x = np.load(tiny_prepared / "volumes.npy", mmap_mode="r")[test["row"].astype(int).to_numpy()].astype(np.float32)
    got = mlflow.pyfunc.load_model(str(local)).predict(x, params={"preprocess": False}).filter(like="prob_")
    members = member_probabilities(ensemble["cv"], config, x)  # softmax(logits / T): log of it + b is logits / T + b
    expected = torch.from_numpy(np.log(members) + bias).softmax(-1).numpy().mean(0)
    assert np.abs(got.to_numpy() - expected).max() < 1e-5
    labels = [CLASSES.index(label) for label in test["label"]]
    assert result["score"] == pytest.approx(balanced_accuracy_score(labels, expected.argmax(1)), abs=1e-6)


def test_prevalence_decisions_without_a_cv_are_refused_before_a_refit(tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(RegisterError, match=r"--decisions prevalence: .* pass --cv DIR .* or --ensemble"):
        register(Source(configs=["conf/experiment/phantoms_tiny.yaml"], overrides=[]), out=out, decisions="prevalence")
    assert not out.exists() or not list(out.iterdir())
    no_oof = Source(configs=["conf/experiment/phantoms_tiny.yaml"], overrides=[], cv_dir=str(tmp_path))
    with pytest.raises(RegisterError, match=f"and {tmp_path} has no oof_predictions.csv; pass --cv DIR"):
        register(no_oof, out=out, decisions="prevalence")
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(SystemExit):
        main(["register", "--config", "x.yaml", "--decisions", "argmax"])
    assert "invalid choice: 'argmax' (choose from 'balanced', 'prevalence')" in capsys.readouterr().err


@pytest.mark.slow
def test_cv_dirs_that_cannot_form_the_ensemble_are_refused(ensemble, pinned, tmp_path):
    source = Source(configs=[str(pinned["base"])], overrides=list(pinned["overrides"]))
    out = tmp_path / "runs"
    partial = tmp_path / "partial"
    shutil.copytree(ensemble["cv"], partial)
    run_dir.checkpoint(partial, 1).unlink()
    with pytest.raises(EnsembleError, match=r"needs all 2 folds \(0, 1\), but fold\(s\) 1 have no best checkpoint"):
        register(source, out=out, ensemble=True, cv_dir=partial)
    with pytest.raises(EnsembleError, match="no such folder"):
        register(source, out=out, ensemble=True, cv_dir=tmp_path / "missing")
    other_net = Source(configs=[str(pinned["base"])], overrides=[*pinned["overrides"], "--model.net", "fishnet3d_tiny"])
    with pytest.raises(EnsembleError, match="model net is 'vit3d_tiny', but the config being registered has 'fishnet"):
        register(other_net, out=out, ensemble=True, cv_dir=ensemble["cv"])
    other_split = Source(configs=[str(pinned["base"])], overrides=[*pinned["overrides"], "--data.seed", "3"])
    with pytest.raises(EnsembleError, match="data.seed is 0, but the config being registered has 3"):
        register(other_split, out=out, ensemble=True, cv_dir=ensemble["cv"])
    with pytest.raises(RegisterError, match="add --ensemble"):
        register(source, out=out, cv_dir=ensemble["cv"])
    assert out.is_dir() and not list(out.iterdir())  # no empty register-<time> folder left by a refusal


@pytest.mark.slow
def test_a_refit_with_tta_is_scored_with_it(pinned):
    source = Source(configs=[str(pinned["base"])], overrides=list(pinned["overrides"]))
    result = register(source, name="refit-tta", out=pinned["folder"] / "runs", tta="flip")
    assert [r["model"] for r in result["comparison"]] == ["refit alone", "refit + TTA flip (registered)"]
    assert result["score"] == result["comparison"][1]["balanced_accuracy"]
    client = mlflow.MlflowClient(pinned["uri"], registry_uri=pinned["uri"])
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["test/single_tta_balanced_accuracy"] == pytest.approx(result["score"])
    assert "test/single_balanced_accuracy" in metrics


# ---------------------------------------------------------------------------------------------- fast
def test_cli_refuses_cv_dir_without_ensemble_and_unknown_tta(tmp_path, capsys):
    assert main(["register", "--config", "x.yaml", "--cv-dir", str(tmp_path)]) == 2
    assert "add --ensemble" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["register", "--config", "x.yaml", "--tta", "rot"])
    assert "invalid choice: 'rot'" in capsys.readouterr().err


def test_the_report_compares_members_ensemble_and_tta():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)  # 20 cells
    terms = rng.dirichlet(np.ones(4), size=(8, 3, 20)).astype(np.float32)  # (views, members, N, classes)
    terms[:, 0, np.arange(20), labels] += 2.0  # member 0 is right about every cell
    terms /= terms.sum(-1, keepdims=True)
    report = held_out_report(terms, labels, CLASSES, "flip")
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["fold model alone, max of 3"]["balanced_accuracy"] == 1.0
    assert rows["fold model alone, min of 3"]["balanced_accuracy"] < 0.6
    assert report["metrics"]["test/ensemble_tta_balanced_accuracy"] == report["test"]["balanced_accuracy"]
    np.testing.assert_allclose(report["probs"], terms.mean(axis=(0, 1)), atol=1e-6)
    assert list(rows)[-1] == "ensemble of 3 + TTA flip (registered)"
    assert {f"recall_{c}" for c in CLASSES} <= set(report["test"])


def test_print_summary_shows_the_comparison_and_baselines(capsys):
    result = {
        "name": "leuko",
        "version": "3",
        "run_id": "abc",
        "metric": "balanced_accuracy",
        "score": 0.9,
        "cv": {},
        "alias": "champion",
        "reason": "no champion yet",
        "tracking_uri": "sqlite:///mlflow.db",
        "comparison": [
            {"model": "fold model alone, mean of 5", "balanced_accuracy": 0.8},
            {"model": "ensemble of 5 (registered)", "balanced_accuracy": 0.9},
        ],
        "baselines": [
            {"method": "svm", "balanced_accuracy": 0.71, "accuracy": 0.75},
            {"method": "mip_2d", "balanced_accuracy": 0.78},
        ],
    }
    print_summary(result)
    out = capsys.readouterr().out
    assert re.search(r"\n    ensemble of 5 \(registered\) +0\.9000\n", out)
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("method"))
    assert header.split() == ["method", "balanced_accuracy", "accuracy"]
    assert next(line for line in lines if line.strip().startswith("svm")).split() == ["svm", "0.7100", "0.7500"]
    assert next(line for line in lines if line.strip().startswith("mip_2d")).split() == ["mip_2d", "0.7800"]
    print_summary({**result, "comparison": None, "baselines": None})
    assert "method" not in capsys.readouterr().out


def test_table_lines_align_columns():
    lines = table_lines([{"m": "a", "x": 0.5}, {"m": "long name", "x": 1.0, "y": "z"}], "m")
    assert lines[0].split() == ["m", "x", "y"] and len({len(line) for line in lines}) == 1


def test_a_cv_that_trained_on_a_test_patient_is_refused(tmp_path):
    pd.DataFrame({"cell_id": ["a", "b"], "patient_id": ["P01", "P02"]}).to_csv(tmp_path / run_dir.OOF, index=False)
    datamodule = SimpleNamespace(subset=lambda name: pd.DataFrame({"patient_id": ["P05", "P06"]}))
    _check_no_test_patients(tmp_path, datamodule)  # disjoint: accepted
    datamodule = SimpleNamespace(subset=lambda name: pd.DataFrame({"patient_id": ["P02", "P06"]}))
    with pytest.raises(EnsembleError, match="its fold models trained on patient\\(s\\) P02, which this register"):
        _check_no_test_patients(tmp_path, datamodule)
