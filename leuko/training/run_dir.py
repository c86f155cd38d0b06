"""The one owner of a run folder, runs/<name>/: its file names and how to find them.

    runs/<name>/                  a `leuko cv` (or the root of a `leuko fit`)
      mlflow_run_id               the MLflow run of the CV (evaluate, baselines and report log to it)
      cv_summary.json             {metric: {"mean", "std"}} across the folds (std: ddof=1)
      cv_metrics.csv              one row per fold
      oof_predictions.csv         one row per validation cell: cell_id, ..., fold, label, pred_label, prob_<class>
      fold_<k>/                   one fold's fit
        config.yaml               its resolved config
        mlflow_run_id             its MLflow run
        checkpoints/best.ckpt     highest validation score
        checkpoints/last.ckpt     the end of the last epoch (resume)
        predictions.csv           `leuko predict` without --predictions (cell_id, pred_label, prob_<class>)
      eval/                       `leuko evaluate` (its files: leuko.evaluation.evaluate.OUTPUTS)
      baselines/                  `leuko baselines`
      report.html                 `leuko report`

Every other module names these files through the constants and functions here.
"""

from __future__ import annotations

from pathlib import Path

RUN_ID = "mlflow_run_id"
SUMMARY = "cv_summary.json"
FOLD_METRICS = "cv_metrics.csv"
OOF = "oof_predictions.csv"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best.ckpt"
LAST = "last.ckpt"
EVAL = "eval"
BASELINES = "baselines"
REPORT = "report.html"
PREDICTIONS = "predictions.csv"
FOLD_PREFIX = "fold_"


def fold_dir(run: str | Path, fold: int | str) -> Path:
    return Path(run) / f"{FOLD_PREFIX}{fold}"


def checkpoint(run: str | Path, fold: int | str, which: str = BEST) -> Path:
    return fold_dir(run, fold) / CHECKPOINTS / which


def fold_configs(run: str | Path) -> list[Path]:
    return sorted(Path(run).glob(f"{FOLD_PREFIX}*/{CONFIG}"))


def best_checkpoints(run: str | Path) -> dict[str, Path]:
    """{fold name: best.ckpt} for every fold that has one."""
    found = sorted(Path(run).glob(f"{FOLD_PREFIX}*/{CHECKPOINTS}/{BEST}"))
    return {p.parent.parent.name.removeprefix(FOLD_PREFIX): p for p in found}


def is_cv_run(path: str | Path) -> bool:
    return (Path(path) / SUMMARY).is_file()


def read_run_id(folder: str | Path) -> str | None:
    """The MLflow run id a run (or fold) folder recorded, or None."""
    marker = Path(folder) / RUN_ID
    return marker.read_text().strip() or None if marker.is_file() else None


def write_run_id(folder: str | Path, run_id: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ID).write_text(run_id + "\n")
