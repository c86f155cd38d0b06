"""Saliency maps peak on the structure that decides the class; the explain folder, its CLI and its report section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from leuko.deploy.explain import ExplainError, choose
from leuko.evaluation.report_saliency import pick_cells, saliency_section, with_saliency_section
from leuko.evaluation.report_sections import SECTIONS, ReportInputs, provenance_section
from leuko.evaluation.saliency import _CamNet, cam_layer, candidate_layers, grad_cam, occlusion
from leuko.evaluation.saliency_figures import EXPLAIN, explain_cells, file_stem, read_index
from leuko.nets import build_net

SIDE, CENTRE = 16, (4, 11, 8)  # the planted blob sits off-centre, near a face, so a lucky centre peak fails
GRID = np.stack(np.mgrid[:SIDE, :SIDE, :SIDE])  # (3, D, H, W) voxel coordinates
DIST = np.sqrt(((GRID - np.array(CENTRE)[:, None, None, None]) ** 2).sum(0))  # (D, H, W) voxels to the centre
BLOB = np.exp(-(DIST**2) / (2 * 1.5**2)).astype(np.float32)


def planted(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, D, H, W) noise volumes, every second one with the bright blob (class 1); and their classes."""
    x = rng.normal(0.0, 0.3, size=(n, 1, SIDE, SIDE, SIDE)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, 0] += 3.0 * BLOB
    return x, y


def trained(net: nn.Module, steps: int, lr: float) -> nn.Module:
    """net fit for a few seconds to tell blob from no blob."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = planted(64, rng)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        i = rng.choice(len(x), 16, replace=False)
        loss = nn.functional.cross_entropy(net(torch.from_numpy(x[i])), torch.from_numpy(y[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    test, labels = planted(8, np.random.default_rng(1))
    with torch.no_grad():
        assert (net(torch.from_numpy(test)).argmax(1).numpy() == labels).all(), "the net did not learn the blob"
    return net


def _peak_distance(saliency: np.ndarray) -> float:
    return float(DIST[np.unravel_index(saliency.argmax(), saliency.shape)])


def blob_net() -> nn.Module:
    """A small conv net trained to find the planted blob (seeded)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    return trained(net, steps=30, lr=1e-2)


def test_grad_cam_and_occlusion_peak_on_the_planted_blob():
    net = blob_net()
    cell = planted(2, np.random.default_rng(2))[0][1]  # a class-1 cell
    cam, layer = grad_cam(net, cell, 1)
    assert layer == "net.2"  # the last conv
    assert cam.shape == (SIDE,) * 3 and cam.max() == pytest.approx(1.0) and cam.min() >= 0
    assert _peak_distance(cam) <= 2.0
    assert cam[DIST <= 4].sum() > 0.5 * cam.sum()  # most of the map's mass on the blob (6% of the volume)
    occ = occlusion(net, cell, 1, mask_size=(4, 4, 4))
    assert occ.shape == (SIDE,) * 3 and _peak_distance(occ) <= 2.0


def test_class_biases_enter_the_probabilities_occlusion_measures():
    net = blob_net()
    x = torch.from_numpy(planted(2, np.random.default_rng(2))[0][1:2])  # a class-1 cell
    with torch.no_grad():
        assert torch.allclose(_CamNet(net, 2.0, [0.0, -3.0])(x), net(x) / 2.0 + torch.tensor([0.0, -3.0]))
    plain, biased = (occlusion(net, x[0].numpy(), 1, mask_size=(4, 4, 4), bias=b) for b in (None, [0.0, -3.0]))
    assert plain.max() == biased.max() == pytest.approx(1.0)
    assert not np.allclose(plain, biased, atol=1e-3)  # the drop of another probability: the model's, biases included


@pytest.mark.slow
def test_occlusion_through_a_leuko_net_peaks_on_the_planted_blob():
    torch.manual_seed(0)
    net = trained(build_net("fishnet3d_tiny", in_channels=1, num_classes=2), steps=30, lr=3e-3)
    cell = planted(2, np.random.default_rng(2))[0][1]
    assert _peak_distance(occlusion(net, cell, 1)) <= 2.5


@pytest.mark.parametrize(
    "name, layer",
    [("fishnet3d_tiny", "net.down2.0"), ("resnet3d_50_tiny", "net.backbone.layer2"), ("vit3d_tiny", "tokens")],
)
def test_each_net_gets_a_grad_cam_layer_with_a_useful_grid(name, layer):
    torch.manual_seed(0)
    net = build_net(name, in_channels=1, num_classes=4, input_shape=(SIDE,) * 3)
    cell = np.random.default_rng(0).normal(size=(1, SIDE, SIDE, SIDE)).astype(np.float32)
    cam, used = grad_cam(net, cell, 2)
    assert used == layer and used in candidate_layers(net)
    assert cam.shape == (SIDE,) * 3 and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert all(p.grad is None for p in net.parameters())  # the caller's net is untouched


