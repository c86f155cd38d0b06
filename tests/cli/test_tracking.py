"""`leuko register`'s baselines on the same held-out test patients: computed from the sweep file, logged to the run."""

from __future__ import annotations

import mlflow
import pytest

from helpers.sweep import write_base, write_space
from leuko.cli.tracking import _heldout_baselines


@pytest.mark.slow
def test_register_reports_and_logs_the_sweep_files_baselines(tmp_path, tiny_cohort, tiny_prepared, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    base = write_base(tmp_path, tiny_prepared)
    data = {"prepared_dir": str(tiny_prepared), "k": 2, "test_fraction": 0.2, "seed": 0}
    result = {"tracking_uri": uri, "run_id": run_id, "data": data}

    plain = write_space(tmp_path, base, study="nb", name="plain.yaml")
    assert _heldout_baselines(str(plain), result, None) is None  # the sweep file names none

    space = write_space(tmp_path, base, study="wb", baselines={"manifest": str(tiny_cohort), "mip_epochs": 1})
    rows = _heldout_baselines(str(space), result, None)
    assert [r["method"] for r in rows][-1] == "2D resnet10t on MIP"
    logged = client.get_run(run_id).data.metrics
    assert logged["baseline/naive_bayes/balanced_accuracy"] == pytest.approx(rows[3]["balanced_accuracy"])
    assert (tmp_path / "sweeps" / "wb" / "heldout_baselines.csv").is_file()  # cached beside the sweep's outputs
    # a sweep run with --out elsewhere: register finds and reuses the table cached in that sweep's folder
    elsewhere = tmp_path / "elsewhere" / "wb"
    elsewhere.mkdir(parents=True)
    cached = (tmp_path / "sweeps" / "wb" / "heldout_baselines.csv").read_text()
    (elsewhere / "heldout_baselines.csv").write_text(cached.replace("naive Bayes", "naive Bayes (cached)"))
    for meta in (tmp_path / "sweeps" / "wb").glob("heldout_baselines*.json"):
        (elsewhere / meta.name).write_text(meta.read_text())
    again = _heldout_baselines(str(space), result, elsewhere)
    assert [r["method"] for r in again] == [r["method"].replace("naive Bayes", "naive Bayes (cached)") for r in rows]
