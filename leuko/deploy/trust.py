"""What a registered model stores so that its predictions can be trusted, and how `leuko predict` uses it.

Three blocks of model_config.json, each absent from models registered before them (predict then says
which check is off and writes the columns it can):

    calibration         {"temperature", "ece_before", "ece_after", "n_cells", "fitted_on", ...}: the
                        temperature T (leuko.evaluation.calibration) the inference code divides the net's
                        logits by before the softmax, fitted on the out-of-fold predictions of the CV the
                        model came from; registered with `--decisions prevalence`, also "bias" {class: b}
                        and "decisions": "prevalence", one bias per class added after dividing by T (bias-corrected
                        temperature scaling), which moves the argmax from the balanced sampler's equal classes to
                        the class mix of those cells
    review              {"uncertainty": "entropy", "threshold", "target_accuracy", "coverage", "accuracy",
                        "n_cells", "fitted_on"} (leuko.evaluation.review), chosen on the same cells, scaled by T
    training_patients   {"hash": "sha256(salt + patient_id)", "salt", "sha256": [hex digest per patient],
                        "n_patients"}: the patients the model was fit on. Salted, so the file does not list
                        patient ids, and a digest from one model cannot be matched against another's

predictions.csv columns `leuko predict` adds from them:
    uncertainty     predictive entropy (nats) of the calibrated probabilities      (with a review block)
    review          true when uncertainty > threshold: a person should look at the cell   (the same)
    seen_patient    true when the cell's patient_id is one the model trained on: its score would be optimistic
                    (with a training_patients block and a patient_id column in the input)
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.deploy.decisions import DEFAULT_DECISIONS
from leuko.errors import LeukoError
from leuko.evaluation.calibration import calibrate, label_indices
from leuko.evaluation.review import REVIEW, TARGET_ACCURACY, UNCERTAINTY, choose_threshold, flags, predictive_entropy
from leuko.training.predictions import prob_columns
from leuko.training.run_dir import OOF

SEEN = "seen_patient"
HASH = "sha256(salt + patient_id)"


class TrustError(LeukoError, ValueError):
    """Out-of-fold predictions that cannot calibrate the model; the message names the file and the fix."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- registering
def calibration_and_review(
    oof: str | Path, classes: Sequence[str], target: float = TARGET_ACCURACY, bias: bool = False
) -> dict:
    """{"calibration", "review"} fitted on a CV's out-of-fold predictions (oof_predictions.csv); bias: with class
    biases (leuko.evaluation.calibration.calibrate)."""
    cells = pd.read_csv(oof, dtype={"cell_id": str, "patient_id": str, "label": str})
    missing = [c for c in prob_columns(classes) if c not in cells.columns]
    if missing:
        raise TrustError(
            f"{oof}: lacks {', '.join(missing)}, so it is not a CV of this model's classes ({', '.join(classes)}); "
            "give --cv the output folder of a `leuko cv` of the same config"
        )
    where = f"{len(cells)} out-of-fold cells of {Path(oof).parent}"
    try:
        calibration, scaled = calibrate(cells, classes, fitted_on=where, bias=bias)
    except ValueError as exc:  # a class without out-of-fold cells: no bias to fit for it
        raise TrustError(f"{oof}: {exc}") from None
    calibration.pop("per_class")  # in the CV's eval/calibration.json; the model keeps what it applies
    correct = scaled.argmax(axis=1) == label_indices(cells, classes)
    scaled_by = "scaled by T and the class biases" if bias else "scaled by T"
    review = choose_threshold(predictive_entropy(scaled), correct, target, fitted_on=f"{where}, {scaled_by}")
    return {"calibration": calibration, "review": review}


def training_patients(patient_ids: Iterable) -> dict:
    """The training_patients block for these patient ids, with a new random salt."""
    salt = secrets.token_hex(16)
    ids = sorted({str(p).strip() for p in patient_ids})
    return {"hash": HASH, "salt": salt, "sha256": sorted(_digest(salt, p) for p in ids), "n_patients": len(ids)}


