"""`leuko report`: one self-contained HTML page for a cross-validation run.

Every number in the page is read from the files a CV and `leuko evaluate` / `leuko baselines` wrote
(cv_summary.json, cv_metrics.csv, eval/*, baselines/baselines.csv), either from the CV's output folder
or from the artifacts of its MLflow parent run. When the MLflow run can be reached, the numbers shown are
compared with the metrics logged there and the page says whether they match. Images are embedded as
base64 PNG and the CSS is inline: the file can be mailed or archived on its own.

The exact numbers shown are also embedded as JSON (<script id="leuko-numbers" type="application/json">).
This module finds and reads the inputs; leuko.evaluation.report_sections writes the HTML. With a registered
model (--model), leuko.evaluation.report_deploy adds its ONNX export check and its model card.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from leuko.errors import LeukoError
from leuko.evaluation import baselines, embedding, evaluate, intervals
from leuko.evaluation.report_deploy import (
    EXPORT,
    Deployment,
    deploy_numbers,
    deployment,
    resolve_model,
    with_deploy_section,
)
from leuko.evaluation.report_saliency import with_saliency_section
from leuko.evaluation.report_sections import SECTIONS, ReportInputs, page
from leuko.evaluation.report_trust import with_trust_sections
from leuko.tracking.uri import resolve_tracking_uri
from leuko.training.run_dir import BASELINES, CONFIG, EVAL, FOLD_METRICS, SUMMARY, fold_configs, read_summary

# MLflow stores metrics as doubles; CSV and JSON round-trips keep 15+ significant digits.
MATCH_TOLERANCE = 1e-9


class ReportError(LeukoError, ValueError):
    """A --run that names no CV output folder or CV run; the message says what to give instead."""


@dataclass
class RunFiles:
    """Where the report's inputs are: a CV folder (or an MLflow download of one) and its MLflow run."""

    name: str
    root: Path
    eval_dir: Path | None
    baselines_dir: Path | None
    source: str
    run_id: str | None = None
    client: object | None = None
    tags: dict = field(default_factory=dict)
    logged: dict = field(default_factory=dict)  # the parent run's metrics (latest values)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- inputs
def locate(
    run: str,
    *,
    tracking_uri: str | None = None,
    eval_dir: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    download_to: Path | None = None,
) -> RunFiles:
    """A CV output folder (runs/<name>) or an MLflow run id -> RunFiles (downloading a run's artifacts)."""
    if Path(run).is_dir():
        files = _locate_folder(Path(run), tracking_uri, eval_dir, baselines_dir)
    else:
        files = _locate_mlflow_run(run, tracking_uri, download_to)
    if files.client is not None and files.run_id is not None:
        try:
            info = files.client.get_run(files.run_id)
            files.tags, files.logged = dict(info.data.tags), dict(info.data.metrics)
        except Exception as exc:
            log(f"MLflow run {files.run_id} could not be read ({exc}); the report is not checked against it")
            files.run_id = None
    return files


def _locate_folder(path: Path, tracking_uri: str | None, eval_dir, baselines_dir) -> RunFiles:
    if not (path / SUMMARY).is_file():
        raise ReportError(f"{path}: no {SUMMARY}; give --run the output folder of `leuko cv` or an MLflow run id")
    client = evaluate.tracking_client(path, tracking_uri)
    run_id = evaluate.cv_run_id(path, client) if client is not None else None
    return RunFiles(
        path.name,
        path,
        _dir_or_none(eval_dir or path / EVAL, evaluate.METRICS_JSON),
        _dir_or_none(baselines_dir or path / BASELINES, baselines.TABLE),
        f"folder {path}",
        run_id,
        client,
    )


