"""`leuko fit | validate | test | predict` through LightningCLI, tracked in a real MLflow store."""

import re
import sys
import warnings

import mlflow
import pandas as pd
import pytest
import yaml

from leuko.cli import main


def runs_of(uri, experiment):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_fit_then_test_and_predict(tiny_config, tracking_uri, experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    common = [
        "--config",
        str(tiny_config),
        "--trainer.default_root_dir",
        str(root),
        "--tracking.experiment",
        experiment,
    ]
    assert main(["fit", *common]) == 0
    assert (root / "checkpoints" / "best.ckpt").is_file()
    assert (root / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["model"]["net"] == "fishnet3d_tiny" and saved["trainer"]["max_epochs"] == 2

    client, runs = runs_of(tracking_uri, experiment)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.net"] == "fishnet3d_tiny"
    assert run.data.params["data.k"] == "2"
    for key in ("val/balanced_accuracy", "val/macro_f1", "val/auroc", "train/loss_epoch", "val/recall_monocyte"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val/balanced_accuracy")
    assert len(history) == 2  # once per epoch
    assert run.data.tags["leuko.prepared_fingerprint"] not in ("", "unknown")
    assert run.data.tags["leuko.git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts

    out = tmp_path / "preds.csv"
    ckpt = str(root / "checkpoints" / "best.ckpt")
    assert (
        main(["predict", *common, "--ckpt_path", ckpt, "--predictions", str(out), "--data.predict_split", "test"]) == 0
    )
    preds = pd.read_csv(out)
    probs = preds.filter(like="prob_")
    assert list(probs.columns) == ["prob_neutrophil", "prob_eosinophil", "prob_lymphocyte", "prob_monocyte"]
    assert (probs.sum(axis=1) - 1).abs().max() < 1e-5
    assert preds["cell_id"].is_unique and len(preds) > 0
    _, runs = runs_of(tracking_uri, experiment)
    assert {r.data.tags["leuko.command"] for r in runs} == {"fit", "predict"}


def test_print_config_resolves_layers(tiny_config, capsys, tmp_path):
    layer = tmp_path / "vit.yaml"
    layer.write_text("model:\n  net: vit3d_tiny\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tiny_config), "--config", str(layer), "--model.lr", "0.01", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"] == "vit3d_tiny"  # the later file wins
    assert printed["model"]["lr"] == 0.01  # the command line wins over both
    assert printed["data"]["k"] == 2


def test_unknown_key_is_an_error(tiny_config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tiny_config), "--model.learning_rate", "0.1"])
    assert exit_.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_missing_prepared_dir_stops_before_training(tiny_config, tmp_path, capsys):
    code = main(
        [
            "fit",
            "--config",
            str(tiny_config),
            "--data.prepared_dir",
            str(tmp_path / "nope"),
            "--tracking.enabled",
            "false",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "nope" in err and "leuko prepare" in err


def test_in_channels_mismatch_is_named(tiny_prepared):
    import lightning as L

    from leuko.data.datamodule import LeukoDataModule
    from leuko.training.module import VolumeClassifier

    dm = LeukoDataModule(prepared_dir=str(tiny_prepared), k=2, num_workers=0)
    model = VolumeClassifier(net="vit3d_tiny", in_channels=2, num_classes=4, input_shape=(16, 16, 16))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"in_channels=2 .* has 1 channel"):
        trainer.fit(model, datamodule=dm)


@pytest.mark.slow
def test_fit_prints_no_lightning_noise(tiny_config, tmp_path):
    """Lightning's litlogger tip and torch's pytree deprecation warning are nothing a leuko user can act on."""
    import os
    import subprocess

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "leuko.cli", "fit", "--config", str(tiny_config)]
    cmd += ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "1"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trainer.fit` stopped" in done.stderr  # Lightning's own messages still come through
    assert "litlogger" not in done.stderr
    assert "LeafSpec" not in done.stderr and "_pytree" not in done.stderr
    # no bar in a log: one plain line per epoch, named after the run folder, with the epoch's scores
    line = re.search(r"^run: epoch 1/1  train/loss \d\.\d{3}  val/loss .*val/balanced_accuracy \d\.\d{3}.*s\)$",
                     done.stderr, re.M)  # fmt: skip
    assert line, done.stderr[-3000:]


@pytest.mark.parametrize(("terminal", "bar", "lines"), [(True, "null", False), (False, "null", True),
                                                        (True, "false", True), (True, "true", False)])  # fmt: skip
def test_epoch_lines_replace_the_bar_off_a_terminal(tiny_config, monkeypatch, terminal, bar, lines):
    """The bar where it can be drawn (a terminal, unless switched off); plain epoch lines everywhere else."""
    from leuko.training.cli import LeukoCLI
    from leuko.training.epoch_log import EpochLog

    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    args = ["--config", str(tiny_config), "--trainer.enable_progress_bar", bar, "--tracking.enabled", "false"]
    args += ["--trainer.logger", "false"]
    with warnings.catch_warnings(record=True) as caught:  # pytest's own sys.argv stands beside args=
        warnings.simplefilter("always")
        cli = LeukoCLI(args=args, run=False)  # no subcommand: as `leuko cv` builds each fold's
    assert not [w for w in caught if "args parameter" in str(w.message)]  # leuko passes args= on purpose
    logs = [c for c in cli.trainer.callbacks if isinstance(c, EpochLog)]
    assert len(logs) == int(lines)
    assert (cli.trainer.progress_bar_callback is not None) == (not lines)
