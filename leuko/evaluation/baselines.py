"""Baselines beside the 3D networks, as in Figure 4 of the RI study (Ryu et al. 2021): five classical
classifiers on the six morphology features, and a 2D CNN on the maximum intensity projection (MIP).

Every baseline is trained and scored on the same patient-grouped folds as `leuko cv` (train on the other
folds' cells, score the fold's validation cells; held-out test patients are never used), so its numbers
sit next to a CV's cv_summary.json without a caveat. Summaries are mean and sample std (ddof=1) across
folds, as in leuko.training.cv.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from leuko.data.folds import fold_masks, fold_names
from leuko.evaluation.morphology import FEATURES

METRICS = ("balanced_accuracy", "accuracy", "macro_f1")
TABLE_COLUMNS = (
    "method",
    "key",
    "input",
    "n_folds",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
)
# (key, table label) of the classical models, in the order of the RI study's Figure 4.
CLASSICAL = (
    ("svm", "SVM (RBF)"),
    ("knn5", "KNN (k=5)"),
    ("lda", "LDA"),
    ("naive_bayes", "naive Bayes"),
    ("decision_tree", "decision tree"),
)
FEATURE_INPUT = "6 morphology features"
MIP_INPUT = "2D max. intensity projection"
DEFAULT_MIP_NET = "resnet10t"  # the smallest timm ResNet: the 2D counterpart of the tiny 3D nets on CPU


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _key(name: str) -> str:
    """A method name as a piece of an MLflow metric name."""
    return re.sub(r"[^0-9a-zA-Z_.-]+", "_", str(name)).strip("_").lower()


# ---------------------------------------------------------------------------------------------- scores
def scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall) and macro F1 of one fold."""
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def summarise(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Per-fold rows (method, key, input, fold, METRICS) -> one row per method with mean and std."""
    rows = []
    for (key, method, source), part in per_fold.groupby(["key", "method", "input"], sort=False):
        row = {"method": method, "key": key, "input": source, "n_folds": len(part)}
        for m in METRICS:
            values = part[m].to_numpy(dtype=float)
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# ---------------------------------------------------------------------------------------------- classical
def classical_models(seed: int = 0) -> dict[str, object]:
    """key -> an sklearn Pipeline (StandardScaler, classifier); scikit-learn defaults otherwise.

    The features span orders of magnitude (volume in fL, RI near 1.37), so every model sees z-scores
    fitted on its training folds only."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    return {
        "svm": make_pipeline(StandardScaler(), SVC(kernel="rbf")),
        "knn5": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5)),  # k=5 as in the RI study
        "lda": make_pipeline(StandardScaler(), LinearDiscriminantAnalysis()),
        "naive_bayes": make_pipeline(StandardScaler(), GaussianNB()),
        "decision_tree": make_pipeline(StandardScaler(), DecisionTreeClassifier(random_state=seed)),
    }


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The morphology features that are measured for every cell (HHG cells have no RI features)."""
    missing = [c for c in ("cell_id", "label", *FEATURES) if c not in features.columns]
    if missing:
        raise ValueError(f"feature table lacks column(s) {', '.join(missing)}; make it with `leuko features`")
    usable = [c for c in FEATURES if features[c].notna().all()]
    partly = [c for c in FEATURES if c not in usable and features[c].notna().any()]
    if partly:
        raise ValueError(
            f"feature(s) {', '.join(partly)} are missing for some cells but not others; "
            "measure every cell of one modality (recompute with `leuko features`)"
        )
    if not usable:
        raise ValueError("no morphology feature is measured for every cell; recompute with `leuko features`")
    return usable


def classical_cv(features: pd.DataFrame, splits: pd.DataFrame, folds: Sequence[str], *, seed: int = 0) -> pd.DataFrame:
    """Per-fold scores of each classical model on the morphology features.

    features: one row per cell (cell_id, label, FEATURES), from features_table. splits: cell_id and fold
    (from make_splits or read_splits); cells in the splits must all have features."""
    from sklearn.base import clone

    columns = feature_columns(features)
    table = align(features, splits)
    x = table[columns].to_numpy(dtype=float)
    y = table["label"].astype(str).to_numpy()
    rows = []
    labels = dict(CLASSICAL)
    for key, model in classical_models(seed).items():
        for f in folds:
            masks = fold_masks(table, f)
            fitted = clone(model).fit(x[masks["train"]], y[masks["train"]])
            pred = fitted.predict(x[masks["val"]])
            rows.append(
                {
                    "method": labels[key],
                    "key": key,
                    "input": FEATURE_INPUT,
                    "fold": str(f),
                    **scores(y[masks["val"]], pred),
                }
            )
    return pd.DataFrame(rows)


def _require_cells(ids: pd.Series, known: pd.Index, problem: str, fix: str) -> None:
    absent = sorted(set(ids) - set(known))
    if absent:
        raise ValueError(f"{len(absent)} cell(s) of the folds {problem} (e.g. {', '.join(absent[:3])}); {fix}")


def align(features: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The features of exactly the cells in splits, in the splits' order, with their fold."""
    by_id = features.assign(cell_id=features["cell_id"].astype(str)).drop_duplicates("cell_id")
    by_id = by_id.set_index("cell_id", drop=False)
    ids = splits["cell_id"].astype(str)
    _require_cells(
        ids,
        by_id.index,
        "have no morphology features",
        "compute features from the manifest the data was prepared from (`leuko features --manifest M`), "
        "or delete a stale --features cache",
    )
    table = by_id.loc[ids].reset_index(drop=True)
    table["fold"] = splits["fold"].astype(str).to_numpy()
    return table


