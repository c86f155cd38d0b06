"""UMAP of a trained model's penultimate features, coloured by class and by patient."""

from __future__ import annotations

import numpy as np
import pytest

from leuko.evaluation.embedding import embed_cv_fold, embedding_plot, penultimate_features, umap_2d


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