def _locate_mlflow_run(run: str, tracking_uri: str | None, download_to: Path | None) -> RunFiles:
    """RunFiles of a CV's MLflow parent run, its artifacts downloaded into download_to (or a new temp folder)."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    import mlflow

    from leuko.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if "/" in run or run.startswith(".") or len(run) < 8:
        raise ReportError(f"--run {run}: no such folder, and it does not look like an MLflow run id")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(
            f"--run {run}: not a folder, and there is no MLflow store at {uri} to look the run up in "
            "(set MLFLOW_TRACKING_URI or --tracking-uri)"
        )
    client = mlflow.MlflowClient(uri)
    try:
        info = client.get_run(run)
    except Exception as exc:
        raise ReportError(f"--run {run}: no such folder, and no such MLflow run in {uri} ({exc})") from exc
    target = download_to or Path(tempfile.mkdtemp(prefix="leuko-report-"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few small files: no bar
    available = {a.path for a in client.list_artifacts(run)}
    for name in (SUMMARY, FOLD_METRICS, CONFIG, EVAL, BASELINES):
        if name in available:
            client.download_artifacts(run, name, str(target))
    if not (target / SUMMARY).is_file():
        raise ReportError(f"MLflow run {run} has no {SUMMARY} artifact: it is not the parent run of a `leuko cv`")
    return RunFiles(
        info.info.run_name or run,
        target,
        _dir_or_none(target / EVAL, evaluate.METRICS_JSON),
        _dir_or_none(target / BASELINES, baselines.TABLE),
        f"MLflow run {run} ({uri})",
        run,
        client,
    )


def _dir_or_none(path: Path, marker: str) -> Path | None:
    path = Path(path)
    return path if (path / marker).is_file() else None


def _read_csv(path: Path | None) -> pd.DataFrame | None:
    return pd.read_csv(path) if path is not None and path.is_file() else None


def _metrics_ci(eval_dir: Path | None) -> dict:
    path = eval_dir / intervals.METRICS_CI if eval_dir else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _config(files: RunFiles) -> tuple[dict, str]:
    return _config_at(files.root)


def _config_at(root: Path) -> tuple[dict, str]:
    for candidate in [root / CONFIG, *fold_configs(root)]:
        if candidate.is_file():
            text = candidate.read_text()
            return (yaml.safe_load(text) or {}), text
    return {}, ""


# ---------------------------------------------------------------------------------------------- numbers
def collect(files: RunFiles, summary: dict, eval_metrics: dict) -> dict:
    """Every number the page shows, keyed as in MLflow (cv/..., oof/..., recall/..., ba/..., baselines/...).

    summary: the CV's cv_summary.json; eval_metrics: its eval/metrics.json ({} without an evaluation).
    """
    numbers: dict[str, float] = {}
    for key, stats in summary.items():
        numbers[f"cv/{key}_mean"], numbers[f"cv/{key}_std"] = float(stats["mean"]), float(stats["std"])
    numbers.update({k: float(v) for k, v in eval_metrics.items() if not k.startswith("cv/")})
    if files.eval_dir is not None:
        numbers.update(intervals.ci_metrics(_metrics_ci(files.eval_dir)))  # the bounds shown, as logged
    table = _read_csv(files.baselines_dir / baselines.TABLE if files.baselines_dir else None)
    if table is not None:
        numbers.update(baselines.metric_dict(table))
    return numbers


def check_against_mlflow(numbers: dict[str, float], logged: dict[str, float]) -> tuple[int, list[str]]:
    """(how many shown numbers MLflow also has, descriptions of those that differ)."""
    checked, mismatches = 0, []
    for key, value in sorted(numbers.items()):
        if key not in logged:
            continue
        checked += 1
        other = float(logged[key])
        if not math.isclose(value, other, rel_tol=MATCH_TOLERANCE, abs_tol=MATCH_TOLERANCE):
            mismatches.append(f"{key}: report {value:.6g}, MLflow {other:.6g}")
    return checked, mismatches


def read_inputs(files: RunFiles) -> ReportInputs:
    """Every file the page shows, read once."""
    config, config_text = _config(files)
    ev = files.eval_dir
    summary = read_summary(files.root)
    eval_metrics = json.loads((ev / evaluate.METRICS_JSON).read_text()) if ev else {}
    numbers = collect(files, summary, eval_metrics)
    checked, mismatches = check_against_mlflow(numbers, files.logged) if files.run_id else (0, [])

    def eval_csv(name: str) -> pd.DataFrame | None:
        return _read_csv(ev / name if ev else None)

    return ReportInputs(
        name=files.name,
        root=files.root,
        source=files.source,
        eval_dir=ev,
        baselines_dir=files.baselines_dir,
        run_id=files.run_id,
        tags=files.tags,
        numbers=numbers,
        summary=summary,
        fold_metrics=_read_csv(files.root / FOLD_METRICS),
        config=config,
        config_text=config_text,
        eval_metrics=eval_metrics,
        per_class=eval_csv(evaluate.PER_CLASS),
        ba=eval_csv(evaluate.BLAND_ALTMAN),
        ba_by=eval_csv(evaluate.BLAND_ALTMAN_BY_SAMPLE_TYPE),
        diffs=eval_csv(evaluate.DIFFERENTIALS),
        metrics_ci=_metrics_ci(ev),
        diffs_ci=_read_csv(ev / intervals.DIFFERENTIALS_CI if ev else None),
        curves=eval_csv(evaluate.LEARNING_CURVES),
        umap_cells=eval_csv(embedding.UMAP_CSV),
        baselines=_read_csv(files.baselines_dir / baselines.TABLE if files.baselines_dir else None),
        checked=checked,
        mismatches=mismatches,
    )


# ---------------------------------------------------------------------------------------------- the page
def build(files: RunFiles, deploy: Deployment | None = None) -> tuple[str, dict]:
    """(HTML text, numbers shown) for one run; with deploy, the registered model's section (report_deploy)."""
    inputs = read_inputs(files)
    inputs.numbers.update(deploy_numbers(deploy))
    makers = with_deploy_section(with_saliency_section(with_trust_sections(SECTIONS)), deploy)
    return page(inputs, makers), inputs.numbers


