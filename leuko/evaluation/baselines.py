"""Baselines beside the 3D networks, as in Figure 4 of the RI study (Ryu et al. 2021): five classical
classifiers on the six morphology features, and a 2D CNN on the maximum intensity projection (MIP).

Every baseline is trained and scored on the same patient-grouped folds as `leuko cv` (train on the other
folds' cells, score the fold's validation cells; held-out test patients are never used), so its numbers
sit next to a CV's cv_summary.json without a caveat. Summaries are mean and sample std (ddof=1) across
folds, as in leuko.training.cv.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from leuko.data.folds import fold_masks, fold_names, make_splits, read_splits, require_cells
from leuko.data.prepared import load_prepared
from leuko.errors import LeukoError
from leuko.evaluation.metrics import SCORES, mean_std, scores
from leuko.evaluation.mip import DEFAULT_MIP_NET, mip_cv
from leuko.evaluation.morphology import FEATURES
from leuko.training.run_dir import BASELINES, CONFIG, FOLD_METRICS, FOLD_PREFIX, fold_configs

METRICS = SCORES
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
# The files write_outputs writes (runs/<name>/baselines/ for a CV) and log_baselines logs.
TABLE = "baselines.csv"
FOLDS_TABLE = "baselines_folds.csv"
SETTINGS = "baselines.json"
OUTPUTS = (TABLE, FOLDS_TABLE, SETTINGS)


class BaselineError(LeukoError, ValueError):
    """Features, a CV folder or CVs on other folds that the baselines cannot use; the message says the fix.
    (Cells missing from the folds' tables raise leuko.data.folds.SplitError, an unknown MIP net ConfigError.)"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _key(name: str) -> str:
    """A method name as a piece of an MLflow metric name."""
    return re.sub(r"[^0-9a-zA-Z_.-]+", "_", str(name)).strip("_").lower()


# ---------------------------------------------------------------------------------------------- scores
def summarise(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Per-fold rows (method, key, input, fold, METRICS) -> one row per method with mean and std."""
    rows = []
    for (key, method, source), part in per_fold.groupby(["key", "method", "input"], sort=False):
        row = {"method": method, "key": key, "input": source, "n_folds": len(part)}
        for m in METRICS:
            stats = mean_std(part[m].to_numpy(dtype=float))
            row[f"{m}_mean"], row[f"{m}_std"] = stats["mean"], stats["std"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# ---------------------------------------------------------------------------------------------- classical
def classical_models(seed: int = 0) -> dict[str, object]:
    """key -> an sklearn Pipeline (StandardScaler, classifier); scikit-learn defaults otherwise.

    The features span orders of magnitude (volume in fL, RI near 1.37), so every model sees z-scores
    fitted on its training folds only."""
    # heavy imports here: scikit-learn's models take seconds to load, and only the classical baselines need them
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
        raise BaselineError(f"feature table lacks column(s) {', '.join(missing)}; make it with `leuko features`")
    usable = [c for c in FEATURES if features[c].notna().all()]
    partly = [c for c in FEATURES if c not in usable and features[c].notna().any()]
    if partly:
        raise BaselineError(
            f"feature(s) {', '.join(partly)} are missing for some cells but not others; "
            "measure every cell of one modality (recompute with `leuko features`)"
        )
    if not usable:
        raise BaselineError("no morphology feature is measured for every cell; recompute with `leuko features`")
    return usable


def classical_cv(features: pd.DataFrame, splits: pd.DataFrame, folds: Sequence[str], *, seed: int = 0) -> pd.DataFrame:
    """Per-fold scores of each classical model on the morphology features.

    features: one row per cell (cell_id, label, FEATURES), from features_table. splits: cell_id and fold
    (from make_splits or read_splits); cells in the splits must all have features."""
    from sklearn.base import clone  # heavy import here, as in classical_models

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


def align(features: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The features of exactly the cells in splits, in the splits' order, with their fold."""
    by_id = features.assign(cell_id=features["cell_id"].astype(str)).drop_duplicates("cell_id")
    by_id = by_id.set_index("cell_id", drop=False)
    ids = splits["cell_id"].astype(str)
    require_cells(
        ids,
        by_id.index,
        "have no morphology features",
        "compute features from the manifest the data was prepared from (`leuko features --manifest M`), "
        "or delete a stale --features cache",
    )
    table = by_id.loc[ids].reset_index(drop=True)
    table["fold"] = splits["fold"].astype(str).to_numpy()
    return table


# ---------------------------------------------------------------------------------------------- 3D rows
def cv_rows(cv_dir: str | Path) -> pd.DataFrame:
    """The per-fold scores of a `leuko cv` output folder, as baseline rows (its net names the method)."""
    cv_dir = Path(cv_dir)
    metrics_path = cv_dir / FOLD_METRICS
    if not metrics_path.is_file():
        raise BaselineError(f"{cv_dir}: no {FOLD_METRICS}; give --cv the output folder of `leuko cv` (runs/<name>)")
    metrics = pd.read_csv(metrics_path)
    missing = [m for m in METRICS if m not in metrics.columns]
    if missing:
        raise BaselineError(f"{metrics_path}: lacks column(s) {', '.join(missing)}")
    net = cv_config(cv_dir).get("model", {}).get("net", "3D net")
    rows = metrics[["fold", *METRICS]].copy()
    rows.insert(0, "input", "3D volume")
    rows.insert(0, "key", f"cv3d_{_key(net)}_{_key(cv_dir.name)}")
    rows.insert(0, "method", f"3D {net} ({cv_dir.name})")
    rows["fold"] = rows["fold"].astype(str)
    return rows


def cv_config(cv_dir: str | Path) -> dict:
    """The resolved config of a CV (the first fold's config.yaml; every fold shares it but the fold)."""
    configs = fold_configs(cv_dir)
    if not configs:
        return {}
    return yaml.safe_load(configs[0].read_text()) or {}


def cv_splits(cv_dir: str | Path) -> tuple[pd.DataFrame, list[str], Path]:
    """(splits, folds the CV ran, prepared_dir) of a CV output folder: the same cells per fold as its DataModule."""
    cv_dir = Path(cv_dir)
    config = cv_config(cv_dir)
    data = config.get("data")
    if not data:
        raise BaselineError(
            f"{cv_dir}: no {FOLD_PREFIX}*/{CONFIG} with a data section, so the folds cannot be rebuilt; "
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
    metrics = pd.read_csv(cv_dir / FOLD_METRICS) if (cv_dir / FOLD_METRICS).is_file() else None
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
    cv_dirs = [Path(c) for c in cv_dirs]
    splits, folds, prepared_dir, source = _common_folds(cv_dirs, prepared_dir, k, test_fraction, seed)
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
                key=f"mip2d_{_key(mip_net)}",
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


def _common_folds(
    cv_dirs: list[Path], prepared_dir: str | Path | None, k: int, test_fraction: float, seed: int
) -> tuple[pd.DataFrame, list[str], Path, str]:
    """(splits, folds, prepared_dir, where the folds come from) that every method is scored on."""
    if not cv_dirs:
        if prepared_dir is None:
            raise BaselineError("give --prepared (the prepared folder), or --cv runs/<name> to take its folds")
        _, index, _ = load_prepared(prepared_dir)
        splits = make_splits(index, k=k, test_fraction=test_fraction, seed=seed).reset_index(drop=True)
        return (
            splits,
            fold_names(splits),
            prepared_dir,
            f"make_splits(k={k}, test_fraction={test_fraction}, seed={seed})",
        )
    splits, folds, cv_prepared = cv_splits(cv_dirs[0])
    for other in cv_dirs[1:]:
        other_splits, other_folds, _ = cv_splits(other)
        same = dict(zip(splits["cell_id"].astype(str), splits["fold"].astype(str)))
        if (
            other_folds != folds
            or dict(zip(other_splits["cell_id"].astype(str), other_splits["fold"].astype(str))) != same
        ):
            raise BaselineError(
                f"{other} was cross-validated on other folds than {cv_dirs[0]} (folds {other_folds} vs "
                f"{folds}); compare CVs of one split in one table"
            )
    prepared_dir = Path(prepared_dir) if prepared_dir is not None else cv_prepared
    return splits, folds, prepared_dir, f"folds of {cv_dirs[0]}"


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
    table.to_csv(out_dir / TABLE, index=False)
    per_fold.to_csv(out_dir / FOLDS_TABLE, index=False)
    (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def log_baselines(client, run_id: str, out_dir: str | Path, table: pd.DataFrame) -> None:
    """Artifacts baselines/{baselines.csv, baselines_folds.csv, baselines.json} and the metric_dict metrics."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    from mlflow.entities import Metric

    from leuko.tracking.runs import log_batch

    out_dir = Path(out_dir)
    for name in OUTPUTS:
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), BASELINES)
    now = int(time.time() * 1000)
    log_batch(client, run_id, metrics=[Metric(k, v, now, 0) for k, v in metric_dict(table).items() if np.isfinite(v)])
