"""`leuko sweep`: sweep files, overrides, and real sweeps (pruning, resuming, two worker processes with
one killed, on a journal file and on a database, a DDP trial on 2 CPU processes). Which trials count as
stale: test_recovery.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from helpers.sweep import REPO, env_with, write_base, write_space
from leuko.cli import main
from leuko.nets import NETS
from leuko.sweep.recovery import _alive
from leuko.sweep.run import config_point
from leuko.sweep.space import SweepConfigError, load_sweep_config, overrides_for, parse_budget
from leuko.sweep.study import open_storage


def _study(name: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


# ---------------------------------------------------------------------------------------------- sweep files
@pytest.mark.parametrize("name", ["default.yaml", "gpu.yaml"])
def test_shipped_sweep_files_load(name):
    cfg = load_sweep_config(REPO / "conf" / "sweep" / name)
    assert set(cfg.space["model.net"].choices) <= set(NETS)
    families = {
        next(f for f in ("fishnet3d", "resnet3d_50", "vit3d") if n.startswith(f))
        for n in cfg.space["model.net"].choices
    }
    assert families == {"fishnet3d", "resnet3d_50", "vit3d"}
    for config in cfg.config:
        assert (REPO / config).is_file(), config
    vits = {c for c in cfg.space["model.net"].choices if "vit" in c}
    assert vits <= set(cfg.space["model.net_kwargs.drop_path_rate"].when["model.net"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"spaces": {}}, "unknown key(s) spaces"),
        ({"objective": "f2"}, "objective: f2"),
        ({"space": {}}, "`space` is empty"),
        ({"space": {"model.lr": {"low": 0.1}}}, "space.model.lr: give `choices`, or `low` and `high`"),
        ({"space": {"model.lr": {"low": 0.1, "high": 0.01}}}, "low < high"),
        ({"space": {"model.lr": {"low": 0.0, "high": 0.01, "log": True}}}, "log: true` needs low > 0"),
        ({"space": {"model.lr": {"choices": []}}}, "non-empty list"),
        ({"space": {"model.lr": {"low": 1, "high": 2, "scale": 3}}}, "unknown field(s) scale"),
        (
            {"space": {"model.net_kwargs.drop_path_rate": {"low": 0.0, "high": 0.1, "when": {"model.net": ["vit3d"]}}}},
            "not a categorical parameter listed above it",
        ),
        ({"fixed": {"model.lr": 0.1}}, "both in `fixed` and in `space`"),
        ({"pruner": {"type": "sometimes"}}, "pruner.type: sometimes"),
        ({"heartbeat": {"interval": 10, "grace": 5}}, "0 < interval < grace"),
        ({"isolate": "maybe"}, "must be auto, always or never"),
        ({"study": "a b"}, "may hold only letters"),
        ({"budget": "ten minutes"}, "is not a wall time; write e.g. 600, 600s, 10m"),
        ({"budget": -5}, "is not a wall time"),
        ({"trials": None}, "`trials: null` needs a `budget`"),
        ({"trials": "many"}, "must be an integer >= 0"),
        ({"baselines": {"mip_epochs": 3}}, "a mapping with `manifest`"),
    ],
)
def test_bad_sweep_files_name_the_key_and_the_fix(tmp_path, change, message):
    spec = {"study": "s", "config": ["base.yaml"], "space": {"model.lr": {"low": 1e-4, "high": 1e-2}}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepConfigError) as err:
        load_sweep_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "value, seconds", [(600, 600.0), ("600s", 600.0), ("10m", 600.0), ("10 min", 600.0), ("1.5h", 5400.0), (None, None)]
)
def test_budget_is_wall_time_with_a_unit(value, seconds):
    assert parse_budget(value) == seconds


def test_a_budget_without_trials_means_as_many_as_fit(tmp_path):
    path = tmp_path / "s.yaml"
    spec = {"study": "s", "config": ["b.yaml"], "budget": "2m", "space": {"model.lr": {"low": 1e-4, "high": 1e-2}}}
    path.write_text(yaml.safe_dump(spec))
    cfg = load_sweep_config(path)
    assert (cfg.budget, cfg.trials) == (120.0, None)


def test_config_point_takes_the_base_values_that_lie_in_the_space(tmp_path):
    from jsonargparse import Namespace

    path = tmp_path / "s.yaml"
    space = {
        "model.net": {"choices": ["a", "b"]},
        "model.lr": {"low": 1e-3, "high": 1e-2},
        "model.weight_decay": {"low": 0.01, "high": 0.1},  # the base's 0.5 lies outside: left to the sampler
        "model.net_kwargs.drop_rate": {"low": 0.0, "high": 0.3},
        "model.net_kwargs.drop_path_rate": {"low": 0.0, "high": 0.2, "when": {"model.net": ["a"]}},
    }
    path.write_text(yaml.safe_dump({"study": "s", "config": ["b.yaml"], "space": space}))
    cfg = load_sweep_config(path)
    base = Namespace(model=Namespace(net="b", lr=0.003, weight_decay=0.5, net_kwargs={"drop_rate": 0.1}))
    assert config_point(base, cfg.space) == {"model.net": "b", "model.lr": 0.003, "model.net_kwargs.drop_rate": 0.1}


def test_missing_sweep_file_says_which_and_how(tmp_path):
    with pytest.raises(SweepConfigError, match="sweep file not found; pass --space"):
        load_sweep_config(tmp_path / "nope.yaml")


def test_overrides_are_config_keys_and_net_kwargs_one_json_value():
    fixed = {"trainer.max_epochs": 3, "trainer.enable_progress_bar": False, "model.net_kwargs.drop_rate": 0.1}
    params = {
        "model.lr": 0.002,
        "model.net": "vit3d_tiny",
        "model.net_kwargs.drop_path_rate": 0.05,
        "data.batch_size": 16,
    }
    args = overrides_for(fixed, params)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--trainer.max_epochs"] == "3"
    assert pairs["--trainer.enable_progress_bar"] == "false"
    assert pairs["--model.lr"] == "0.002"
    assert pairs["--data.batch_size"] == "16"
    assert json.loads(pairs["--model.net_kwargs"]) == {"drop_rate": 0.1, "drop_path_rate": 0.05}
    assert not any(a.startswith("--model.net_kwargs.") for a in args)


# ---------------------------------------------------------------------------------------------- real sweeps
@pytest.mark.slow
def test_budget_sweep_starts_from_the_recipe_stops_in_time_and_refits_the_epochs_earned(
    tmp_path, tiny_prepared, monkeypatch, capsys
):
    from leuko.tracking.registry import source_from_study

    monkeypatch.chdir(tmp_path)
    base = write_base(tmp_path, tiny_prepared, max_epochs=3)
    space = write_space(
        tmp_path,
        base,
        study="b1",
        trials=None,
        budget="1h",  # the file's; --budget below wins
        start_from_config=True,
        fixed={"tracking.enabled": False},
        pruner={"type": "hyperband", "min_resource": 1, "max_resource": "auto", "reduction_factor": 3},
    )
    started = time.time()
    assert main(["sweep", "--space", str(space), "--budget", "20s"]) == 0
    deadline = started + 20
    study = _study("b1", "sweeps/b1.journal")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert trials[0].params["model.lr"] == pytest.approx(0.003)  # the base recipe's own lr came first
    assert all(t.datetime_start.timestamp() <= deadline for t in trials)  # none started after the budget
    for t in trials:  # a trial that reached the budget stopped after that epoch
        if t.state == TrialState.COMPLETE:
            assert t.datetime_complete.timestamp() <= deadline + 30
        else:
            assert t.state == TrialState.PRUNED
    assert "within 0.3 min" in capsys.readouterr().out
    best = study.best_trial
    earned = best.user_attrs["leuko.cv"]["best_epoch"]["mean"]
    assert 1 <= earned <= 3
    source = source_from_study(space)
    assert source.cv["best_epoch"]["mean"] == earned  # register() refits for earned_epochs(source.cv)
    assert not any(o.startswith("--trainer.max_epochs") for o in source.overrides)  # an ensemble's CV: its own


@pytest.mark.slow
def test_sweep_logs_trials_prunes_and_resumes(tmp_path, tiny_prepared, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    base = write_base(tmp_path, tiny_prepared, max_epochs=2)
    fixed = {"tracking.experiment": "t_sweep"}
    space = write_space(tmp_path, base, study="s1", fixed=fixed)
    assert main(["sweep", "--space", str(space), "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "leaderboard of study s1" in out and "leuko cv --config" in out and "mlflow ui" in out
    study = _study("s1", "sweeps/s1.journal")
    assert _states(study) == ["COMPLETE", "COMPLETE"]

    # The same study again, now with a pruner that stops every trial after its second epoch.
    pruning = write_space(
        tmp_path,
        base,
        study="s1",
        name="prune.yaml",
        fixed=fixed,
        pruner={"type": "threshold", "lower": 2.0, "n_warmup_steps": 1},
    )
    assert main(["sweep", "--space", str(pruning), "--trials", "1"]) == 0
    study = _study("s1", "sweeps/s1.journal")
    assert _states(study) == ["COMPLETE", "COMPLETE", "PRUNED"]  # resumed: earlier trials stay
    pruned = study.trials[2]
    assert sorted(pruned.intermediate_values) == [0, 1]
    for t in study.trials:
        assert t.user_attrs["leuko.overrides"][:2] == ["--tracking.experiment", "t_sweep"]

    board = pd.read_csv(tmp_path / "sweeps" / "s1" / "leaderboard.csv")
    assert list(board["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert board["balanced_accuracy"].iloc[0] >= board["balanced_accuracy"].iloc[1]

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("t_sweep")
    sweeps = client.search_runs([exp.experiment_id], "tags.`leuko.command` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.run_name == "sweep-s1"  # one sweep run across both invocations
    sweep_id = sweeps[0].info.run_id
    assert "leaderboard.csv" in [a.path for a in client.list_artifacts(sweep_id)]
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{sweep_id}'")
    by_trial = {r.data.tags["leuko.trial"]: r for r in trials}
    assert sorted(by_trial) == ["0", "1", "2"]
    assert [by_trial[n].data.tags["leuko.trial_state"] for n in "012"] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [by_trial[n].info.status for n in "012"] == ["FINISHED", "FINISHED", "KILLED"]
    folds = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{by_trial['2'].info.run_id}'")
    assert [(r.info.status, r.data.tags["leuko.trial_state"]) for r in folds] == [("KILLED", "PRUNED")]


def _run_workers_and_kill_one(tmp_path, space: Path, storage: str, trials: int) -> tuple[optuna.Study, int, str]:
    """Start `leuko sweep --workers 2` as a real process, SIGKILL worker 1 during its first trial.

    Returns (study after the sweep ended, number of the killed worker's trial, sweep output)."""
    cmd = [
        sys.executable,
        "-m",
        "leuko.cli",
        "sweep",
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--workers",
        "2",
        "--storage",
        storage,
    ]
    log = open(tmp_path / "sweep.log", "w")
    main_proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env_with())
    killed = None
    try:
        deadline = time.time() + 240
        while killed is None and time.time() < deadline and main_proc.poll() is None:
            time.sleep(0.3)
            try:
                study = _study("w", storage)
            except KeyError:
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = t.user_attrs.get("leuko.pid")
                if pid and pid != main_proc.pid and "leuko.dir" in t.user_attrs:
                    os.kill(pid, signal.SIGKILL)  # worker 1: a process of this test's own sweep
                    killed = t.number
                    break
        assert killed is not None, (tmp_path / "sweep.log").read_text()[-3000:]
        assert main_proc.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if main_proc.poll() is None:
            main_proc.kill()
            main_proc.wait()
        log.close()
    return _study("w", storage), killed, (tmp_path / "sweep.log").read_text()


