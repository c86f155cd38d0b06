"""The report's sections on how far a prediction can be trusted: calibration, cells for review, patient leakage.

Each reads what `leuko evaluate` wrote (leuko.evaluation.calibration, leuko.evaluation.review) from the run's
eval/ folder and returns (anchor, title, html) like the sections of leuko.evaluation.report_sections, or
None when the run has nothing for it. with_trust_sections places them after the agreement section.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pandas as pd

from leuko.evaluation.calibration import CALIBRATION_JSON, RELIABILITY_PLOT
from leuko.evaluation.report_sections import ReportInputs, Section, _e, _fmt, _img_file, _table, agreement_section
from leuko.evaluation.review import COVERAGE_CSV, COVERAGE_PLOT, REVIEW_JSON
from leuko.training.run_dir import OOF

TARGETS = (0.90, 0.95, 0.97, 0.99)  # retained accuracies the coverage table lists


def _json(inp: ReportInputs, name: str) -> dict | None:
    path = inp.eval_dir / name if inp.eval_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def calibration_section(inp: ReportInputs) -> Section | None:
    """ECE before and after temperature scaling, overall and per class, and the reliability diagram."""
    cal = _json(inp, CALIBRATION_JSON)
    if cal is None:
        return None
    rows = [["all cells (top-1)", _fmt(cal["ece_before"]), _fmt(cal["ece_after"])]]
    rows += [[_e(c), _fmt(v["ece_before"]), _fmt(v["ece_after"])] for c, v in cal["per_class"].items()]
    held_out = (
        f" Fitted on the other folds and applied to each fold's cells, the top-1 ECE after scaling is "
        f"{_fmt(cal['ece_after_held_out'])}."
        if "ece_after_held_out" in cal
        else ""
    )
    body = (
        f'<p class="note">Temperature scaling divides the logits by one number, T = {_fmt(cal["temperature"])}, '
        f"fitted by minimising the negative log-likelihood of {cal['n_cells']} held-out cells "
        f"(<code>{_e(cal['fitted_on'])}</code>): NLL {_fmt(cal['nll_before'])} &rarr; {_fmt(cal['nll_after'])} "
        "nats per cell. It changes no prediction, only how sure each one claims to be; T &gt; 1 softens an "
        "over-confident net. The registered model applies the T of its CV's out-of-fold cells. Expected "
        f"calibration error (ECE): torchmetrics, {cal['n_bins']} equal-width bins, {_e(cal['norm'])} norm; per class "
        f"one-vs-rest, prob_&lt;class&gt; against the class's cells.{held_out}</p>"
        '<div class="figs">'
        + _img_file(inp.eval_dir / RELIABILITY_PLOT, "reliability diagram before and after", "", 760)
        + "<div>"
        + _table(["ECE", "before", "after"], rows)
        + "</div></div>"
    )
    return "calibration", "Calibration", body


def review_section(inp: ReportInputs) -> Section | None:
    """Coverage against retained accuracy, the threshold chosen for the target, and other targets."""
    review = _json(inp, REVIEW_JSON)
    if review is None or inp.eval_dir is None or not (inp.eval_dir / COVERAGE_CSV).is_file():
        return None
    curve = pd.read_csv(inp.eval_dir / COVERAGE_CSV)
    rows = []
    for target in sorted({*TARGETS, review["target_accuracy"]}):
        reached = curve[curve["accuracy"] >= target]
        best = reached.iloc[-1] if len(reached) else None
        rows.append(
            [
                f"{target:.0%}",
                "–" if best is None else f"{best['coverage']:.1%}",
                "every cell" if best is None else f"{1 - best['coverage']:.1%}",
                "–" if best is None else _fmt(best["threshold"]),
            ]
        )
    if review["threshold"] is None:
        chosen = f"No share of the cells reaches {review['target_accuracy']:.0%} accuracy: every cell goes to review."
    else:
        chosen = (
            f"At the target of {review['target_accuracy']:.0%}, cells with an entropy up to "
            f"{_fmt(review['threshold'])} nats are retained: {review['coverage']:.1%} of the {review['n_cells']} "
            f"cells, {review['accuracy']:.1%} of them correct; the other {1 - review['coverage']:.1%} go to review."
        )
    body = (
        '<p class="note">Uncertainty per cell: the predictive entropy of the temperature-scaled probabilities '
        "of the net that scored it (one net per cell: no fold ensemble or test-time augmentation). Cells are "
        "retained from the most certain on; the registered model stores the threshold chosen on its CV's "
        "out-of-fold cells, and <code>leuko predict</code> writes <code>uncertainty</code> and <code>review"
        "</code> per cell and the differential with and without the flagged cells. Chosen on the same cells it "
        f"is scored on, the accuracy promised is optimistic by about its sampling error.</p><p>{_e(chosen)}</p>"
        '<div class="figs">'
        + _img_file(inp.eval_dir / COVERAGE_PLOT, "coverage against retained accuracy", "", 560)
        + "<div>"
        + _table(["target accuracy", "retained", "to review", "entropy threshold (nats)"], rows)
        + "</div></div>"
    )
    return "review", "Cells for review", body


def leakage_section(inp: ReportInputs) -> Section:
    """Whether any patient's cells were scored by a net trained on that patient, and the predict-time check."""
    path = inp.root / OOF
    check = '<p class="missing">The out-of-fold predictions are not at hand: the fold check was not run.</p>'
    if path.is_file():
        cells = pd.read_csv(path, dtype={"patient_id": str}, usecols=lambda c: c in ("patient_id", "fold"))
        if {"patient_id", "fold"} <= set(cells.columns):
            folds = cells.groupby("patient_id")["fold"].nunique()
            split = sorted(folds[folds > 1].index)
            check = (
                f'<p class="ok">Each of the {len(folds)} patients has all their out-of-fold cells in one fold: the '
                "folds split no patient between training and validation.</p>"
                if not split
                else f'<p class="warn">{len(split)} patient(s) have cells in more than one fold '
                f"({_e(', '.join(split[:10]))}): their out-of-fold scores are optimistic.</p>"
            )
    body = check + (
        '<p class="note">A registered model stores salted SHA-256 hashes of the patients it was fit on (not their '
        "ids); <code>leuko predict</code> warns when its input holds cells of such a patient and marks them in "
        "<code>seen_patient</code>, since their scores would be optimistic.</p>"
    )
    return "leakage", "Patient leakage", body


TRUST_SECTIONS = (calibration_section, review_section, leakage_section)


def with_trust_sections(sections: Sequence[Callable]) -> tuple[Callable, ...]:
    """sections with TRUST_SECTIONS after the agreement section (at the end when it is not among them)."""
    sections = tuple(sections)
    at = sections.index(agreement_section) + 1 if agreement_section in sections else len(sections)
    return (*sections[:at], *TRUST_SECTIONS, *sections[at:])
