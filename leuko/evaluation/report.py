"""`leuko report`: one self-contained HTML page for a cross-validation run.

Every number in the page is read from the files a CV and `leuko evaluate` / `leuko baselines` wrote
(cv_summary.json, cv_metrics.csv, eval/*, baselines/baselines.csv), either from the CV's output folder
or from the artifacts of its MLflow parent run. When the MLflow run can be reached, the numbers shown are
compared with the metrics logged there and the page says whether they match. Images are embedded as
base64 PNG and the CSS is inline: the file can be mailed or archived on its own.

The exact numbers shown are also embedded as JSON (<script id="leuko-numbers" type="application/json">).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd

METRIC_ORDER = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss")
METRIC_NAMES = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "auroc": "AUROC (macro, one-vs-rest)",
    "loss": "loss (cross-entropy)",
}
# MLflow stores metrics as doubles; CSV and JSON round-trips keep 15+ significant digits.
MATCH_TOLERANCE = 1e-9


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
    from leuko.evaluation.evaluate import cv_run_id, tracking_client

    path = Path(run)
    if path.is_dir():
        if not (path / "cv_summary.json").is_file():
            raise ValueError(
                f"{path}: no cv_summary.json; give --run the output folder of `leuko cv` or an MLflow run id"
            )
        client = tracking_client(path, tracking_uri)
        run_id = cv_run_id(path, client) if client is not None else None
        files = RunFiles(
            path.name,
            path,
            _dir_or_none(eval_dir or path / "eval", "metrics.json"),
            _dir_or_none(baselines_dir or path / "baselines", "baselines.csv"),
            f"folder {path}",
            run_id,
            client,
        )
    else:
        import mlflow

        from leuko.tracking.runs import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        if "/" in run or run.startswith(".") or len(run) < 8:
            raise ValueError(f"--run {run}: no such folder, and it does not look like an MLflow run id")
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ValueError(
                f"--run {run}: not a folder, and there is no MLflow store at {uri} to look the run up in "
                "(set MLFLOW_TRACKING_URI or --tracking-uri)"
            )
        client = mlflow.MlflowClient(uri)
        try:
            info = client.get_run(run)
        except Exception as exc:
            raise ValueError(f"--run {run}: no such folder, and no such MLflow run in {uri} ({exc})") from exc
        target = download_to or Path(tempfile.mkdtemp(prefix="leuko-report-"))
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few small files: no bar
        available = {a.path for a in client.list_artifacts(run)}
        for name in ("cv_summary.json", "cv_metrics.csv", "config.yaml", "eval", "baselines"):
            if name in available:
                client.download_artifacts(run, name, str(target))
        if not (target / "cv_summary.json").is_file():
            raise ValueError(
                f"MLflow run {run} has no cv_summary.json artifact: it is not the parent run of a `leuko cv`"
            )
        files = RunFiles(
            info.info.run_name or run,
            target,
            _dir_or_none(target / "eval", "metrics.json"),
            _dir_or_none(target / "baselines", "baselines.csv"),
            f"MLflow run {run} ({uri})",
            run,
            client,
        )
    if files.client is not None and files.run_id is not None:
        try:
            info = files.client.get_run(files.run_id)
            files.tags, files.logged = dict(info.data.tags), dict(info.data.metrics)
        except Exception as exc:
            log(f"MLflow run {files.run_id} could not be read ({exc}); the report is not checked against it")
            files.run_id = None
    return files


def _dir_or_none(path: Path, marker: str) -> Path | None:
    path = Path(path)
    return path if (path / marker).is_file() else None


def _read_csv(path: Path | None) -> pd.DataFrame | None:
    return pd.read_csv(path) if path is not None and path.is_file() else None


def _config(files: RunFiles) -> tuple[dict, str]:
    import yaml

    for candidate in [files.root / "config.yaml", *sorted(files.root.glob("fold_*/config.yaml"))]:
        if candidate.is_file():
            text = candidate.read_text()
            return (yaml.safe_load(text) or {}), text
    return {}, ""


# ---------------------------------------------------------------------------------------------- numbers
def collect(files: RunFiles) -> dict:
    """Every number the page shows, keyed as in MLflow (cv/..., oof/..., recall/..., ba/..., baselines/...)."""
    summary = json.loads((files.root / "cv_summary.json").read_text())
    numbers: dict[str, float] = {}
    for key, stats in summary.items():
        numbers[f"cv/{key}_mean"], numbers[f"cv/{key}_std"] = float(stats["mean"]), float(stats["std"])
    if files.eval_dir is not None:
        numbers.update(
            {
                k: float(v)
                for k, v in json.loads((files.eval_dir / "metrics.json").read_text()).items()
                if not k.startswith("cv/")
            }
        )
    baselines = _read_csv(files.baselines_dir / "baselines.csv" if files.baselines_dir else None)
    if baselines is not None:
        from leuko.evaluation.baselines import metric_dict

        numbers.update(metric_dict(baselines))
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


# ---------------------------------------------------------------------------------------------- html pieces
def _e(text) -> str:
    return html.escape(str(text))


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pm(mean, std, digits: int = 3) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _table(header: list[str], rows: list[list[str]], *, own: list[bool] | None = None, text_cols: int = 1) -> str:
    head = "".join(
        f'<th class="text">{_e(h)}</th>' if i < text_cols else f"<th>{_e(h)}</th>" for i, h in enumerate(header)
    )
    body = []
    for r, row in enumerate(rows):
        cls = ' class="own"' if own and own[r] else ""
        cells = "".join(f'<td class="text">{c}</td>' if i < text_cols else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(data: bytes, alt: str, caption: str = "", width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{_e(alt)}"{style}>{cap}</figure>'


def _img_file(path: Path | None, alt: str, caption: str = "", width: int | None = None) -> str:
    if path is None or not path.is_file():
        return f'<p class="missing">{_e(alt)}: not available</p>'
    return _img(path.read_bytes(), alt, caption, width)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def baselines_figure(table: pd.DataFrame) -> bytes:
    """Horizontal bars of balanced accuracy (mean, std as error bar) per method; 3D rows in blue."""
    from matplotlib.figure import Figure

    order = table.iloc[::-1]
    fig = Figure(figsize=(7.2, 0.38 * len(order) + 1.1), layout="constrained")
    ax = fig.subplots()
    colours = ["C0" if s == "3D volume" else ("C2" if "projection" in s else "0.6") for s in order["input"]]
    ax.barh(
        range(len(order)),
        order["balanced_accuracy_mean"],
        xerr=order["balanced_accuracy_std"],
        color=colours,
        capsize=3,
    )
    ax.set_yticks(range(len(order)), order["method"], fontsize=8.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("balanced accuracy across folds (mean ± std)")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    return _png(fig)


def curves_figure(curves: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    ax = fig.subplots()
    from matplotlib.ticker import MaxNLocator

    epoch = curves["epoch"] + 1  # Lightning counts epochs from 0
    for column in [c for c in curves.columns if c.startswith("fold_")]:
        ax.plot(epoch, curves[column], lw=1, alpha=0.6, marker=".", label=column.replace("_", " "))
    ax.plot(epoch, curves["mean"], color="black", lw=2, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation balanced accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=2)
    ax.grid(color="0.92")
    return _png(fig)


# ---------------------------------------------------------------------------------------------- the page
def build(files: RunFiles) -> tuple[str, dict]:
    """(HTML text, numbers shown) for one run."""
    from leuko import __version__

    summary = json.loads((files.root / "cv_summary.json").read_text())
    fold_metrics = _read_csv(files.root / "cv_metrics.csv")
    config, config_text = _config(files)
    numbers = collect(files)
    checked, mismatches = check_against_mlflow(numbers, files.logged) if files.run_id else (0, [])
    ev = files.eval_dir
    eval_metrics = json.loads((ev / "metrics.json").read_text()) if ev else {}
    per_class = _read_csv(ev / "per_class.csv" if ev else None)
    ba = _read_csv(ev / "bland_altman.csv" if ev else None)
    ba_by = _read_csv(ev / "bland_altman_by_sample_type.csv" if ev else None)
    diffs = _read_csv(ev / "differentials.csv" if ev else None)
    curves = _read_csv(ev / "learning_curves.csv" if ev else None)
    umap_cells = _read_csv(ev / "umap.csv" if ev else None)
    baselines = _read_csv(files.baselines_dir / "baselines.csv" if files.baselines_dir else None)
    net = (config.get("model") or {}).get("net", "?")
    n_folds = len(fold_metrics) if fold_metrics is not None else "?"

    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    # --- summary cards and metrics table
    cards = []
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        if key in summary:
            cards.append(
                f'<div class="card"><div class="label">{_e(METRIC_NAMES[key])}</div>'
                f'<div class="value">{_fmt(summary[key]["mean"])}</div>'
                f'<div class="spread">± {_fmt(summary[key]["std"])} across {n_folds} folds</div></div>'
            )
    if ba is not None and ba["bias"].notna().any():
        worst = ba.loc[ba["bias"].abs().idxmax()]
        cards.append(
            f'<div class="card"><div class="label">largest Bland-Altman bias</div>'
            f'<div class="value">{worst["bias"]:+.2f} pp</div>'
            f'<div class="spread">{_e(worst["class"])}; limits {worst["loa_low"]:+.1f} to '
            f"{worst['loa_high']:+.1f} pp</div></div>"
        )
    keys = [k for k in METRIC_ORDER if k in summary] + sorted(k for k in summary if k not in METRIC_ORDER)
    folds = [str(f) for f in fold_metrics["fold"]] if fold_metrics is not None else []
    rows = []
    for key in keys:
        name = METRIC_NAMES.get(key, key.replace("recall_", "recall: ").replace("_", " "))
        per_fold = [
            _fmt(fold_metrics.loc[i, key]) if fold_metrics is not None and key in fold_metrics else "–"
            for i in range(len(folds))
        ]
        rows.append([_e(name), _fmt(summary[key]["mean"]), _fmt(summary[key]["std"]), *per_fold])
    metrics_html = (
        f'<div class="cards">{"".join(cards)}</div>'
        '<p class="note">Each fold trains on the other folds\' patients and is scored, with its best checkpoint '
        "(highest validation balanced accuracy), on its own validation patients; mean and sample standard "
        "deviation (ddof=1) across folds, from cv_summary.json and cv_metrics.csv.</p>"
        + _table(["metric", "mean", "std", *[f"fold {f}" for f in folds]], rows)
    )
    if eval_metrics:
        pooled = [
            [_e(METRIC_NAMES.get(k, k)), _fmt(eval_metrics[f"oof/{k}"])]
            for k in METRIC_ORDER
            if f"oof/{k}" in eval_metrics
        ]
        metrics_html += (
            '<h3>Pooled out-of-fold</h3><p class="note">Every validation cell once, scored '
            "together (folds of unequal size weigh by their cells).</p>" + _table(["metric", "value"], pooled)
        )
    sections.append(("metrics", "Metrics across folds", metrics_html))

    # --- confusion and per-class recall
    if ev is not None:
        rows = []
        for row in per_class.to_dict("records"):
            fold_recall = summary.get(f"recall_{row['class']}")
            rows.append(
                [
                    _e(row["class"]),
                    str(int(row["support"])),
                    _fmt(row["recall"]),
                    _pm(fold_recall["mean"], fold_recall["std"]) if fold_recall else "–",
                    _fmt(row["precision"]),
                    _fmt(row["f1"]),
                ]
            )
        body = (
            '<div class="figs">'
            + _img_file(
                ev / "confusion_matrix.png",
                "confusion matrix",
                "Out-of-fold confusion matrix: counts; shading is the row share.",
                430,
            )
            + "<div><h3>Per-class recall</h3>"
            + _table(["class", "cells", "recall (pooled)", "recall across folds", "precision", "F1"], rows)
            + '<p class="note">Recall is the share of a class\'s cells predicted as that class; balanced '
            "accuracy is its mean over classes.</p></div></div>"
        )
        sections.append(("confusion", "Confusion matrix and per-class recall", body))

    # --- Bland-Altman
    if ba is not None:
        n_samples = len(diffs) if diffs is not None else int(ba["n"].max())
        rows = [
            [
                _e(r["class"]),
                _fmt(r["bias"], 2),
                _fmt(r["sd"], 2),
                _fmt(r["loa_low"], 2),
                _fmt(r["loa_high"], 2),
                str(int(r["n"])),
            ]
            for r in ba.to_dict("records")
        ]
        body = (
            '<p class="note">Per sample (patient and sample type): predicted minus reference percentage of each '
            "class in percentage points (pp); bias is the mean difference, the limits of agreement (LoA) are bias ± 1.96 SD "
            "(sample SD). "
            f"{n_samples} samples.</p>"
            + _img_file(ev / "bland_altman.png", "Bland-Altman plots per class")
            + _table(["class", "bias (pp)", "SD (pp)", "lower LoA (pp)", "upper LoA (pp)", "samples"], rows)
        )
        if ba_by is not None:
            group = ba_by.columns[0]
            rows = [
                [
                    _e(r[group]),
                    _e(r["class"]),
                    _fmt(r["bias"], 2),
                    _fmt(r["sd"], 2),
                    _fmt(r["loa_low"], 2),
                    _fmt(r["loa_high"], 2),
                    str(int(r["n"])),
                ]
                for r in ba_by.to_dict("records")
            ]
            body += "<h3>By sample type</h3>" + _table(
                [
                    group.replace("_", " "),
                    "class",
                    "bias (pp)",
                    "SD (pp)",
                    "lower LoA (pp)",
                    "upper LoA (pp)",
                    "samples",
                ],
                rows,
                text_cols=2,
            )
        sections.append(("agreement", "Differentials: Bland-Altman per class", body))

    # --- baselines
    if baselines is not None:
        own = [k.startswith("cv3d_") and files.name in k for k in baselines["key"]]
        rows = [
            [
                _e(r["method"]),
                _e(r["input"]),
                _pm(r["balanced_accuracy_mean"], r["balanced_accuracy_std"]),
                _pm(r["accuracy_mean"], r["accuracy_std"]),
                _pm(r["macro_f1_mean"], r["macro_f1_std"]),
                str(int(r["n_folds"])),
            ]
            for r in baselines.to_dict("records")
        ]
        settings_path = files.baselines_dir / "baselines.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        note = (
            "The same patient-grouped folds for every method (train on the other folds, score the fold's "
            "validation patients), as in Figure 4 of the RI study (Ryu et al. 2021): five classical classifiers "
            "on the six morphology features (z-scored; scikit-learn), and a 2D network on the maximum intensity "
            "projection along z"
        )
        if settings.get("mip_net"):
            note += f" ({_e(settings['mip_net'])}, timm, random init, {settings.get('mip_epochs')} epochs per fold)"
        body = (
            f'<p class="note">{note}.</p>'
            + _table(
                ["method", "input", "balanced accuracy", "accuracy", "macro F1", "folds"], rows, own=own, text_cols=2
            )
            + _img(baselines_figure(baselines), "balanced accuracy per method")
        )
        sections.append(("baselines", "3D networks beside classical and 2D baselines", body))
    else:
        sections.append(
            (
                "baselines",
                "3D networks beside classical and 2D baselines",
                '<p class="missing">No baselines for this run: run <code>leuko baselines --cv '
                f"{_e(files.root)} --manifest MANIFEST</code> and make the report again.</p>",
            )
        )

    # --- UMAP
    if ev is not None and (ev / "umap_class.png").is_file():
        what = ""
        if umap_cells is not None:
            what = (
                f"{len(umap_cells)} validation cells of fold {umap_cells['fold'].iloc[0]} "
                f"({umap_cells['patient_id'].nunique()} patients)"
            )
        body = (
            f'<p class="note">UMAP of the penultimate-layer features of the fold\'s best {_e(net)} checkpoint; '
            f"{_e(what)}. Classes that form separate clusters are what the head tells apart; clusters that "
            'follow patients across classes point at patient or batch effects.</p><div class="figs">'
            + _img_file(ev / "umap_class.png", "UMAP by class", "coloured by class", 560)
            + _img_file(ev / "umap_patient.png", "UMAP by patient", "coloured by patient", 560)
            + "</div>"
        )
        sections.append(("umap", "What the network learned (UMAP)", body))

    # --- learning curves
    if curves is not None and len(curves):
        sections.append(
            (
                "curves",
                "Learning curves",
                '<p class="note">Validation balanced accuracy after each training epoch of each fold (from '
                "the fold runs in MLflow; the checkpoint scored above is each fold's best epoch).</p>"
                + _img(curves_figure(curves), "learning curves"),
            )
        )

    # --- where the numbers come from
    if files.run_id and checked:
        check = (
            f'<p class="ok">All {checked} numbers shown that MLflow also holds match the metrics logged to run '
            f"<code>{_e(files.run_id)}</code>.</p>"
            if not mismatches
            else f'<p class="warn">{len(mismatches)} of {checked} numbers differ from MLflow run '
            f"<code>{_e(files.run_id)}</code> (re-run <code>leuko evaluate</code>/<code>leuko baselines</code>?):"
            "<br>" + "<br>".join(_e(m) for m in mismatches[:20]) + "</p>"
        )
    else:
        check = '<p class="missing">No MLflow run reachable: the numbers were not checked against logged metrics.</p>'
    used = [f"<code>{_e(files.root / 'cv_summary.json')}</code>"]
    if ev:
        used.append(f"<code>{_e(ev)}/</code>")
    if files.baselines_dir:
        used.append(f"<code>{_e(files.baselines_dir / 'baselines.csv')}</code>")
    body = check + f'<p class="note">Read from {", ".join(used)}.</p>'
    if config_text:
        body += f"<details><summary>Resolved configuration (fold 0)</summary><pre>{_e(config_text)}</pre></details>"
    sections.append(("provenance", "Provenance", body))

    meta = [f"<span>net <b>{_e(net)}</b></span>", f"<span>{n_folds} folds</span>"]
    if per_class is not None:
        meta.append(f"<span>{int(per_class['support'].sum())} out-of-fold cells</span>")
    prepared = (config.get("data") or {}).get("prepared_dir")
    if prepared:
        meta.append(f"<span>data <code>{_e(prepared)}</code></span>")
    if files.run_id:
        meta.append(f"<span>MLflow run <code>{_e(files.run_id)}</code></span>")
    commit = files.tags.get("leuko.git_commit")
    if commit:
        meta.append(f"<span>commit <code>{_e(commit[:12])}</code></span>")
    meta.append(f"<span>made {time.strftime('%Y-%m-%d %H:%M')}</span>")
    template = Template(
        resources.files("leuko.evaluation").joinpath("report_template.html").read_text(encoding="utf-8")
    )
    numbers_json = json.dumps(numbers, sort_keys=True).replace("</", "<\\/")
    page = template.substitute(
        title=_e(f"leuko report: {files.name}"),
        version=_e(__version__),
        meta="".join(meta),
        nav="".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections),
        body="\n".join(f'<section id="{a}"><h2>{_e(t)}</h2>{b}</section>' for a, t, b in sections)
        + f'\n<script type="application/json" id="leuko-numbers">{numbers_json}</script>',
        footer=_e(f"leuko {__version__} · {files.source}"),
    )
    return page, numbers


def write_report(
    run: str,
    out: str | Path,
    *,
    tracking_uri: str | None = None,
    eval_dir: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    evaluate_missing: bool = True,
) -> dict:
    """Write the report for a CV folder or MLflow run id; a CV folder without eval/ is evaluated first."""
    tmp = None
    path = Path(run)
    if (
        evaluate_missing
        and path.is_dir()
        and eval_dir is None
        and (path / "cv_summary.json").is_file()
        and not (path / "eval" / "metrics.json").is_file()
    ):
        from leuko.evaluation.evaluate import evaluate, load_cv

        log(f"{path / 'eval'} is missing: running `leuko evaluate --cv {path}` first")
        evaluate(load_cv(path), path / "eval", tracking_uri=tracking_uri)
    try:
        if not path.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="leuko-report-"))
        files = locate(run, tracking_uri=tracking_uri, eval_dir=eval_dir, baselines_dir=baselines_dir, download_to=tmp)
        page, numbers = build(files)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    checked, mismatches = check_against_mlflow(numbers, files.logged) if files.run_id else (0, [])
    return {
        "out": out,
        "numbers": numbers,
        "run_id": files.run_id,
        "checked": checked,
        "mismatches": mismatches,
        "has_eval": files.eval_dir is not None,
        "has_baselines": files.baselines_dir is not None,
    }
