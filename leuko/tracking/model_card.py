"""MODEL_CARD.md: what a registered version is for, what it saw, how well it did, and where it fails.

`leuko register` builds one card per version (card_for_refit), logs it inside the model beside its weights
and config (artifacts/MODEL_CARD.md), and sets it as the version's description so the MLflow UI shows it.
The sections, in order (SECTIONS):

    Intended use            decision support for a person; not a diagnosis by itself
    Data lineage            git commit, data.dvc md5, manifest sha256, prepared fingerprint (the lineage tags)
    Training and test data  the model (a refit, or an ensemble of k fold models; its test-time augmentation),
                            patients and cells per sample type and class, train and held-out test
    Test metrics            held-out patients, scored on what the model returns (its members and views
                            averaged); bootstrap 95% CIs with the patient as the unit
                            (leuko.evaluation.intervals), overall and per sample type
    Calibration             temperature (and class biases) and ECE from the model config, or "not calibrated"
    Review threshold        uncertainty threshold and its coverage from the model config, or none
    Input requirements      modality, channels, voxel size, shape, normalisation
    Known failure modes

The card is built from data (CardData) and rendered as Markdown by render(); nothing here trains or logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.deploy.decisions import class_bias
from leuko.deploy.tta import VIEWS
from leuko.evaluation.intervals import N_RESAMPLES, POOLED, format_ci, metric_intervals
from leuko.training.predictions import probability_table

MODEL_CARD = "MODEL_CARD.md"
SECTIONS = (
    "Intended use",
    "Data lineage",
    "Training and test data",
    "Test metrics",
    "Calibration",
    "Review threshold",
    "Input requirements",
    "Known failure modes",
)
# MLflow's SQL stores hold a version's description in a VARCHAR(5000) (PostgreSQL enforces it).
DESCRIPTION_LIMIT = 5000
LINEAGE = (
    ("git commit", "leuko.git_commit"),
    ("data.dvc md5", "leuko.data_dvc_md5"),
    ("data state", "leuko.data_dvc_state"),
    ("data folder", "leuko.data_dvc_path"),
    ("manifest sha256", "leuko.manifest_sha256"),
    ("prepared fingerprint", "leuko.prepared_fingerprint"),
)
METRIC_NAMES = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "auroc": "AUROC (macro, one-vs-rest)",
}


@dataclass
class CardData:
    """Everything a card states; render() formats it."""

    net: str
    classes: list[str]
    config: dict  # model_config.json: preprocessing, intensity, and temperature / review when calibrated
    lineage: dict[str, str]  # leuko.tracking.lineage.lineage_tags
    cohort: pd.DataFrame  # cohort_table(): sample_type, class, <split>_patients, <split>_cells
    test: dict[str, dict]  # {"all" or a sample type: metric_intervals() of its held-out cells}
    cv: dict = field(default_factory=dict)  # {metric: {"mean", "std"}} of the trial's cross-validation
    metric: str = "balanced_accuracy"  # the metric the registry compares versions by
    run_id: str | None = None
    voxel_sizes: list = field(default_factory=list)  # the training cells' voxel sizes (z, y, x) um
    phantom: bool | None = None  # trained on the phantom cohort only; None when not known


# ---------------------------------------------------------------------------------------------- the numbers
def cohort_table(index: pd.DataFrame, splits: dict[str, np.ndarray]) -> pd.DataFrame:
    """sample_type, class, then <split>_patients and <split>_cells for each split (name -> row mask of index).

    Rows: each sample type's classes, then its (sample type, "all") row, and last ("all", "all"): distinct
    patients and all cells."""
    index = index.assign(any_type="all", any_class="all")
    tables = []
    for keys in (["sample_type", "label"], ["sample_type", "any_class"], ["any_type", "any_class"]):
        parts = []
        for name, mask in splits.items():
            rows = index[np.asarray(mask, bool)]
            grouped = rows.groupby(keys).agg(patients=("patient_id", "nunique"), cells=("cell_id", "size"))
            parts.append(grouped.add_prefix(f"{name}_"))
        table = pd.concat(parts, axis=1).fillna(0).astype(int).reset_index()
        tables.append(table.set_axis(["sample_type", "class", *table.columns[2:]], axis=1))
    table = pd.concat(tables, ignore_index=True)
    # each sample type's classes, then its total; the overall total last
    order = pd.DataFrame({"last": table["sample_type"].eq("all"), "type": table["sample_type"]})
    order = order.assign(total=table["class"].eq("all"), cls=table["class"])
    return table.loc[order.sort_values(["last", "type", "total", "cls"]).index].reset_index(drop=True)


def held_out_intervals(cells: pd.DataFrame, classes: list[str]) -> dict[str, dict]:
    """{"all": ..., <sample type>: ...}: metric_intervals (patients resampled) of the test cells, overall and
    per sample type."""
    out = {"all": metric_intervals(cells, classes)}
    if cells["sample_type"].nunique() > 1:
        for sample_type, part in cells.groupby("sample_type", sort=True):
            out[str(sample_type)] = metric_intervals(part, classes)
    return out


def held_out_table(rows: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """cell_id, patient_id, sample_type, label, pred_label and prob_<class> of prepared-index rows and their
    (N, classes) probabilities."""
    table = probability_table(probs, classes, cell_id=rows["cell_id"].astype(str).to_numpy())
    for column in ("patient_id", "sample_type", "label"):
        table.insert(len(table.columns) - len(classes) - 1, column, rows[column].astype(str).to_numpy())
    return table


def held_out_predictions(
    model, datamodule, temperature: float | None = None, batch_size: int = 64, bias: list[float] | None = None
) -> pd.DataFrame:
    """The held-out test cells with cell_id, patient_id, sample_type, label, pred_label and prob_<class>.

    A plain forward pass on the model's device (no Trainer: the caller may be rank zero of a DDP run, whose
    other ranks have returned), with the logits divided by the temperature when there is one, plus the class
    biases when there are some (leuko.deploy.decisions)."""
    # heavy import here: torch takes seconds to load
    import torch

    from leuko.deploy.ensemble import Ensemble

    rows = datamodule.subset("test")
    calibrated = Ensemble([model], temperature or 1.0, bias=bias).to(model.device)  # softmax(logits / T + b)
    volumes = np.load(datamodule.volumes_path, mmap_mode="r")  # (N, C, D, H, W)
    was_training, probs = model.training, []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = np.asarray(volumes[rows["row"].to_numpy()[start : start + batch_size]], dtype=np.float32)
                probs.append(calibrated(torch.from_numpy(batch).to(model.device)).cpu().numpy())  # (B, K)
    finally:
        model.train(was_training)
    probs = np.concatenate(probs) if probs else np.zeros((0, len(model.class_names)))
    return held_out_table(rows, probs, list(model.class_names))


def trained_on_phantoms(lineage: dict[str, str], root: str | Path = ".") -> bool | None:
    """Whether the data folder of the lineage tags is the phantom cohort (its cohort.json names the
    generator); None when the data are not tracked by DVC, so the folder is not known."""
    # heavy import here: the phantom generator loads the cell renderer, which only this check needs
    from leuko.data.phantoms import COHORT, GENERATOR

    folder = lineage.get("leuko.data_dvc_path")
    if not folder or folder == "untracked":
        return None
    try:
        return json.loads((Path(root) / folder / COHORT).read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def card_for_refit(
    cli, config: dict, lineage: dict[str, str], *, cv: dict, metric: str, run_id: str, probs: np.ndarray | None = None
) -> str:
    """The card of a registered model (`leuko register`): data and test predictions from the LeukoCLI's
    datamodule; probs: the registered model's (N, classes) probabilities of its test cells when it is not
    cli.model alone (an ensemble, or TTA), else they come from cli.model."""
    # heavy import here: the repository root comes from git through leuko.tracking.lineage
    from leuko.tracking.lineage import repo_root

    datamodule = cli.datamodule
    temperature = calibration(config).get("temperature")
    if probs is None:
        size = datamodule.hparams.batch_size
        cells = held_out_predictions(cli.model, datamodule, temperature, size, bias=class_bias(config))
    else:
        cells = held_out_table(datamodule.subset("test"), probs, list(config["classes"]))
    masks = {"train": datamodule.masks["train"], "test": datamodule.masks["test"]}
    card = CardData(
        net=config["net"],
        classes=list(config["classes"]),
        config=config,
        lineage=lineage,
        cohort=cohort_table(datamodule.index, masks),
        test=held_out_intervals(cells, list(config["classes"])) if len(cells) else {},
        cv=cv,
        metric=metric,
        run_id=run_id,
        voxel_sizes=(datamodule.meta.get("voxel_size") or {}).get("manifest_values", []),
        phantom=trained_on_phantoms(lineage, repo_root() or "."),
    )
    return render(card)


def model_summary(config: dict) -> str:
    """One line on what the model is: a refit or an ensemble of fold models, and its test-time augmentation."""
    folds = (config.get("ensemble") or {}).get("folds") or []
    what = (
        f"ensemble of {len(folds)} {config['net']} fold models (folds {', '.join(map(str, folds))} of a "
        f"{len(folds)}-fold CV, each trained without the test patients), their probabilities averaged"
        if len(folds) > 1
        else f"{config['net']} refit on all non-test patients"
    )
    tta = config.get("tta", "none")
    if tta == "none":
        return what + "; no test-time augmentation"
    return what + f"; test-time augmentation {tta} ({len(VIEWS[tta]) if tta in VIEWS else '?'} views averaged)"


def calibration(config: dict) -> dict:
    """temperature, bias, ece_before, ece_after, fitted_on (those present) from a model config: top level or
    under "calibration"."""
    found = {**config, **(config.get("calibration") or {})}
    keys = ("temperature", "bias", "ece_before", "ece_after", "fitted_on")
    return {k: found[k] for k in keys if found.get(k) is not None}


def review(config: dict) -> dict:
    """The review settings of a model config ("review": threshold, coverage, target_accuracy, ...), or {}."""
    found = dict(config.get("review") or {})
    if "threshold" not in found and config.get("review_threshold") is not None:
        found["threshold"] = config["review_threshold"]
    return found


# ---------------------------------------------------------------------------------------------- the text
def render(card: CardData) -> str:
    """The card as Markdown: a title, then one "## " heading per entry of SECTIONS."""
    bodies = (
        _intended_use(card),
        _lineage(card),
        _cohort(card),
        _metrics(card),
        _calibration(card),
        _review(card),
        _inputs(card),
        _failure_modes(card),
    )
    title = f"# Model card: {card.net} leukocyte classifier ({len(card.classes)} classes)"
    parts = [title] + [f"## {name}\n\n{body}" for name, body in zip(SECTIONS, bodies)]
    return "\n\n".join(parts) + "\n"


def description(summary: str, card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """A version's description: the summary line, then the card; the card is cut at a section heading (and
    says so) when both would pass the store's limit."""
    text = f"{summary}\n\n{card}"
    if len(text) <= limit:
        return text
    note = f"\n\n(The card is cut here to fit the registry; the whole card is {MODEL_CARD} in the model's files.)\n"
    room = limit - len(summary) - 2 - len(note)
    cut = card.rfind("\n## ", 0, max(room, 0))
    return f"{summary}\n\n{card[: max(cut, 0)].rstrip()}{note}"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _intended_use(card: CardData) -> str:
    return (
        f"Classifies single label-free 3D leukocyte volumes into {', '.join(card.classes)} and counts them "
        "into a per-sample differential. It is **decision support**: a qualified person reviews the "
        "differential, and the cells it flags, before anyone acts on it. It is **not a diagnosis by itself**, "
        "and not for cell types, modalities or preparations other than those below."
    )


