"""The 2D baseline of the RI study (Ryu et al. 2021, Figure 4): a 2D CNN on the maximum intensity projection
(MIP) along z, trained and scored on the same patient-grouped folds as `leuko cv` (see leuko.evaluation.baselines).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.folds import fold_masks, require_cells
from leuko.data.prepared import load_prepared
from leuko.errors import ConfigError
from leuko.evaluation.metrics import scores

MIP_INPUT = "2D max. intensity projection"
DEFAULT_MIP_NET = "resnet10t"  # the smallest timm ResNet: the 2D counterpart of the tiny 3D nets on CPU


def mip(volumes: np.ndarray) -> np.ndarray:
    """(N, C, D, H, W) -> (N, C, H, W): the maximum along z, the projection the RI study's 2D network saw."""
    if volumes.ndim != 5:
        raise ValueError(f"expected volumes (N, C, D, H, W), got shape {volumes.shape}")
    return np.asarray(volumes).max(axis=2)


def build_mip_net(name: str, *, in_chans: int, num_classes: int):
    # heavy import here: timm (and torch) take seconds to load, and the classical baselines run without them
    import timm

    if name not in timm.list_models():
        close = list(timm.list_models(f"*{name.split('_')[0]}*"))[:8]
        raise ConfigError(
            f"unknown timm model {name!r}; try {DEFAULT_MIP_NET} or resnet18"
            + (f" (names like it: {', '.join(close)})" if close else "")
        )
    # pretrained=False: ImageNet weights would need a download, and the MIP of an RI tomogram is no photo.
    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)


def fit_predict_mip(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    num_classes: int,
    net: str = DEFAULT_MIP_NET,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
) -> np.ndarray:
    """Train a timm 2D net on (N, C, H, W) projections, return the predicted class index of test_x.

    Adam with cosine decay over `epochs`; random flips and 90-degree rotations, because a cell lies on
    the slide in any orientation."""
    # heavy imports here: torch takes seconds to load, and the classical baselines run without it
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_mip_net(net, in_chans=train_x.shape[1], num_classes=num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(epochs * math.ceil(len(train_x) / batch_size), 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x_all = torch.as_tensor(np.ascontiguousarray(train_x), dtype=torch.float32)  # (N, C, H, W)
    y_all = torch.as_tensor(train_y, dtype=torch.long)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x = _augment_2d(x_all[idx], generator).to(device)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    preds = []
    with torch.no_grad():
        test = torch.as_tensor(np.ascontiguousarray(test_x), dtype=torch.float32)
        for start in range(0, len(test), 256):
            preds.append(model(test[start : start + 256].to(device)).argmax(-1).cpu())
    return torch.cat(preds).numpy()


def _augment_2d(x, generator):
    import torch  # loaded already by fit_predict_mip, its only caller

    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-2)
    return torch.rot90(x, int(torch.randint(4, (), generator=generator)), dims=(-2, -1))


def mip_cv(
    prepared_dir: str | Path,
    splits: pd.DataFrame,
    folds: Sequence[str],
    *,
    net: str = DEFAULT_MIP_NET,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    key: str,
) -> pd.DataFrame:
    """Per-fold scores of the 2D MIP baseline on a prepared folder (same normalisation as the 3D nets), as
    baseline rows (method, key, input, fold, scores); key names the method in the baselines table."""
    volumes, index, meta = load_prepared(prepared_dir)
    classes = list(meta["classes"])
    rows_by_id = pd.Series(index["row"].to_numpy(), index=index["cell_id"].astype(str))
    ids = splits["cell_id"].astype(str)
    require_cells(ids, rows_by_id.index, f"are not in {prepared_dir}", "use the prepared folder the CV trained on")
    every = np.concatenate([mip(volumes[i : i + 256]) for i in range(0, len(volumes), 256)])  # (N, C, H, W)
    projections = every[rows_by_id.loc[ids].to_numpy()]  # in the splits' order
    labels = index.set_index(index["cell_id"].astype(str)).loc[ids, "label_index"].to_numpy()
    table = splits.reset_index(drop=True)
    out = []
    for f in folds:
        started = time.perf_counter()
        masks = fold_masks(table, f)
        pred = fit_predict_mip(
            projections[masks["train"]],
            labels[masks["train"]],
            projections[masks["val"]],
            num_classes=len(classes),
            net=net,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed + int(f) if str(f).isdigit() else seed,
            device=device,
        )
        row = {
            "method": f"2D {net} on MIP",
            "key": key,
            "input": MIP_INPUT,
            "fold": str(f),
            **scores(labels[masks["val"]], pred),
        }
        out.append(row)
        if progress:
            progress(
                f"MIP {net} fold {f}: balanced accuracy {row['balanced_accuracy']:.3f} "
                f"({time.perf_counter() - started:.0f} s, {epochs} epochs)"
            )
    return pd.DataFrame(out)