def write_report(
    run: str,
    out: str | Path,
    *,
    tracking_uri: str | None = None,
    eval_dir: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    evaluate_missing: bool = True,
    model: str | None = None,
    export_input: str | Path | None = None,
) -> dict:
    """Write the report for a CV folder or MLflow run id; a CV folder without eval/ is evaluated first.

    model: a registered version (models:/NAME@ALIAS or models:/NAME/VERSION) whose ONNX export check and model
    card the page shows, exported into runs/NAME/export/ (leuko.evaluation.report_deploy); export_input: the
    volumes to check the graph on."""
    tmp = None
    path = Path(run)
    ref = None
    if export_input is not None and not Path(export_input).exists():
        raise ReportError(
            f"--export-input {export_input}: no such file or folder; give a folder of volumes or a manifest"
        )
    if model is not None:  # before any work: a bad URI is the user's to fix first
        cv_uri = (_config_at(path)[0].get("tracking") or {}).get("uri") if path.is_dir() else None
        ref = resolve_model(model, resolve_tracking_uri(tracking_uri or cv_uri))
    if (
        evaluate_missing
        and path.is_dir()
        and eval_dir is None
        and (path / SUMMARY).is_file()
        and not (path / EVAL / evaluate.METRICS_JSON).is_file()
    ):
        log(f"{path / EVAL} is missing: running `leuko evaluate --cv {path}` first")
        evaluate.evaluate(evaluate.load_cv(path), path / EVAL, tracking_uri=tracking_uri)
    try:
        if not path.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="leuko-report-"))
        files = locate(run, tracking_uri=tracking_uri, eval_dir=eval_dir, baselines_dir=baselines_dir, download_to=tmp)
        deploy = None if ref is None else deployment(ref, files.root / EXPORT, cells=export_input, kept=tmp is None)
        html_page, numbers = build(files, deploy)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_page, encoding="utf-8")
    checked, mismatches = check_against_mlflow(numbers, files.logged) if files.run_id else (0, [])
    return {
        "out": out,
        "numbers": numbers,
        "run_id": files.run_id,
        "checked": checked,
        "mismatches": mismatches,
        "has_eval": files.eval_dir is not None,
        "has_baselines": files.baselines_dir is not None,
        "deployment": None
        if deploy is None
        else {"model": deploy.model.pinned, "error": deploy.error, "reused": deploy.reused, **deploy_numbers(deploy)},
    }