def _lineage(card: CardData) -> str:
    rows = [[name, f"`{card.lineage.get(tag, 'unknown')}`"] for name, tag in LINEAGE]
    if card.run_id:
        rows.append(["MLflow run (the model was logged to it)", f"`{card.run_id}`"])
    return _md_table(["what", "value"], rows) + "\n\n`leuko lineage models:/NAME/VERSION` restores this data."


def _cohort(card: CardData) -> str:
    table = card.cohort
    splits = [c.removesuffix("_cells") for c in table.columns if c.endswith("_cells")]
    header = ["sample type", "class"] + [f"{s} {what}" for s in splits for what in ("patients", "cells")]
    rows = [
        [r["sample_type"], r["class"], *(r[f"{s}_{w}"] for s in splits for w in ("patients", "cells"))]
        for r in table.to_dict("records")
    ]
    return (
        f"Model: {model_summary(card.config)}. The train columns count every non-test patient; the test patients "
        "were held out from training, model selection and calibration.\n\n" + _md_table(header, rows)
    )


def _metrics(card: CardData) -> str:
    if not card.test:
        return "No test cells: the held-out test set was empty."
    groups = list(card.test)
    totals = card.cohort[card.cohort["class"] == "all"].set_index("sample_type")
    counts = {g: int(totals.loc[g, "test_patients"]) for g in groups if g in totals.index}
    header = [f"{g} ({counts[g]} patient{'s' * (counts[g] != 1)})" if g in counts else g for g in groups]
    names = [*POOLED, *(f"recall/{c}" for c in card.classes)]
    rows = [
        [METRIC_NAMES.get(n, n.replace("recall/", "recall: ")), *(format_ci(card.test[g].get(n), 3) for g in groups)]
        for n in names
    ]
    text = (
        f"Held-out test patients; estimate (95% CI), bootstrap with the patient as the unit ({N_RESAMPLES} "
        "resamples, percentile); a column of one patient has no interval.\n\n" + _md_table(["metric", *header], rows)
    )
    cv = card.cv.get(card.metric)
    if cv:
        text += f"\n\nCross-validated {card.metric} of the trial: {cv['mean']:.3f} ± {cv['std']:.3f} (mean ± SD)."
    return text


