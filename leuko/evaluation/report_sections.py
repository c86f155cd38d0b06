"""The HTML of `leuko report`: one function per section of the page, the header line, and the page itself.

Every section reads a ReportInputs (the run's files, read once by leuko.evaluation.report) and returns
(anchor, title, html), or None when the run has nothing for it. SECTIONS lists them in page order.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd

from leuko import __version__
from leuko.evaluation.baselines import SETTINGS, TABLE
from leuko.evaluation.embedding import UMAP_CLASS, UMAP_PATIENT
from leuko.evaluation.evaluate import BLAND_ALTMAN_PLOT, CONFUSION_PLOT
from leuko.evaluation.intervals import BA_STATS, ba_key, differential_text, format_ci
from leuko.evaluation.report_figures import baselines_figure, curves_figure
from leuko.training.run_dir import SUMMARY

METRIC_ORDER = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss")
METRIC_NAMES = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "auroc": "AUROC (macro, one-vs-rest)",
    "loss": "loss (cross-entropy)",
}
BASELINES_TITLE = "3D networks beside classical and 2D baselines"

Section = tuple[str, str, str]  # (anchor, title, html)


@dataclass
class ReportInputs:
    """What the page shows, read from one run's files; a table is None when its file is absent."""

    name: str
    root: Path
    source: str
    eval_dir: Path | None
    baselines_dir: Path | None
    run_id: str | None
    tags: dict
    numbers: dict[str, float]  # every number shown, keyed as in MLflow (see report.collect)
    summary: dict  # cv_summary.json
    fold_metrics: pd.DataFrame | None  # cv_metrics.csv
    config: dict
    config_text: str
    eval_metrics: dict = field(default_factory=dict)  # eval/metrics.json
    metrics_ci: dict = field(default_factory=dict)  # eval/metrics_ci.json (leuko.evaluation.intervals)
    diffs_ci: pd.DataFrame | None = None  # eval/differentials_ci.csv
    per_class: pd.DataFrame | None = None
    ba: pd.DataFrame | None = None
    ba_by: pd.DataFrame | None = None
    diffs: pd.DataFrame | None = None
    curves: pd.DataFrame | None = None
    umap_cells: pd.DataFrame | None = None
    baselines: pd.DataFrame | None = None
    checked: int = 0  # numbers MLflow also holds
    mismatches: list[str] = field(default_factory=list)  # those that differ

    @property
    def net(self) -> str:
        return (self.config.get("model") or {}).get("net", "?")

    @property
    def n_folds(self) -> int | str:
        return len(self.fold_metrics) if self.fold_metrics is not None else "?"


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


def _ci(entry: dict | None, value, digits: int = 3, dash: str = "-") -> str:
    """value with its bootstrap 95% CI when `leuko evaluate` wrote one: "0.910 (0.870-0.940)"."""
    return _e(format_ci(entry, digits, dash=dash)) if entry else _fmt(value, digits)


def _ba_cells(r: dict, ci: dict | None = None) -> list[str]:
    """bias, SD, lower and upper LoA (2 decimals; 95% CIs from ci, metrics_ci.json) and samples of one row."""
    bias, low, high = (_ci((ci or {}).get(ba_key(r["class"], k)), r[k], 2, " to ") for k in BA_STATS)
    return [bias, _fmt(r["sd"], 2), low, high, str(int(r["n"]))]


# ---------------------------------------------------------------------------------------------- sections
def metrics_section(inp: ReportInputs) -> Section:
    """Summary cards, the metrics per fold with mean and std, and the pooled out-of-fold metrics."""
    summary, fold_metrics = inp.summary, inp.fold_metrics
    cards = []
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        if key in summary:
            cards.append(
                f'<div class="card"><div class="label">{_e(METRIC_NAMES[key])}</div>'
                f'<div class="value">{_fmt(summary[key]["mean"])}</div>'
                f'<div class="spread">± {_fmt(summary[key]["std"])} across {inp.n_folds} folds</div></div>'
            )
    ba = inp.ba
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
    body = (
        f'<div class="cards">{"".join(cards)}</div>'
        '<p class="note">Each fold trains on the other folds\' patients and is scored, with its best checkpoint '
        "(highest validation balanced accuracy), on its own validation patients; mean and sample standard "
        "deviation (ddof=1) across folds, from cv_summary.json and cv_metrics.csv.</p>"
        + _table(["metric", "mean", "std", *[f"fold {f}" for f in folds]], rows)
    )
    if inp.eval_metrics:
        pooled = [
            [_e(METRIC_NAMES.get(k, k)), _ci(inp.metrics_ci.get(f"oof/{k}"), inp.eval_metrics[f"oof/{k}"])]
            for k in METRIC_ORDER
            if f"oof/{k}" in inp.eval_metrics
        ]
        body += (
            '<h3>Pooled out-of-fold</h3><p class="note">Every validation cell once, scored '
            "together (folds of unequal size weigh by their cells); 95% CI: bootstrap, patients resampled.</p>"
            + _table(["metric", "value (95% CI)"], pooled)
        )
    return "metrics", "Metrics across folds", body