# ---------------------------------------------------------------------------------------------- 2D MIP
def mip(volumes: np.ndarray) -> np.ndarray:
    """(N, C, D, H, W) -> (N, C, H, W): the maximum along z, the projection the RI study's 2D network saw."""
    if volumes.ndim != 5:
        raise ValueError(f"expected volumes (N, C, D, H, W), got shape {volumes.shape}")
    return np.asarray(volumes).max(axis=2)


def build_mip_net(name: str, *, in_chans: int, num_classes: int):
    import timm

    if name not in timm.list_models():
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*")][:8]
        raise ValueError(
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
    import torch

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
) -> pd.DataFrame:
    """Per-fold scores of the 2D MIP baseline on a prepared folder (same normalisation as the 3D nets)."""
    from leuko.data.prepare import load_prepared

    volumes, index, meta = load_prepared(prepared_dir)
    classes = list(meta["classes"])
    rows_by_id = pd.Series(index["row"].to_numpy(), index=index["cell_id"].astype(str))
    ids = splits["cell_id"].astype(str)
    _require_cells(ids, rows_by_id.index, f"are not in {prepared_dir}", "use the prepared folder the CV trained on")
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
            "key": f"mip2d_{_key(net)}",
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


# ---------------------------------------------------------------------------------------------- 3D rows
def cv_rows(cv_dir: str | Path) -> pd.DataFrame:
    """The per-fold scores of a `leuko cv` output folder, as baseline rows (its net names the method)."""
    cv_dir = Path(cv_dir)
    metrics_path = cv_dir / "cv_metrics.csv"
    if not metrics_path.is_file():
        raise ValueError(f"{cv_dir}: no cv_metrics.csv; give --cv the output folder of `leuko cv` (runs/<name>)")
    metrics = pd.read_csv(metrics_path)
    missing = [m for m in METRICS if m not in metrics.columns]
    if missing:
        raise ValueError(f"{metrics_path}: lacks column(s) {', '.join(missing)}")
    net = cv_config(cv_dir).get("model", {}).get("net", "3D net")
    rows = metrics[["fold", *METRICS]].copy()
    rows.insert(0, "input", "3D volume")
    rows.insert(0, "key", f"cv3d_{_key(net)}_{_key(cv_dir.name)}")
    rows.insert(0, "method", f"3D {net} ({cv_dir.name})")
    rows["fold"] = rows["fold"].astype(str)
    return rows


def cv_config(cv_dir: str | Path) -> dict:
    """The resolved config of a CV (the first fold's config.yaml; every fold shares it but the fold)."""
    import yaml

    cv_dir = Path(cv_dir)
    configs = sorted(cv_dir.glob("fold_*/config.yaml"))
    if not configs:
        return {}
    return yaml.safe_load(configs[0].read_text()) or {}


def cv_splits(cv_dir: str | Path) -> tuple[pd.DataFrame, list[str], Path]:
    """(splits, folds the CV ran, prepared_dir) of a CV output folder: the same cells per fold as its DataModule."""
    from leuko.data.folds import make_splits, read_splits
    from leuko.data.prepare import load_prepared

    cv_dir = Path(cv_dir)
    config = cv_config(cv_dir)
    data = config.get("data")
    if not data:
        raise ValueError(
            f"{cv_dir}: no fold_*/config.yaml with a data section, so the folds cannot be rebuilt; "
            "pass --prepared, --k, --seed and --test-fraction instead of --cv"
        )
    prepared = Path(data.get("prepared_dir", "prepared"))
    _, index, _ = load_prepared(prepared)
    if data.get("splits"):
        splits = read_splits(data["splits"])
    else:
        splits = make_splits(
            index,
            k=int(data.get("k", 5)),
            test_fraction=float(data.get("test_fraction", 0.2)),
            seed=int(data.get("seed", 0)),
        )
    metrics = pd.read_csv(cv_dir / "cv_metrics.csv") if (cv_dir / "cv_metrics.csv").is_file() else None
    folds = [str(f) for f in metrics["fold"]] if metrics is not None else fold_names(splits)
    return splits.reset_index(drop=True), folds, prepared


