"""The baselines on the held-out test patients: what a registered model's test score is read beside.

`leuko sweep` prints them under its leaderboard and `leuko register` beside the champion's test score:
the five classical models of the RI study on the six morphology features, and the 2D CNN on the maximum
intensity projection, each trained on every non-test cell and scored once on the test patients' cells.
The split is the one the 3D nets use: make_splits over the prepared index with the same k, test_fraction
and seed. Results are cached in a folder (with the data's fingerprint and the settings), because the MIP
net takes a minute to train on a CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.folds import TEST, make_splits
from leuko.data.prepared import load_prepared
from leuko.evaluation.baselines import CLASSICAL, FEATURE_INPUT, align, classical_models, feature_columns, log
from leuko.evaluation.metrics import SCORES, scores
from leuko.evaluation.mip import DEFAULT_MIP_NET, MIP_INPUT, fit_predict_mip, mip
from leuko.evaluation.morphology import features_table

TABLE = "heldout_baselines.csv"
SETTINGS = "heldout_baselines.json"
SPLIT_KEYS = ("prepared_dir", "k", "test_fraction", "seed")  # the data settings that place the test patients


def split_settings(data) -> dict:
    """The SPLIT_KEYS of a config's `data` section: where a model's held-out test patients are."""
    return {key: data[key] for key in SPLIT_KEYS}


def sweep_baselines(spec: dict, split: dict, cache: str | Path) -> pd.DataFrame:
    """heldout_baselines for a sweep file's `baselines:` entry ({manifest, mip_net, mip_epochs}) and a split."""
    return heldout_baselines(
        split["prepared_dir"],
        spec["manifest"],
        k=split["k"],
        test_fraction=split["test_fraction"],
        seed=split["seed"],
        mip_net=spec.get("mip_net", DEFAULT_MIP_NET),
        mip_epochs=int(spec.get("mip_epochs", 10)),
        cache=cache,
    )


def heldout_baselines(
    prepared_dir: str | Path,
    manifest: str | Path,
    *,
    k: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    mip_net: str | None = DEFAULT_MIP_NET,
    mip_epochs: int = 10,
    cache: str | Path | None = None,
    progress: Callable[[str], None] | None = log,
) -> pd.DataFrame:
    """One row per baseline: method, key, input, n_test and the SCORES on the held-out test cells.

    manifest: the raw cells of the prepared folder (the morphology features are measured on them).
    cache: a folder; a table computed there for the same data and settings is read instead of recomputed."""
    volumes, index, meta = load_prepared(prepared_dir)
    settings = {
        "fingerprint": meta.get("fingerprint"),
        "k": k,
        "test_fraction": test_fraction,
        "seed": seed,
        "mip_net": mip_net,
        "mip_epochs": mip_epochs,
    }
    cached = _read_cache(cache, settings)
    if cached is not None:
        return cached
    splits = make_splits(index, k=k, test_fraction=test_fraction, seed=seed)
    is_test = (splits["fold"].astype(str) == TEST).to_numpy()
    if not is_test.any():
        return pd.DataFrame(columns=["method", "key", "input", "n_test", *SCORES])
    started = time.perf_counter()
    features = features_table(manifest, progress=False)
    table = align(features, splits)
    columns = feature_columns(features)
    x, y = table[columns].to_numpy(dtype=float), table["label"].astype(str).to_numpy()
    test = is_test  # align() keeps exactly the splits' cells, in their order
    labels = dict(CLASSICAL)
    rows = []
    for key, model in classical_models(seed).items():
        pred = model.fit(x[~test], y[~test]).predict(x[test])
        rows.append({"method": labels[key], "key": key, "input": FEATURE_INPUT, **scores(y[test], pred)})
    if progress:
        progress(
            f"held-out baselines: classical models on {int(test.sum())} test cells "
            f"({time.perf_counter() - started:.0f} s)"
        )
    if mip_net:
        started = time.perf_counter()
        rows_of = pd.Series(index["row"].to_numpy(), index=index["cell_id"].astype(str))
        every = np.concatenate([mip(volumes[i : i + 256]) for i in range(0, len(volumes), 256)])  # (N, C, H, W)
        projections = every[rows_of.loc[splits["cell_id"].astype(str)].to_numpy()]  # in the splits' order
        label_index = index.set_index(index["cell_id"].astype(str)).loc[splits["cell_id"].astype(str), "label_index"]
        label_index = label_index.to_numpy()
        pred = fit_predict_mip(
            projections[~is_test],
            label_index[~is_test],
            projections[is_test],
            num_classes=len(meta["classes"]),
            net=mip_net,
            epochs=mip_epochs,
            seed=seed,
        )
        rows.append(
            {"method": f"2D {mip_net} on MIP", "key": "mip2d", "input": MIP_INPUT, **scores(label_index[is_test], pred)}
        )
        if progress:
            progress(f"held-out baselines: 2D {mip_net} on the MIP ({time.perf_counter() - started:.0f} s)")
    out = pd.DataFrame(rows)
    out.insert(3, "n_test", int(test.sum()))
    _write_cache(cache, settings, out)
    return out


def _read_cache(cache: str | Path | None, settings: dict) -> pd.DataFrame | None:
    if cache is None:
        return None
    folder = Path(cache)
    try:
        if json.loads((folder / SETTINGS).read_text()) == settings:
            return pd.read_csv(folder / TABLE)
    except (OSError, ValueError):
        return None
    return None


def _write_cache(cache: str | Path | None, settings: dict, table: pd.DataFrame) -> None:
    if cache is None:
        return
    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / TABLE, index=False)
    (folder / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")


def format_heldout(table: pd.DataFrame, champion: dict[str, float] | None = None) -> str:
    """The table as console lines, the champion's row first when given ({metric: value})."""
    lines = [f"{'method':<28} {'input':<22} " + " ".join(f"{m:>17}" for m in SCORES)]
    if champion:
        lines.append(
            f"{'champion (3D net)':<28} {'3D volume':<22} "
            + " ".join(f"{champion.get(m, float('nan')):>17.3f}" for m in SCORES)
        )
    for _, row in table.iterrows():
        lines.append(f"{row['method']:<28} {row['input']:<22} " + " ".join(f"{row[m]:>17.3f}" for m in SCORES))
    return "\n".join(lines)