def _calibration(card: CardData) -> str:
    found = calibration(card.config)
    if "temperature" not in found:
        return "Not calibrated: the probabilities are the network's softmax outputs, not fitted to frequencies."
    text = f"Temperature scaling, T = {found['temperature']:.3f} (logits divided by T before the softmax)."
    if "bias" in found:  # leuko.deploy.decisions
        biases = ", ".join(f"{c} {b:+.3f}" for c, b in found["bias"].items())
        text = (
            f"Bias-corrected temperature scaling, T = {found['temperature']:.3f}, class biases {biases} (added to "
            "logits / T): labels follow the class mix of the training data (`--decisions prevalence`), not equal "
            "classes."
        )
    if "ece_before" in found and "ece_after" in found:
        text += f" ECE (15 bins): {found['ece_before']:.3f} before, {found['ece_after']:.3f} after."
    return text + (f" Fitted on {found['fitted_on']}." if "fitted_on" in found else "")


def _review(card: CardData) -> str:
    found = review(card.config)
    if not found:
        return "No review threshold stored: no cell is flagged for review."
    if found.get("threshold") is None:
        target = found.get("target_accuracy")
        return (
            "No threshold reaches the target accuracy"
            + (f" of {100 * target:.1f}%" if target else "")
            + (": every cell is flagged for review.")
        )
    text = f"Cells with uncertainty ({found.get('uncertainty', 'entropy')}) above {found['threshold']:.4f} are flagged."
    if found.get("coverage") is not None:
        text += f" Coverage: {100 * found['coverage']:.1f}% of cells retained"
        if found.get("target_accuracy") is not None:
            text += f" at a target accuracy of {100 * found['target_accuracy']:.1f}%"
        text += "."
    return text