def confusion_section(inp: ReportInputs) -> Section | None:
    """The out-of-fold confusion matrix beside recall, precision and F1 per class."""
    ev = inp.eval_dir
    if ev is None:
        return None
    rows = []
    for row in inp.per_class.to_dict("records"):
        fold_recall = inp.summary.get(f"recall_{row['class']}")
        rows.append(
            [
                _e(row["class"]),
                str(int(row["support"])),
                _ci(inp.metrics_ci.get(f"recall/{row['class']}"), row["recall"]),
                _pm(fold_recall["mean"], fold_recall["std"]) if fold_recall else "–",
                _fmt(row["precision"]),
                _fmt(row["f1"]),
            ]
        )
    body = (
        '<div class="figs">'
        + _img_file(
            ev / CONFUSION_PLOT,
            "confusion matrix",
            "Out-of-fold confusion matrix: counts; shading is the row share.",
            430,
        )
        + "<div><h3>Per-class recall</h3>"
        + _table(["class", "cells", "recall (pooled, 95% CI)", "recall across folds", "precision", "F1"], rows)
        + '<p class="note">Recall is the share of a class\'s cells predicted as that class; balanced '
        "accuracy is its mean over classes.</p></div></div>"
    )
    return "confusion", "Confusion matrix and per-class recall", body


def agreement_section(inp: ReportInputs) -> Section | None:
    """Bland-Altman agreement of the predicted differentials, per class and per sample type."""
    ba, ba_by = inp.ba, inp.ba_by
    if ba is None:
        return None
    n_samples = len(inp.diffs) if inp.diffs is not None else int(ba["n"].max())
    rows = [[_e(r["class"]), *_ba_cells(r, inp.metrics_ci)] for r in ba.to_dict("records")]
    body = (
        '<p class="note">Per sample (patient and sample type): predicted minus reference percentage of each '
        "class in percentage points (pp); bias is the mean difference, the limits of agreement (LoA) are "
        "bias ± 1.96 SD (sample SD). "
        f"{n_samples} samples.</p>"
        + _img_file(inp.eval_dir / BLAND_ALTMAN_PLOT, "Bland-Altman plots per class")
        + _table(["class", "bias (pp, 95% CI)", "SD (pp)", "lower LoA (95% CI)", "upper LoA (95% CI)", "samples"], rows)
    )
    if ba_by is not None:
        group = ba_by.columns[0]
        rows = [[_e(r[group]), _e(r["class"]), *_ba_cells(r)] for r in ba_by.to_dict("records")]
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
    if inp.diffs_ci is not None:
        wide = differential_text(inp.diffs_ci)
        body += "<h3>Predicted differential per sample (%, 95% CI: the sample's cells resampled)</h3>" + _table(
            [c.replace("_", " ") for c in wide.columns], [[_e(v) for v in r] for r in wide.values], text_cols=2
        )
    return "agreement", "Differentials: Bland-Altman per class", body


def baselines_section(inp: ReportInputs) -> Section:
    """The 3D networks beside the classical and 2D MIP baselines, or how to make them."""
    baselines = inp.baselines
    if baselines is None:
        return (
            "baselines",
            BASELINES_TITLE,
            '<p class="missing">No baselines for this run: run <code>leuko baselines --cv '
            f"{_e(inp.root)} --manifest MANIFEST</code> and make the report again.</p>",
        )
    own = [k.startswith("cv3d_") and inp.name in k for k in baselines["key"]]
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
    settings_path = inp.baselines_dir / SETTINGS
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
        + _table(["method", "input", "balanced accuracy", "accuracy", "macro F1", "folds"], rows, own=own, text_cols=2)
        + _img(baselines_figure(baselines), "balanced accuracy per method")
    )
    return "baselines", BASELINES_TITLE, body


