"""UMAP of a trained model's penultimate features, coloured by class and by patient; checkpoints read
weights-only, so a received checkpoint cannot run code."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from helpers.evaluation import fake_cv
from leuko.cli import main
from leuko.errors import LeukoError
from leuko.evaluation.embedding import embed_cv_fold, embedding_plot, load_classifier, penultimate_features, umap_2d
from leuko.training.run_dir import CheckpointError, checkpoint


def test_penultimate_features_are_the_nets_forward_features():
    import torch

    from leuko.training.module import VolumeClassifier

    model = VolumeClassifier(net="fishnet3d_tiny", num_classes=4, in_channels=1)
    volumes = np.random.default_rng(0).normal(size=(7, 1, 16, 16, 16)).astype(np.float32)
    features = penultimate_features(model, volumes, [6, 0, 3], batch_size=2)
    assert features.shape == (3, model.net.num_features)
    with torch.no_grad():
        expected = model.net.forward_features(torch.from_numpy(volumes[[6, 0, 3]])).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_embedding_plot_draws_one_colour_per_group(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(60, 2))
    path = embedding_plot(
        coords,
        np.repeat(["b", "a", "c"], 20),
        tmp_path / "u.png",
        title="t",
        legend_title="class",
        order=["c", "b", "a"],
    )
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    # many patients: colours repeat with other markers, and the legend is left out beyond 40
    embedding_plot(coords, [f"P{i}" for i in range(60)], tmp_path / "p.png", title="t", legend_title="patient")
    assert (tmp_path / "p.png").is_file()


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no fold_\\*/checkpoints/best.ckpt"):
        embed_cv_fold(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="cells='some'"):
        embed_cv_fold(tmp_path, tmp_path / "out", cells="some")
    with pytest.raises(ValueError, match="at least 4 cells"):
        umap_2d(np.zeros((3, 5)))


@pytest.mark.slow  # numba compiles UMAP's kernels on first use: ~20 s of CPU
def test_umap_separates_separated_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (40, 8))
    b = rng.normal(0, 0.1, (40, 8)) + 5.0
    coords = umap_2d(np.vstack([a, b]), n_neighbors=10)
    assert coords.shape == (80, 2)
    gap = np.linalg.norm(coords[:40].mean(0) - coords[40:].mean(0))
    spread = max(coords[:40].std(0).max(), coords[40:].std(0).max())
    assert gap > 3 * spread


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickled checkpoint can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_checkpoint(path, marker):
    """A file shaped like a Lightning checkpoint whose pickle would create marker when loaded."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"net": "fishnet3d_tiny"}, "callbacks": _Payload(marker)}, path)
    return path


def test_a_checkpoint_that_needs_unpickling_is_refused_by_name(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = _payload_checkpoint(tmp_path / "best.ckpt", marker)
    with pytest.raises(CheckpointError) as info:
        load_classifier(ckpt)
    assert isinstance(info.value, LeukoError)
    assert str(ckpt) in str(info.value) and f"{open.__module__}.open" in str(info.value)  # the global it needs
    assert not marker.exists()


def test_evaluate_and_report_refuse_a_received_payload_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs", name="received")
    marker = tmp_path / "code_ran"
    ckpt = _payload_checkpoint(checkpoint(cv, 0), marker)
    for argv in (["evaluate", "--cv", str(cv)], ["report", "--run", str(cv)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert str(ckpt) in err and "Traceback" not in err, err
    assert not marker.exists()


def test_lightning_commands_read_checkpoints_weights_only(tiny_prepared, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    ckpt = _payload_checkpoint(tmp_path / "received.ckpt", marker)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            model:
              net: fishnet3d_tiny
            data:
              prepared_dir: {tiny_prepared}
              fold: 0
              k: 2
              batch_size: 8
              num_workers: 0
            trainer:
              accelerator: cpu
              devices: 1
              logger: false
              enable_progress_bar: false
              enable_model_summary: false
            tracking:
              enabled: false
            """
        )
    )
    root = tmp_path / "run"
    last = _payload_checkpoint(root / "checkpoints" / "last.ckpt", marker)
    # a file named by --ckpt_path (LightningCLI reads its hyperparameters), and `last` (the trainer resolves it)
    for subcommand, path, named in (("validate", str(ckpt), ckpt), ("fit", "last", last)):
        argv = [subcommand, "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", path]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert str(named) in err and "Traceback" not in err, err[-3000:]
    assert not marker.exists()