def test_explain_cells_writes_a_png_per_cell_and_method_and_an_index(tmp_path):
    torch.manual_seed(0)
    net = build_net("vit3d_tiny", in_channels=1, num_classes=2, input_shape=(SIDE,) * 3)
    volumes = planted(2, np.random.default_rng(0))[0]
    cells = pd.DataFrame({"cell_id": ["a/b/c1", "c2"], "label": ["blob", "none"]})
    probs = np.array([[0.2, 0.8], [0.3, 0.7]])
    index = explain_cells(net, volumes, cells, probs, ["none", "blob"], tmp_path / EXPLAIN, source="t", progress=False)
    assert len(index) == 4 and set(index["method"]) == {"gradcam", "occlusion"}
    assert list(index["correct"]) == [True, True, False, False] and set(index["pred_label"]) == {"blob"}
    for png in index["png"]:
        assert (tmp_path / EXPLAIN / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert file_stem("a/b/c1") == "a_b_c1" and (tmp_path / EXPLAIN / "a_b_c1_gradcam.png").is_file()
    assert (tmp_path / EXPLAIN / "explain.json").is_file()
    back = read_index(tmp_path / EXPLAIN)
    assert list(back["cell_id"]) == list(index["cell_id"])

    inputs = ReportInputs(
        name="t", root=tmp_path, source="t", eval_dir=None, baselines_dir=None, run_id=None, tags={}, numbers={},
        summary={}, fold_metrics=None, config={}, config_text="",
    )  # fmt: skip
    anchor, title, html = saliency_section(inputs)
    assert anchor == "saliency" and html.count("<img") == 4
    assert "blob: predicted right" in html and "none: predicted wrong" in html
    makers = with_saliency_section(SECTIONS)
    assert makers.index(saliency_section) == makers.index(provenance_section) - 1
    inputs.root = tmp_path / "elsewhere"
    assert saliency_section(inputs) is None


def test_report_picks_confident_right_and_wrong_cells_per_class():
    oof = pd.DataFrame(
        {
            "cell_id": list("abcdef"),
            "label": ["x", "x", "x", "y", "y", "y"],
            "pred_label": ["x", "x", "y", "y", "x", "x"],
            "prob_x": [0.9, 0.6, 0.2, 0.1, 0.8, 0.55],
            "prob_y": [0.1, 0.4, 0.8, 0.9, 0.2, 0.45],
        }
    )
    picked = pick_cells(oof, ["x", "y"], 1)
    assert list(picked["cell_id"]) == ["a", "c", "d", "e"]


def test_unknown_cell_ids_are_named_with_the_fix():
    cells = pd.DataFrame({"cell_id": ["P1_C1", "P1_C2", "P2_C1"], "path": ["a", "b", "c"]})
    assert list(choose(cells, ["P2_C1", "P1_C1"], 4, "m.csv")["cell_id"]) == ["P2_C1", "P1_C1"]
    assert list(choose(cells, None, 2, "m.csv")["cell_id"]) == ["P1_C1", "P1_C2"]
    with pytest.raises(ExplainError, match=r"--cells: P9_C9 not in --input m.csv .*cell_id column"):
        choose(cells, ["P1_C1", "P9_C9"], 4, "m.csv")


def test_cam_layer_falls_back_to_the_finest_grid_of_a_small_volume():
    model = _CamNet(build_net("fishnet3d_tiny", in_channels=1, num_classes=2)).eval()
    assert cam_layer(model, torch.zeros(1, 1, 32, 32, 32)) == "net.classifier.2"  # 4^3 at the deepest layer
    assert cam_layer(model, torch.zeros(1, 1, 8, 8, 8)) == "net.up.1"  # nothing reaches 4^3 but the finest


@pytest.mark.slow  # Lightning's import and a checkpoint: several seconds
def test_report_explain_writes_right_and_wrong_cells_of_a_folds_checkpoint(tiny_prepared, tmp_path):
    from leuko.data.prepared import load_prepared
    from leuko.evaluation.report_saliency import explain_cv
    from leuko.training.module import VolumeClassifier
    from leuko.training.predictions import prob_columns
    from leuko.training.run_dir import CONFIG, OOF, checkpoint, fold_dir

    _, index, meta = load_prepared(tiny_prepared)
    classes = list(meta["classes"])
    cv = tmp_path / "runs" / "cv"
    fold_dir(cv, 0).mkdir(parents=True)
    (fold_dir(cv, 0) / CONFIG).write_text(f"data:\n  prepared_dir: {tiny_prepared}\n  k: 2\n")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), size=len(index))
    oof = pd.DataFrame({"cell_id": index["cell_id"], "fold": 0, "label": index["label"]})
    oof["pred_label"] = [classes[i] for i in probs.argmax(1)]
    oof[prob_columns(classes)] = probs
    oof.to_csv(cv / OOF, index=False)
    model = VolumeClassifier(net="vit3d_tiny", class_names=classes, num_classes=len(classes), input_shape=(16, 16, 16))
    checkpoint(cv, 0).parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, checkpoint(cv, 0))

    table = explain_cv(cv, 1, methods=("gradcam",), progress=False)
    assert (cv / EXPLAIN / "explain.csv").is_file() and len(table) >= len(classes)
    for _, rows in table.groupby("label"):
        assert rows["correct"].sum() <= 1 and (~rows["correct"]).sum() <= 1  # one right and one wrong per class
    assert all((cv / EXPLAIN / png).is_file() for png in table["png"])