@pytest.mark.slow
def test_killed_worker_fails_its_trial_and_others_finish_journal(tmp_path, tiny_prepared):
    base = write_base(tmp_path, tiny_prepared, max_epochs=2)
    space = write_space(tmp_path, base, study="w", fixed={"tracking.enabled": False, "trainer.logger": False})
    storage = str(tmp_path / "w.journal")
    study, killed, output = _run_workers_and_kill_one(tmp_path, space, storage, trials=4)
    states = dict(zip(range(99), _states(study)))
    assert states[killed] == "FAIL", output[-3000:]
    assert "is gone" in study.trials[killed].user_attrs["leuko.fail_reason"]
    assert "worker 1" in output and "exit code -9" in output
    # worker 0 ran its whole share
    assert sorted(s for n, s in states.items() if n != killed) == ["COMPLETE", "COMPLETE"], output[-3000:]


@pytest.mark.slow
def test_killed_worker_fails_its_trial_and_others_finish_database(tmp_path, tiny_prepared, monkeypatch):
    base = write_base(tmp_path, tiny_prepared, max_epochs=2)
    space = write_space(tmp_path, base, study="w", fixed={"tracking.enabled": False, "trainer.logger": False})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study, killed, output = _run_workers_and_kill_one(tmp_path, space, storage, trials=3)
    # The sweep ends with nothing RUNNING, even before Optuna's heartbeat grace period (3 s) has passed:
    # worker 0 fails the trial of a worker process that is gone on its own machine, as on a journal.
    states = _states(study)
    assert states[killed] == "FAIL" and "RUNNING" not in states, output[-3000:]
    assert "is gone" in study.trials[killed].user_attrs["leuko.fail_reason"]
    assert states.count("COMPLETE") == 2, output[-3000:]  # worker 0 carried on
    assert "worker 1" in output and "exit code -9" in output
    # The study goes on: a later `leuko sweep` on the same database adds a trial.
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--space", str(space), "--storage", storage, "--trials", "1"]) == 0
    assert _states(_study("w", storage)).count("COMPLETE") == 3


