"""`leuko register`: refit on all non-test patients, test once, log a models-from-code pyfunc, register
it, and alias it champion only when it beats the current champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from helpers.sweep import registered_model
from leuko.tracking.registry import CHALLENGER, CHAMPION, RegisterError, Source, decide, register, source_from_study


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_prepared):
    registry = registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)
    # models:/ URIs and clients without registry_uri resolve the registry from the process-wide setting, which an
    # earlier test in the session may have pointed elsewhere: pin it to this store while these tests run
    mlflow.set_registry_uri(registry["tracking_uri"])
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it: keep it from the subprocesses below
    yield registry
    mlflow.set_registry_uri(None)


def test_decide_champion_only_when_strictly_better():
    assert decide(0.7, None, None, "balanced_accuracy")[0] == CHAMPION
    assert decide(0.8, "3", 0.7, "balanced_accuracy") == (
        CHAMPION,
        "test balanced_accuracy 0.8000 > 0.7000 of champion v3",
    )
    assert decide(0.7, "3", 0.7, "balanced_accuracy")[0] == CHALLENGER  # a tie keeps the champion
    assert decide(0.6, "3", 0.7, "balanced_accuracy")[0] == CHALLENGER
    alias, reason = decide(0.9, "3", None, "balanced_accuracy")
    assert alias == CHALLENGER and "no recorded leuko.score" in reason


def test_register_without_a_study_says_what_to_run(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(
        yaml.safe_dump({"study": "none", "config": ["x.yaml"], "space": {"model.lr": {"low": 0.001, "high": 0.01}}})
    )
    with pytest.raises(RegisterError, match="run `leuko sweep --space"):
        source_from_study(space, storage=str(tmp_path / "none.journal"))


def test_register_with_tracking_off_is_refused_and_leaves_no_folder(tiny_prepared, tmp_path):
    from helpers.sweep import write_base

    base = write_base(tmp_path, tiny_prepared)
    with pytest.raises(RegisterError, match="tracking is off .*registering needs MLflow"):
        register(Source(configs=[str(base)], overrides=["--tracking.enabled", "false"]), out=tmp_path / "runs")
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_best_trial_is_refit_tested_logged_and_champion(registry):
    result, uri = registry["result"], registry["tracking_uri"]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("leuko", result["version"])
    assert str(client.get_model_version_by_alias("leuko", "champion").version) == str(version.version)
    assert version.tags["leuko.decision"].startswith("champion: no champion yet")
    assert float(version.tags["leuko.score"]) == pytest.approx(result["test"]["balanced_accuracy"], abs=1e-6)
    assert version.tags["leuko.metric"] == "test/balanced_accuracy"
    assert version.tags["leuko.compared_to"] == "none"
    for tag in (
        "leuko.git_commit",
        "leuko.manifest_sha256",
        "leuko.prepared_fingerprint",
        "leuko.cv_balanced_accuracy",
    ):
        assert tag in version.tags

    # the version links to the refit run, a child of the sweep run, with CV and test metrics
    run = client.get_run(version.run_id)
    assert run.data.tags["leuko.role"] == "refit"
    assert run.data.tags["leuko.trial"] == str(registry["source"].trial)
    sweep = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert sweep.info.run_name == "sweep-reg"
    assert {"test/balanced_accuracy", "cv/balanced_accuracy_mean", "cv/balanced_accuracy_std"} <= set(run.data.metrics)
    assert run.data.params["data.fold"] == "None"  # refit on every non-test patient

    # models-from-code: inference code + safetensors weights + JSON config, no pickle
    local = mlflow.artifacts.download_artifacts(f"models:/leuko/{version.version}", tracking_uri=uri)
    mlmodel = yaml.safe_load(open(f"{local}/MLmodel"))
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    files = {p.name for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
    assert {"weights.safetensors", "model_config.json", "pyfunc_model.py"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    config = json.loads(next(__import__("pathlib").Path(local).rglob("model_config.json")).read_text())
    assert config["classes"] == ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]
    assert config["preprocessing"]["shape"] == [16, 16, 16] and config["preprocessing"]["modality"] == "ri"
    signature = mlmodel["signature"]
    inputs = json.loads(signature["inputs"])
    assert inputs[0]["tensor-spec"]["shape"] == [-1, 1, -1, -1, -1]
    assert [c["name"] for c in json.loads(signature["outputs"])] == ["pred_label"] + [
        f"prob_{c}" for c in config["classes"]
    ]


@pytest.mark.slow
def test_registering_no_better_model_makes_a_challenger(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    first = registry["result"]
    # The same trial again trains the same weights (seeded), so it cannot beat the champion.
    again = register(registry["source"], out=registry["folder"] / "runs")
    assert again["alias"] == CHALLENGER
    client = mlflow.MlflowClient(registry["tracking_uri"])
    assert str(client.get_model_version_by_alias("leuko", "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias("leuko", "challenger").version) == again["version"]
    tags = client.get_model_version("leuko", again["version"]).tags
    assert tags["leuko.compared_to"] == first["version"]
    assert float(tags["leuko.champion_score"]) == pytest.approx(first["score"], abs=1e-6)
    assert tags["leuko.decision"].startswith("challenger: test balanced_accuracy")


@pytest.mark.slow
def test_register_a_config_by_hand(registry, tiny_prepared, monkeypatch, tmp_path, capsys):
    from helpers.sweep import write_base

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    base = write_base(tmp_path, tiny_prepared)  # max_epochs 1
    result = register(
        Source(configs=[str(base)], overrides=["--model.lr", "0.002"]), name="leuko-manual", out=tmp_path / "runs"
    )
    assert result["alias"] == CHAMPION and result["cv"] == {}
    client = mlflow.MlflowClient(registry["tracking_uri"])
    assert str(client.get_model_version_by_alias("leuko-manual", "champion").version) == "1"
    assert client.get_run(result["run_id"]).data.params["trainer.max_epochs"] == "1"  # no CV: the file's epochs

    # a CV whose folds peaked at epoch 2 on average: the refit (no validation to stop on) trains for 2
    cv = {"best_epoch": {"mean": 1.6, "std": 0.5}, "balanced_accuracy": {"mean": 0.5, "std": 0.1}}
    earned = register(Source(configs=[str(base)], overrides=[], cv=cv), name="leuko-manual", out=tmp_path / "runs")
    assert client.get_run(earned["run_id"]).data.params["trainer.max_epochs"] == "2"
    assert "refit for 2 epochs: the mean best epoch of its CV" in capsys.readouterr().err

    # `leuko register --config ... --cv DIR`: DIR's summary sets the epochs and tags the version with its scores
    trial_cv = registry["source"].cv_dir
    summary = json.loads((Path(trial_cv) / "cv_summary.json").read_text())
    by_cv = register(Source(configs=[str(base)], overrides=[], cv_dir=trial_cv), name="leuko-manual", out=tmp_path)
    assert by_cv["cv"] == summary
    tags = client.get_model_version("leuko-manual", by_cv["version"]).tags
    mean = summary["balanced_accuracy"]["mean"]
    assert tags["leuko.cv_balanced_accuracy"].startswith(f"{mean:.6f} +- ")
    epochs = str(max(1, round(summary["best_epoch"]["mean"])))
    assert client.get_run(by_cv["run_id"]).data.params["trainer.max_epochs"] == epochs

    # --decisions prevalence: the refit ships class biases fitted on DIR's out-of-fold cells, and is scored with them
    source = Source(configs=[str(base)], overrides=[], cv_dir=trial_cv)
    shifted = register(source, name="leuko-manual", out=tmp_path, decisions="prevalence")
    where = client.get_model_version_download_uri("leuko-manual", shifted["version"])
    config = json.loads(Path(mlflow.artifacts.download_artifacts(f"{where}/artifacts/model_config.json")).read_text())
    calibration = config["calibration"]
    assert list(calibration["bias"]) == config["classes"] and calibration["decisions"] == "prevalence"
    assert shifted["comparison"] is not None and shifted["score"] == shifted["test"]["balanced_accuracy"]


# ---------------------------------------------------------------------------------------------- the code travels


@pytest.mark.slow
def test_registered_model_carries_its_code_and_loads_without_leuko_installed(registry, tmp_path):
    """No requirement names `leuko` (not ours on the public index): the package travels in the model's code/."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    uri = registry["tracking_uri"]
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/leuko/{registry['result']['version']}", tracking_uri=uri)
    )
    names = [
        re.split(r"[=<>!~ ;@\[]", line.strip(), maxsplit=1)[0].lower() for line in (local / "requirements.txt").open()
    ]
    assert "leuko" not in names and {"torch", "mlflow", "timm", "monai"} <= set(names)
    assert (local / "code" / "leuko" / "nets" / "__init__.py").is_file()

    # a fresh process that cannot import the installed leuko loads the model and predicts with the bundled code
    script = f"""
import sys
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
try:
    import leuko
    sys.exit("leuko is importable: the check would prove nothing")
except ModuleNotFoundError:
    pass
import mlflow, numpy as np
model = mlflow.pyfunc.load_model({str(local)!r})
out = model.predict(np.zeros((2, 1, 16, 16, 16), np.float32), params={{"preprocess": False}})
import leuko
assert leuko.__file__.startswith({str(local)!r}), leuko.__file__
print(list(out.columns), len(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'pred_label', 'prob_neutrophil'" in done.stdout and done.stdout.strip().endswith("2")


# ---------------------------------------------------------------------------------------------- races and kills

# Runs `leuko` with one registry function wrapped, to open a race window or to die at a chosen point.
HOOKED = """
import os, pathlib, signal, sys, time
import mlflow.tracking._model_registry.fluent as fluent
import leuko.tracking.champion as champion
from leuko.cli import main