# ---------------------------------------------------------------------------------------------- everything
def compare(
    features: pd.DataFrame,
    *,
    cv_dirs: Sequence[str | Path] = (),
    prepared_dir: str | Path | None = None,
    k: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    mip_net: str | None = DEFAULT_MIP_NET,
    mip_epochs: int = 10,
    mip_batch_size: int = 32,
    device: str = "cpu",
    progress: Callable[[str], None] | None = log,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(summary table, per-fold scores, settings): the CVs' 3D rows, the classical models, the MIP net.

    With cv_dirs the folds (and the prepared folder, unless given) are those the first CV trained on;
    every CV must share them. Without, folds come from make_splits over the prepared index with k,
    test_fraction and seed: the split `leuko folds` and the DataModule make with the same values.
    mip_net=None leaves the 2D baseline out."""
    from leuko.data.folds import make_splits
    from leuko.data.prepare import load_prepared

    cv_dirs = [Path(c) for c in cv_dirs]
    if cv_dirs:
        splits, folds, cv_prepared = cv_splits(cv_dirs[0])
        for other in cv_dirs[1:]:
            other_splits, other_folds, _ = cv_splits(other)
            same = dict(zip(splits["cell_id"].astype(str), splits["fold"].astype(str)))
            if (
                other_folds != folds
                or dict(zip(other_splits["cell_id"].astype(str), other_splits["fold"].astype(str))) != same
            ):
                raise ValueError(
                    f"{other} was cross-validated on other folds than {cv_dirs[0]} (folds {other_folds} vs "
                    f"{folds}); compare CVs of one split in one table"
                )
        prepared_dir = Path(prepared_dir) if prepared_dir is not None else cv_prepared
        source = f"folds of {cv_dirs[0]}"
    else:
        if prepared_dir is None:
            raise ValueError("give --prepared (the prepared folder), or --cv runs/<name> to take its folds")
        _, index, _ = load_prepared(prepared_dir)
        splits = make_splits(index, k=k, test_fraction=test_fraction, seed=seed).reset_index(drop=True)
        folds = fold_names(splits)
        source = f"make_splits(k={k}, test_fraction={test_fraction}, seed={seed})"
    if progress:
        progress(
            f"baselines on {len(folds)} fold(s) ({source}): "
            f"{int((splits['fold'].astype(str).isin(folds)).sum())} validation cells"
        )

    parts = [cv_rows(c) for c in cv_dirs]
    started = time.perf_counter()
    parts.append(classical_cv(features, splits, folds, seed=seed))
    if progress:
        progress(f"classical models: {time.perf_counter() - started:.1f} s")
    if mip_net:
        parts.append(
            mip_cv(
                prepared_dir,
                splits,
                folds,
                net=mip_net,
                epochs=mip_epochs,
                batch_size=mip_batch_size,
                seed=seed,
                device=device,
                progress=progress,
            )
        )
    per_fold = pd.concat(parts, ignore_index=True)
    settings = {
        "folds": folds,
        "fold_source": source,
        "prepared_dir": str(prepared_dir),
        "cv": [str(c) for c in cv_dirs],
        "seed": seed,
        "features": feature_columns(features),
        "mip_net": mip_net,
        "mip_epochs": mip_epochs,
        "mip_batch_size": mip_batch_size,
        "device": device,
    }
    return summarise(per_fold), per_fold, settings


# ---------------------------------------------------------------------------------------------- the table
def format_table(table: pd.DataFrame) -> str:
    """A plain-text table: method, input, balanced accuracy mean ± std, accuracy, macro F1, folds."""
    header = f"{'method':<34} {'input':<30} {'balanced acc.':>15} {'accuracy':>15} {'macro F1':>15} {'folds':>5}"
    lines = [header, "-" * len(header)]
    for row in table.to_dict("records"):
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS]
        lines.append(
            f"{row['method']:<34} {row['input']:<30} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
            f"{int(row['n_folds']):>5}"
        )
    return "\n".join(lines)


def metric_dict(table: pd.DataFrame) -> dict[str, float]:
    """baselines/<key>/<metric>_<mean|std> for every row: what log_baselines records in MLflow."""
    return {
        f"baselines/{row['key']}/{m}_{s}": float(row[f"{m}_{s}"])
        for row in table.to_dict("records")
        for m in METRICS
        for s in ("mean", "std")
    }


def write_outputs(out_dir: str | Path, table: pd.DataFrame, per_fold: pd.DataFrame, settings: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "baselines.csv", index=False)
    per_fold.to_csv(out_dir / "baselines_folds.csv", index=False)
    (out_dir / "baselines.json").write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def log_baselines(client, run_id: str, out_dir: str | Path, table: pd.DataFrame) -> None:
    """Artifacts baselines/{baselines.csv, baselines_folds.csv, baselines.json} and the metric_dict metrics."""
    from mlflow.entities import Metric

    out_dir = Path(out_dir)
    for name in ("baselines.csv", "baselines_folds.csv", "baselines.json"):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), "baselines")
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in metric_dict(table).items() if np.isfinite(v)]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