def umap_section(inp: ReportInputs) -> Section | None:
    """The UMAP of the penultimate features that `leuko evaluate` made, by class and by patient."""
    ev = inp.eval_dir
    if ev is None or not (ev / UMAP_CLASS).is_file():
        return None
    what = ""
    if inp.umap_cells is not None:
        what = (
            f"{len(inp.umap_cells)} validation cells of fold {inp.umap_cells['fold'].iloc[0]} "
            f"({inp.umap_cells['patient_id'].nunique()} patients)"
        )
    body = (
        f'<p class="note">UMAP of the penultimate-layer features of the fold\'s best {_e(inp.net)} checkpoint; '
        f"{_e(what)}. Classes that form separate clusters are what the head tells apart; clusters that "
        'follow patients across classes point at patient or batch effects.</p><div class="figs">'
        + _img_file(ev / UMAP_CLASS, "UMAP by class", "coloured by class", 560)
        + _img_file(ev / UMAP_PATIENT, "UMAP by patient", "coloured by patient", 560)
        + "</div>"
    )
    return "umap", "What the network learned (UMAP)", body


def curves_section(inp: ReportInputs) -> Section | None:
    """Validation balanced accuracy per epoch of each fold."""
    if inp.curves is None or not len(inp.curves):
        return None
    return (
        "curves",
        "Learning curves",
        '<p class="note">Validation balanced accuracy after each training epoch of each fold (from '
        "the fold runs in MLflow; the checkpoint scored above is each fold's best epoch).</p>"
        + _img(curves_figure(inp.curves), "learning curves"),
    )


def provenance_section(inp: ReportInputs) -> Section:
    """Whether the numbers match MLflow, the files they were read from, and the resolved config."""
    if inp.run_id and inp.checked:
        check = (
            f'<p class="ok">All {inp.checked} numbers shown that MLflow also holds match the metrics logged to run '
            f"<code>{_e(inp.run_id)}</code>.</p>"
            if not inp.mismatches
            else f'<p class="warn">{len(inp.mismatches)} of {inp.checked} numbers differ from MLflow run '
            f"<code>{_e(inp.run_id)}</code> (re-run <code>leuko evaluate</code>/<code>leuko baselines</code>?):"
            "<br>" + "<br>".join(_e(m) for m in inp.mismatches[:20]) + "</p>"
        )
    else:
        check = '<p class="missing">No MLflow run reachable: the numbers were not checked against logged metrics.</p>'
    used = [f"<code>{_e(inp.root / SUMMARY)}</code>"]
    if inp.eval_dir:
        used.append(f"<code>{_e(inp.eval_dir)}/</code>")
    if inp.baselines_dir:
        used.append(f"<code>{_e(inp.baselines_dir / TABLE)}</code>")
    body = check + f'<p class="note">Read from {", ".join(used)}.</p>'
    if inp.config_text:
        body += f"<details><summary>Resolved configuration (fold 0)</summary><pre>{_e(inp.config_text)}</pre></details>"
    return "provenance", "Provenance", body


SECTIONS: tuple[Callable[[ReportInputs], Section | None], ...] = (
    metrics_section,
    confusion_section,
    agreement_section,
    baselines_section,
    umap_section,
    curves_section,
    provenance_section,
)


# ---------------------------------------------------------------------------------------------- the page
def header_meta(inp: ReportInputs) -> str:
    """The line under the title: net, folds, cells, data, MLflow run, commit, when the page was made."""
    meta = [f"<span>net <b>{_e(inp.net)}</b></span>", f"<span>{inp.n_folds} folds</span>"]
    if inp.per_class is not None:
        meta.append(f"<span>{int(inp.per_class['support'].sum())} out-of-fold cells</span>")
    prepared = (inp.config.get("data") or {}).get("prepared_dir")
    if prepared:
        meta.append(f"<span>data <code>{_e(prepared)}</code></span>")
    if inp.run_id:
        meta.append(f"<span>MLflow run <code>{_e(inp.run_id)}</code></span>")
    commit = inp.tags.get("leuko.git_commit")
    if commit:
        meta.append(f"<span>commit <code>{_e(commit[:12])}</code></span>")
    meta.append(f"<span>made {time.strftime('%Y-%m-%d %H:%M')}</span>")
    return "".join(meta)


def page(inp: ReportInputs, makers: tuple[Callable[[ReportInputs], Section | None], ...] = SECTIONS) -> str:
    """The whole HTML page: report_template.html filled with the header, the sections and the numbers as JSON."""
    sections = [s for make in makers if (s := make(inp)) is not None]
    template = Template(
        resources.files("leuko.evaluation").joinpath("report_template.html").read_text(encoding="utf-8")
    )
    numbers_json = json.dumps(inp.numbers, sort_keys=True).replace("</", "<\\/")
    return template.substitute(
        title=_e(f"leuko report: {inp.name}"),
        version=_e(__version__),
        meta=header_meta(inp),
        nav="".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections),
        body="\n".join(f'<section id="{a}"><h2>{_e(t)}</h2>{b}</section>' for a, t, b in sections)
        + f'\n<script type="application/json" id="leuko-numbers">{numbers_json}</script>',
        footer=_e(f"leuko {__version__} · {inp.source}"),
    )
