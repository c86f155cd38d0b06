"""The leaderboard of a study: one row per trial, best first (sweeps/<study>/leaderboard.csv), and its console table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from leuko.sweep.space import SweepConfig, short_key, show_value
from leuko.sweep.study import A_FOLDS, A_SCORE_STD, S_BASE_NET


def leaderboard(study: optuna.Study, cfg: SweepConfig) -> pd.DataFrame:
    """One row per trial, best first: trial, state, model, each sampled parameter, score, std, duration."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        net = t.params.get("model.net", cfg.fixed.get("model.net", study.user_attrs.get(S_BASE_NET)))
        row = {"trial": t.number, "state": t.state.name, "model": net}
        row.update({k: t.params.get(k) for k in cfg.space if k != "model.net"})
        row[cfg.objective] = t.value if t.state == TrialState.COMPLETE else None
        row["std"] = t.user_attrs.get(A_SCORE_STD)
        row["folds"] = len(t.user_attrs.get(A_FOLDS, []))
        if t.intermediate_values:
            step = max(t.intermediate_values)
            row["last_step"], row["last_value"] = step, t.intermediate_values[step]
        else:
            row["last_step"], row["last_value"] = None, None
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration else None
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    # COMPLETE trials by score, then PRUNED ones by how far they got and their last score, then the rest.
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    sign = -1.0 if cfg.direction == "maximize" else 1.0

    def rank(r) -> tuple:
        score = r[cfg.objective] if pd.notna(r[cfg.objective]) else r["last_value"]
        step = r["last_step"] if r["state"] == "PRUNED" and pd.notna(r["last_step"]) else 0
        return (order.get(r["state"], 5), -step, sign * score if pd.notna(score) else math.inf, r["trial"])

    return board.iloc[sorted(range(len(board)), key=lambda i: rank(board.iloc[i]))].reset_index(drop=True)


def print_leaderboard(board: pd.DataFrame, cfg: SweepConfig, limit: int = 20) -> None:
    if board.empty:
        print("no trials yet")
        return
    shown = board.head(limit).copy()
    score = []
    for _, r in shown.iterrows():
        if pd.notna(r[cfg.objective]):
            spread = f"±{r['std']:.3f}" if r["folds"] > 1 and pd.notna(r["std"]) else ""  # no spread from one fold
            score.append(f"{r[cfg.objective]:.3f}{spread}")
        elif pd.notna(r["last_value"]):
            score.append(f"({r['last_value']:.3f} @ step {int(r['last_step'])})")
        else:
            score.append("-")
    table = pd.DataFrame({"trial": shown["trial"], "model": shown["model"]})
    for key in cfg.space:
        if key != "model.net":
            table[short_key(key)] = [show_value(v) if pd.notna(v) else "-" for v in shown[key]]
    table[f"cv {cfg.objective}"] = score
    table["state"] = shown["state"]
    table["time"] = [f"{v:.0f} s" if pd.notna(v) else "-" for v in shown["duration_s"]]
    print(
        f"\nleaderboard of study {cfg.study} ({len(board)} trials; cross-validated score as mean±std over folds;"
        " pruned trials show their last reported score)"
    )
    print(table.to_string(index=False))
    if len(board) > limit:
        print(f"... {len(board) - limit} more in leaderboard.csv")


def print_heldout(cfg: SweepConfig, data: dict, cache: Path) -> None:
    """The sweep file's baselines on the held-out test patients (cached in `cache`), under the leaderboard."""
    from leuko.errors import LeukoError
    from leuko.evaluation.heldout import format_heldout, sweep_baselines  # heavy imports: sklearn, torch

    try:
        table = sweep_baselines(cfg.baselines or {}, data, cache)
    except (LeukoError, OSError, ValueError) as exc:
        print(f"warning: no held-out baselines ({exc}); check `baselines:` in {cfg.path}", file=sys.stderr)
        return
    if table.empty:
        return
    print(
        f"\nbaselines on the {int(table['n_test'].iloc[0])} cells of the held-out test patients "
        "(the champion's test score on the same cells comes with `leuko register`):"
    )
    print(format_heldout(table))