def _inputs(card: CardData) -> str:
    pre = card.config.get("preprocessing", {})
    norm = pre.get("normalisation") or {}
    target = pre.get("target_voxel_size")
    voxel = (
        f"resampled to {target} µm (z, y, x)"
        if target
        else f"not resampled: the training cells' voxel sizes, {card.voxel_sizes or 'as acquired'} µm (z, y, x)"
    )
    rows = [
        ["modality", pre.get("modality", "?")],
        ["channels", card.config.get("in_channels", "?")],
        ["voxel size", voxel],
        ["shape (D, H, W)", " x ".join(map(str, pre.get("shape", [])))],
        ["normalisation", f"{norm.get('method', '?')}: {norm.get('formula', '')}".rstrip(": ")],
        ["input tensor", "float32 (B, C, D, H, W), prepared as `leuko prepare` does"],
    ]
    if pre.get("n_medium") is not None:
        rows.append(["medium refractive index", pre["n_medium"]])
    return _md_table(["requirement", "value"], rows)


def _failure_modes(card: CardData) -> str:
    intensity = card.config.get("intensity") or {}
    train = int(card.cohort["train_patients"].iloc[-1]) if "train_patients" in card.cohort else 0
    phantom = {
        True: "This model was trained on phantoms only (the synthetic cohort of leuko.data.phantoms): it has "
        "never seen a real cell, and its test numbers describe phantoms, not patients.",
        False: "Trained on data that are not the phantom cohort.",
        None: "Whether the training data were phantoms is not known (the data are not tracked by DVC).",
    }[card.phantom]
    items = [
        "**Out-of-distribution intensities**: cells whose intensity quantiles lie outside the training envelope "
        f"(tolerance {intensity.get('tolerance', '?')} x its spread, {intensity.get('n_cells', '?')} training cells) "
        "are flagged by `leuko predict`; their classes are not to be trusted.",
        f"**Other modalities**: trained on {card.config.get('preprocessing', {}).get('modality', '?')} volumes; "
        "another modality, stain or scale is refused or lands far out of distribution.",
        f"**Classes it was not trained on**: every cell is forced into one of {', '.join(card.classes)}; "
        "basophils, blasts, epithelial cells or debris get one of these classes with no warning.",
        f"**Small training cohort**: {train} training patients; a preparation, scanner or patient group "
        "unlike theirs is not covered, and the test CIs above show how uncertain even the covered case is.",
        f"**Phantom-only training**: {phantom}",
    ]
    return "\n".join(f"- {item}" for item in items)
