"""EMA weights (leuko.training.averaging.EMAWeights), the checkpoint monitor (--monitor) and early stopping."""

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from leuko.errors import ConfigError
from leuko.training import run_dir
from leuko.training.averaging import EMAWeights
from leuko.training.cli import LeukoCLI


def _cli(config, root, *extra):
    args = ["--config", str(config), "--trainer.default_root_dir", str(root), "--tracking.enabled", "false"]
    args += ["--trainer.logger", "false", "--data.fold", "0", *extra]
    return LeukoCLI(args=args, run=False)


@pytest.mark.slow
def test_best_checkpoint_holds_and_scores_the_average(tiny_config, tmp_path):
    ema = '[{"class_path": "leuko.training.averaging.EMAWeights", "init_args": {"decay": 0.9}}]'
    cli = _cli(tiny_config, tmp_path / "run", "--monitor", "val/auroc", "--trainer.callbacks", ema)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    best = trainer.checkpoint_callback
    assert best.monitor == "val/auroc" and best.mode == "max"
    assert any(isinstance(c, EMAWeights) for c in trainer.callbacks)
    trainer.fit(model, datamodule=data)

    checkpoint = run_dir.load_checkpoint(best.best_model_path)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())
    # scoring the best checkpoint after the fit scores its averaged weights: the score that chose it
    scores = trainer.validate(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    assert scores["val/auroc"] == pytest.approx(float(best.best_model_score), abs=1e-6)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], averaged[k]) for k in averaged)


def test_monitor_a_loss_keeps_the_lowest(tiny_config, tmp_path):
    cli = _cli(tiny_config, tmp_path / "run", "--monitor", "val/loss")
    assert cli.trainer.checkpoint_callback.monitor == "val/loss"
    assert cli.trainer.checkpoint_callback.mode == "min"


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ConfigError, match=rf"decay {decay}: give a number between 0 and 1"):
        EMAWeights(decay=decay).setup(None, None, "fit")


@pytest.mark.parametrize("fold, kept", [("0", True), ("null", False)])
def test_early_stopping_only_with_a_validation_fold(tiny_config, tmp_path, fold, kept):
    stop = '[{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/auroc"}}]'
    cli = _cli(tiny_config, tmp_path / "run", "--trainer.callbacks", stop, "--data.fold", fold)
    assert any(isinstance(c, EarlyStopping) for c in cli.trainer.callbacks) == kept


def test_a_monitor_that_is_no_validation_metric_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"monitor 'auroc': .* give one such as val/auroc"):
        _cli(tiny_config, tmp_path / "run", "--monitor", "auroc")
