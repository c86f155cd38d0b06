"""`leuko report`: one self-contained HTML page whose numbers are the ones logged to MLflow."""

from __future__ import annotations

import json
import re
from importlib import resources

import mlflow
import pandas as pd
import pytest

from helpers.evaluation import fake_cv
from leuko.cli import main
from leuko.evaluation.baselines import log_baselines, metric_dict, summarise, write_outputs
from leuko.evaluation.evaluate import evaluate, load_cv
from leuko.evaluation.report import write_report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-report') / 'mlflow.db'}"


def _numbers(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="leuko-numbers">(.*?)</script>', html, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def _baselines(cv, client, run_id):
    per_fold = pd.DataFrame(
        [
            {
                "method": m,
                "key": k,
                "input": "6 morphology features",
                "fold": str(f),
                "balanced_accuracy": 0.5 + 0.1 * f,
                "accuracy": 0.6,
                "macro_f1": 0.4 + 0.01 * f,
            }
            for k, m in (("svm", "SVM (RBF)"), ("lda", "LDA"))
            for f in range(3)
        ]
    )
    table = summarise(per_fold)
    write_outputs(cv / "baselines", table, per_fold, {"mip_net": None})
    log_baselines(client, run_id, cv / "baselines", table)
    return table


@pytest.fixture(scope="module")
def reported(tmp_path_factory, store):
    """A logged CV, evaluated, with baselines: (cv folder, run id, html of the folder report)."""
    root = tmp_path_factory.mktemp("report")
    cv = fake_cv(root / "runs", tracking_uri=store, name="rep")
    evaluate(load_cv(cv), cv / "eval", umap=False)
    run_id = (cv / "mlflow_run_id").read_text().strip()
    _baselines(cv, mlflow.MlflowClient(store), run_id)
    result = write_report(str(cv), cv / "report.html")
    return cv, run_id, (cv / "report.html").read_text(), result


def test_the_template_is_package_data():
    assert resources.files("leuko.evaluation").joinpath("report_template.html").is_file()


def test_report_is_self_contained_with_every_section(reported):
    _, _, html, result = reported
    assert result["has_eval"] and result["has_baselines"]
    for title in (
        "Metrics across folds",
        "Confusion matrix and per-class recall",
        "Bland-Altman per class",
        "3D networks beside classical and 2D baselines",
        "Learning curves",
        "Provenance",
    ):
        assert title in html
    assert "http://" not in html and "https://" not in html  # no external assets, scripts or fonts
    assert "<link" not in html and "<script src" not in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) >= 4  # confusion, Bland-Altman, bars, curves


def test_numbers_shown_match_mlflow(reported, store):
    cv, run_id, html, result = reported
    logged = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    numbers = _numbers(html)
    assert result["mismatches"] == [] and result["checked"] == len(numbers)
    for key, value in numbers.items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    # the same numbers as printed in the tables
    assert f"{logged['cv/balanced_accuracy_mean']:.3f}" in html
    assert f"{logged['cv/balanced_accuracy_std']:.3f}" in html
    assert f"{logged['oof/balanced_accuracy']:.3f}" in html
    for c in ("neutrophil", "monocyte"):
        assert f"{logged[f'ba/{c}/bias']:.2f}" in html and f"{logged[f'ba/{c}/loa_low']:.2f}" in html
    table = pd.read_csv(cv / "baselines" / "baselines.csv")
    assert set(metric_dict(table)) <= set(numbers)
    assert (
        f"{logged['baselines/svm/balanced_accuracy_mean']:.3f} ± {logged['baselines/svm/balanced_accuracy_std']:.3f}"
        in html
    )
    assert "match the metrics logged to run" in html


def test_report_from_the_mlflow_run_id_shows_the_same_numbers(reported, tmp_path, monkeypatch, store):
    _, run_id, html, _ = reported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = write_report(run_id, tmp_path / "from_run.html")
    assert _numbers((tmp_path / "from_run.html").read_text()) == _numbers(html)
    assert result["has_eval"] and result["has_baselines"] and result["mismatches"] == []


def test_a_changed_number_is_flagged(tmp_path, store):
    cv = fake_cv(tmp_path / "runs", tracking_uri=store, name="drift", seed=3)
    evaluate(load_cv(cv), cv / "eval", umap=False)
    summary = json.loads((cv / "cv_summary.json").read_text())
    summary["accuracy"]["mean"] += 0.01  # the file no longer says what was logged
    (cv / "cv_summary.json").write_text(json.dumps(summary))
    result = write_report(str(cv), tmp_path / "r.html")
    assert [m.split(":")[0] for m in result["mismatches"]] == ["cv/accuracy_mean"]
    assert "differ from MLflow run" in (tmp_path / "r.html").read_text()


def test_a_cv_folder_without_eval_is_evaluated_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs", name="plain")
    assert main(["report", "--run", str(cv)]) == 0
    out = capsys.readouterr()
    assert (cv / "eval" / "metrics.json").is_file() and (cv / "report.html").is_file()
    assert "no baselines for this run" in out.err
    html = (cv / "report.html").read_text()
    assert "leuko baselines --cv" in html and "not checked against logged metrics" in html


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--run", str(tmp_path)]) == 1
    assert "no cv_summary.json" in capsys.readouterr().err
    assert main(["report", "--run", "0123456789abcdef"]) == 1
    assert "no MLflow store" in capsys.readouterr().err


@pytest.mark.slow
def test_cv_features_baselines_report_end_to_end(tiny_cohort, tiny_prepared, tmp_path, monkeypatch, capsys):
    """The issue's "done when": after `leuko cv`, `features`, `baselines` and `report` give one page with the
    3D model, the classical and 2D baselines side by side, Bland-Altman per class and the UMAP."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"seed_everything: 0\nmodel:\n  net: fishnet3d_tiny\n  lr: 0.003\n  warmup_epochs: 0.5\n"
        f"data:\n  prepared_dir: {tiny_prepared}\n  k: 2\n  test_fraction: 0.2\n  batch_size: 8\n  num_workers: 0\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n  max_epochs: 2\n  log_every_n_steps: 1\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
    )
    assert main(["cv", "--config", str(config), "--name", "e2e", "--out", "runs"]) == 0
    cv = tmp_path / "runs" / "e2e"
    assert main(["features", "--manifest", str(tiny_cohort), "--out", "features.csv", "--quiet"]) == 0
    assert main(["baselines", "--cv", str(cv), "--features", "features.csv", "--mip-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3D fishnet3d_tiny (e2e)" in printed and "KNN (k=5)" in printed and "2D resnet10t on MIP" in printed
    assert main(["report", "--run", str(cv), "--out", "report.html"]) == 0
    assert "all match" in capsys.readouterr().out

    html = (tmp_path / "report.html").read_text()
    for piece in (
        "3D fishnet3d_tiny (e2e)",
        "SVM (RBF)",
        "2D resnet10t on MIP",
        "UMAP by class",
        "UMAP by patient",
        "Bland-Altman plots per class",
    ):
        assert piece in html
    run_id = (cv / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(uri)
    logged = client.get_run(run_id).data.metrics
    for key, value in _numbers(html).items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    fold_run = (cv / "fold_0" / "mlflow_run_id").read_text().strip()
    assert {"embedding/umap_class.png", "embedding/umap_patient.png"} <= {
        a.path for a in client.list_artifacts(fold_run, "embedding")
    }
