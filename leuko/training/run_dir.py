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

Every other module names these files through the constants and functions here. Checkpoints are read
weights-only (load_checkpoint), so a runs/ folder received from someone else cannot run code.

A run never writes into another run's folder: a default name (cv-<time>, register-<time>) is created
exclusively, with -2, -3, ... when another run took it in the same second, and an explicit name whose
folder already holds a CV is refused unless the caller asks to replace it.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import shutil
import time
from pathlib import Path, PosixPath, PurePosixPath

from leuko.errors import LeukoError

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
CV_OUTPUTS = (RUN_ID, SUMMARY, FOLD_METRICS, OOF)  # besides the fold_<k>/ folders


class RunFolderError(LeukoError, ValueError):
    """A run folder another run already holds; the message names it and the ways out."""


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


def read_summary(run: str | Path | None) -> dict:
    """A CV's {metric: {"mean", "std"}} (its cv_summary.json); {} when run is None or has none yet."""
    path = Path(run) / SUMMARY if run else None
    if path is None or not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc}); rerun the `leuko cv` that wrote it") from exc
    if not isinstance(summary, dict):
        raise RunFolderError(f"{path}: holds {type(summary).__name__}, not {{metric: {{mean, std}}}}; rerun the "
                             "`leuko cv` that wrote it")  # fmt: skip
    return summary


def read_run_id(folder: str | Path) -> str | None:
    """The MLflow run id a run (or fold) folder recorded, or None."""
    marker = Path(folder) / RUN_ID
    return marker.read_text().strip() or None if marker.is_file() else None


def write_run_id(folder: str | Path, run_id: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ID).write_text(run_id + "\n")


def cv_outputs(folder: str | Path) -> list[str]:
    """Names of the CV outputs (fold folders, run id, summaries) the folder already holds."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in CV_OUTPUTS or p.name.startswith(FOLD_PREFIX))


def new_folder(out: str | Path, prefix: str, *, stamp: bool = True) -> Path:
    """out/<prefix>-<YYYYmmdd-HHMMSS> (out/<prefix> when not stamp), created here and so held by no other
    run: -2, -3, ... are appended while the name is taken."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}" if stamp else prefix
    for n in itertools.count(1):
        folder = out / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()  # atomic: of two runs in the same second, one gets base, the other base-2
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


def claim_cv_folder(out: str | Path, name: str | None, first_fold: int | str, *, replace: bool = False) -> Path:
    """The folder of a new CV: out/cv-<time> when name is None, else out/<name>, refused when it holds a CV.

    replace=True removes the earlier CV's folder (its checkpoints, summaries and evaluation) first. The
    first fold's folder is created exclusively, so of two CVs started at once under one name, one stops.
    """
    folder = new_folder(out, "cv") if name is None else Path(out) / name
    held = cv_outputs(folder)
    if held and replace:
        shutil.rmtree(folder)
    elif held:
        raise RunFolderError(
            f"{folder} already holds a CV ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): choose "
            f"another --name, remove the folder, or pass --replace to delete it and run this CV there"
        )
    try:
        fold_dir(folder, first_fold).mkdir(parents=True)
    except FileExistsError:
        raise RunFolderError(f"{folder}: another CV started in this folder just now; choose another --name") from None
    return folder


class CheckpointError(LeukoError, ValueError):
    """A checkpoint that only unpickling could read (code in it would run): the message names the file."""


# What a checkpoint may hold besides tensors, numbers, strings and containers: Lightning stores plain values,
# but a Path passed as an argument from Python lands in the hyperparameters as one.
SAFE_GLOBALS = (PosixPath, PurePosixPath)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint read weights-only: nothing in it runs code (a pickle can call any function while it is
    read). A file that needs more is refused with CheckpointError."""
    import torch  # heavy import here: most users of this module never read a checkpoint

    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise unsafe_checkpoint(path, exc) from None


def unsafe_checkpoint(path: str | Path, exc: Exception) -> CheckpointError:
    """The refusal of a checkpoint that torch's weights-only reader rejected with exc."""
    text = str(exc)
    needs = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(r"error:\s*(\S[^\n]*)", text)
    what = f" (it needs {needs.group(1)})" if needs else ""
    return CheckpointError(
        f"{path}: refused: it holds objects that only unpickling can rebuild{what}, and unpickling runs code "
        "stored in the file. leuko reads checkpoints weights-only; use one that leuko wrote, or retrain"
    )