@pytest.mark.slow
def test_ddp_trial_on_two_cpu_processes(tmp_path, tiny_prepared, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    base = write_base(tmp_path, tiny_prepared, max_epochs=2)
    space = write_space(
        tmp_path,
        base,
        study="ddp",
        fixed={"tracking.experiment": "t_ddp"},
        pruner={"type": "threshold", "lower": 2.0, "n_warmup_steps": 1},
    )
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    # 1 epoch: nothing to prune (step 0 is in the warm-up); 2 epochs: pruned after the second
    assert main(["sweep", "--space", str(space), "--trials", "1", *ddp, "--trainer.max_epochs", "1"]) == 0
    assert main(["sweep", "--space", str(space), "--trials", "1", *ddp]) == 0
    study = _study("ddp", "sweeps/ddp.journal")
    assert _states(study) == ["COMPLETE", "PRUNED"]
    assert sorted(study.trials[1].intermediate_values) == [0, 1]  # reported by rank 0 only, once per epoch
    for trial in study.trials:
        ranks = [json.loads(p.read_text()) for p in sorted(Path(trial.user_attrs["leuko.dir"]).glob("ranks/*.json"))]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["overrides"] == trial.user_attrs["leuko.overrides"] for r in ranks)  # same parameters
        assert not any(_alive(r["pid"]) for r in ranks)  # every rank ended with its trial
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("t_ddp")
    runs = client.search_runs([exp.experiment_id], "tags.`leuko.trial` = '1'")
    assert [(r.info.status, r.data.tags["leuko.trial_state"]) for r in runs] == [("KILLED", "PRUNED")]
    folds = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
    assert len(folds) == 1  # one fold run: rank 0 logs, rank 1 does not