hook = os.environ["HOOK"]
if hook == "wait_after_reading_champion":  # both registers read the alias before either sets it
    sync, real = pathlib.Path(os.environ["SYNC"]), champion.current_champion

    def read_then_wait(*args, **kwargs):
        found = real(*args, **kwargs)
        (sync / str(os.getpid())).touch()
        deadline = time.time() + 10
        while len(list(sync.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        return found

    champion.current_champion = read_then_wait
elif hook == "kill_after_creating_version":
    real = fluent._register_model

    def register_then_die(*args, **kwargs):
        version = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    fluent._register_model = register_then_die
sys.exit(main(sys.argv[1:]))
"""


def hooked_register(hook: str, base, out, uri: str, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-c", HOOKED, "register", "--config", str(base), "--name", "race", "--out", str(out)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HOOK": hook, "OMP_NUM_THREADS": "1", **env}
    # the working directory holds the store's artifacts (./mlruns)
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_registers_at_once_crown_one_champion(tiny_prepared, tmp_path):
    from helpers.sweep import write_base

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = write_base(tmp_path, tiny_prepared)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_experiment("leuko")  # the store and the experiment exist before the two processes race
    (tmp_path / "sync").mkdir()
    procs = [
        hooked_register("wait_after_reading_champion", base, tmp_path / f"runs{i}", uri, SYNC=str(tmp_path / "sync"))
        for i in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    versions = client.search_model_versions("name = 'race'")
    decisions = sorted(v.tags["leuko.decision"].split(":")[0] for v in versions)
    assert decisions == ["challenger", "champion"], [v.tags.get("leuko.decision") for v in versions]
    champion = client.get_model_version_by_alias("race", "champion")
    challenger = next(v for v in versions if str(v.version) != str(champion.version))
    assert challenger.tags["leuko.compared_to"] == str(champion.version)
    assert all(v.tags["leuko.status"] == "complete" for v in versions)
    assert all(client.get_run(v.run_id).info.status == "FINISHED" for v in versions)


@pytest.mark.slow
def test_a_register_killed_after_creating_its_version_leaves_it_marked(tiny_prepared, tmp_path):
    from helpers.sweep import write_base

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = hooked_register("kill_after_creating_version", write_base(tmp_path, tiny_prepared), tmp_path / "runs", uri)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err[-3000:]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'race'")
    assert version.tags.get("leuko.status") == "incomplete", version.tags
    assert client.get_run(version.run_id).info.status in ("KILLED", "FAILED")
    assert not version.aliases