def trust_config(
    cv_dir: str | Path | None, classes: Sequence[str], patient_ids: Iterable, decisions: str = DEFAULT_DECISIONS
) -> dict:
    """What `leuko register` adds to model_config.json: training_patients always, calibration and review
    when the source has a CV with out-of-fold predictions (else a note says the model is uncalibrated);
    decisions "prevalence": the calibration has class biases, and a source without such a CV is refused."""
    out = {"training_patients": training_patients(patient_ids)}
    oof = Path(cv_dir) / OOF if cv_dir else None
    if decisions == "prevalence" and (oof is None or not oof.is_file()):
        raise TrustError(
            "--decisions prevalence: the class biases are fitted on a CV's out-of-fold predictions"
            + (f", and {oof} is not there" if oof else ", and this model has none")
            + "; pass --cv DIR (a finished `leuko cv` of the same config), register a sweep trial or an --ensemble"
        )
    if oof is None or not oof.is_file():
        log(
            "note: no out-of-fold predictions of a CV for this model"
            + (f" ({oof} not found)" if oof else "")
            + ": registered without a temperature or review threshold (register a sweep trial, or pass --cv)"
        )
        return out
    out.update(calibration_and_review(oof, classes, bias=decisions == "prevalence"))
    cal, review = out["calibration"], out["review"]
    biases = ", ".join(f"{c} {b:+.2f}" for c, b in cal.get("bias", {}).items())
    biases = f" (class biases {biases})" if biases else ""
    coverage = f"{review['coverage']:.1%} of cells retained at {review['target_accuracy']:.0%} accuracy"
    log(
        f"calibrated on {cal['fitted_on']}: T = {cal['temperature']:.3f}{biases}, "
        f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}; review threshold: {coverage}"
    )
    return out


def _digest(salt: str, patient_id: str) -> str:
    return hashlib.sha256((salt + patient_id).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- predicting
def seen_patients(patient_ids: pd.Series, stored: dict) -> np.ndarray:
    """(N,) True where the patient id hashes to one of the stored training patients."""
    known = set(stored["sha256"])
    salt = stored["salt"]
    digests = {p: _digest(salt, p) in known for p in set(patient_ids.astype(str).str.strip())}
    return patient_ids.astype(str).str.strip().map(digests).to_numpy(dtype=bool)


def add_trust_columns(table: pd.DataFrame, config: dict, classes: Sequence[str], model_uri: str) -> dict:
    """Add uncertainty, review and seen_patient to a predictions table (those the model and input allow);
    warn about cells of training patients. Returns {"n_review", "n_seen_patient"} (None: not checked)."""
    result = {"n_review": None, "n_seen_patient": None}
    review = config.get("review")
    if review is None:
        log(f"note: {model_uri} was registered without a review threshold: no {UNCERTAINTY} and {REVIEW} columns")
    else:
        table[UNCERTAINTY] = predictive_entropy(table[prob_columns(classes)].to_numpy(dtype=np.float64))
        table[REVIEW] = flags(table[UNCERTAINTY].to_numpy(), review["threshold"])
        result["n_review"] = int(table[REVIEW].sum())
    stored = config.get("training_patients")
    if stored is None:
        log(f"note: {model_uri} does not record its training patients: the {SEEN} check is off")
    elif "patient_id" not in table.columns:
        log(f"note: the input names no patient_id (give a manifest with one): the {SEEN} check is off")
    else:
        table[SEEN] = seen_patients(table["patient_id"], stored)
        result["n_seen_patient"] = int(table[SEEN].sum())
        if result["n_seen_patient"]:
            patients = sorted(set(table.loc[table[SEEN], "patient_id"].astype(str)))
            shown = ", ".join(patients[:5]) + (f", ... ({len(patients)} in all)" if len(patients) > 5 else "")
            log(
                f"warning: {result['n_seen_patient']} of {len(table)} cells come from patients {model_uri} was "
                f"trained on ({shown}): their scores would be optimistic; they are marked in the {SEEN} column"
            )
    return result
