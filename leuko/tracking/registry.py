"""`leuko register`: refit the best trial on every non-test patient (or, with ensemble, take the k fold
models of a CV of it: leuko.tracking.fold_ensemble), test it once on the held-out patients, log it to
MLflow as a pyfunc (with its test-time augmentation, leuko.deploy.tta) and register it; alias `champion`
only when it beats the current champion's test score, `challenger` otherwise (leuko.tracking.champion
decides, as a compare-and-set that two registers at once cannot both win).

A version is tagged leuko.status=incomplete when it is created and complete once its scores, decision,
alias and description are set; its refit run is KILLED meanwhile and FINISHED at that point. So a
register killed at any point (even by SIGKILL) leaves no RUNNING run and no version that looks whole.

The model's code travels with it: the leuko package is logged as the model's code path (code/leuko/),
and its requirements name only public packages, never `leuko`. What a registered model holds, and the
trust boundary of loading one: see leuko.deploy.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from leuko.deploy.decisions import DECISIONS, DEFAULT_DECISIONS, class_bias, temperature
from leuko.deploy.tta import DEFAULT_TTA, check_tta
from leuko.errors import LeukoError
from leuko.tracking.champion import CHALLENGER, CHAMPION, SCORE_DECIMALS, crown, decide
from leuko.tracking.model_files import CODE, log_model, model_config, weight_names  # noqa: F401 (CODE: re-exported)
from leuko.tracking.model_files import signature as _signature  # noqa: F401 (tests import it from here)
from leuko.training import run_dir

DEFAULT_NAME = "leuko"
STATUS, INCOMPLETE, COMPLETE = "leuko.status", "incomplete", "complete"
REFIT_FOLDER = "LEUKO_REFIT_FOLDER"  # the folder rank zero claimed, for the DDP ranks Lightning starts
__all__ = ["CHALLENGER", "CHAMPION", "RegisterError", "Source", "decide", "register", "source_from_study"]


class RegisterError(LeukoError, ValueError):
    """Nothing to register, or the registry cannot take it; the message says what to do."""


@dataclass
class Source:
    """What to refit: the base configs and overrides of a trial (or given by hand), and its CV scores."""

    configs: list[str]
    overrides: list[str]
    cv: dict = field(default_factory=dict)  # {metric: {"mean": .., "std": ..}}
    study: str | None = None
    trial: int | None = None
    sweep_run_id: str | None = None
    objective: str = "balanced_accuracy"
    cv_dir: str | None = None  # a CV of this config, whose out-of-fold predictions calibrate the model


def source_from_study(space: str | Path, *, storage: str | None = None, trial: int | None = None) -> Source:
    # heavy imports in this module's functions: optuna, mlflow and torch load in seconds, and `leuko --help`
    # should stay instant
    import optuna

    from leuko.sweep.space import load_sweep_config
    from leuko.sweep.study import A_CONFIG, A_CV, A_DIR, A_OVERRIDES, open_storage

    cfg = load_sweep_config(space)
    url = cfg.storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=open_storage(url))
    except KeyError as exc:
        raise RegisterError(f"no study {cfg.study!r} in {url}; run `leuko sweep --space {space}` first") from exc
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RegisterError(
            f"study {cfg.study!r} in {url} has no COMPLETE trial yet; run more trials with `leuko sweep`"
        )
    if trial is None:
        chosen = study.best_trial
    else:
        chosen = next((t for t in complete if t.number == trial), None)
        if chosen is None:
            raise RegisterError(
                f"trial {trial} of study {cfg.study!r} is not COMPLETE; COMPLETE trials: {[t.number for t in complete]}"
            )
    attrs = chosen.user_attrs
    return Source(
        configs=list(attrs[A_CONFIG]),
        overrides=list(attrs[A_OVERRIDES]),
        cv=dict(attrs.get(A_CV, {})),
        study=cfg.study,
        trial=chosen.number,
        sweep_run_id=study.user_attrs.get("leuko.sweep_run_id"),
        cv_dir=attrs.get(A_DIR),
        objective=cfg.objective,
    )


def earned_epochs(cv_summary: dict, overrides: list[str] = ()) -> list[str]:
    """["--trainer.max_epochs", N] for a refit of the epochs a CV earned: its folds' mean best validation epoch
    (an early-stopped recipe's refit has no validation to stop on); [] without one, or when overrides set them."""
    earned = (cv_summary.get("best_epoch") or {}).get("mean")
    if not earned or any(o.startswith("--trainer.max_epochs") for o in overrides):
        return []
    return ["--trainer.max_epochs", str(max(1, round(earned)))]


def cv_summary(source: Source) -> dict:
    """The CV scores of source: its trial's, or those of the CV folder given with --cv ({} without either)."""
    return source.cv or (run_dir.read_summary(source.cv_dir) if source.cv_dir else {})


def refit_epochs(source: Source) -> list[str]:
    """The earned_epochs of a refit of source, from its cv_summary.

    A trial's own --trainer.max_epochs is the sweep's epoch budget, which the earned epochs replace; epochs
    given by hand (`leuko register --config ... --trainer.max_epochs N`) win.
    """
    return earned_epochs(cv_summary(source), source.overrides if source.study is None else ())


def register(
    source: Source,
    *,
    name: str = DEFAULT_NAME,
    metric: str | None = None,
    out: str | Path = "runs",
    ensemble: bool = False,
    cv_dir: str | Path | None = None,
    tta: str = DEFAULT_TTA,
    decisions: str = DEFAULT_DECISIONS,
) -> dict:
    """Refit (ensemble: the fold models of cv_dir, or of a CV run first), test, log and register; returns
    {"version", "alias", "score", "run_id", "model_uri", "comparison", ...}. tta: a mode of leuko.deploy.tta;
    decisions: "balanced" (the net's own argmax) or "prevalence" (class biases fitted with the temperature on
    the CV's out-of-fold cells: leuko.deploy.trust)."""
    # heavy imports here, as in source_from_study
    from lightning.pytorch.cli import SaveConfigCallback

    from leuko.tracking import fold_ensemble
    from leuko.training.cli import LeukoCLI
    from leuko.training.cv import is_rank_zero

    check_tta(tta)
    if cv_dir is not None and not ensemble:
        raise RegisterError(
            f"--cv-dir {cv_dir}: names the CV whose fold models form an ensemble; add --ensemble (--cv calibrates)"
        )
    if decisions not in DECISIONS:
        raise RegisterError(f"--decisions {decisions!r}: give one of {', '.join(DECISIONS)}")
    no_oof = source.cv_dir is None or not (Path(source.cv_dir) / run_dir.OOF).is_file()
    if decisions == "prevalence" and not ensemble and no_oof:  # before a refit is spent on it
        where = "this config has none" if source.cv_dir is None else f"{source.cv_dir} has no {run_dir.OOF}"
        raise RegisterError(
            f"--decisions prevalence: the class biases are fitted on a CV's out-of-fold predictions, and {where}; "
            "pass --cv DIR (a finished `leuko cv` of the same config) or --ensemble"
        )
    metric = metric or source.objective
    if not ensemble:  # a refit: `--config --cv DIR` puts DIR's scores on the version and earns its epochs
        source = replace(source, cv=cv_summary(source))  # read before any folder is made: a bad file leaves none
    root = _refit_folder(out, source)
    with _removed_if_left_empty(root):  # a refused input (a --cv-dir, tracking off) leaves no empty folder
        run_name = root.name
        tags = {"leuko.command": "register", "leuko.role": "refit", "leuko.registered_model": name}
        if source.study is not None:
            tags.update({"leuko.study": source.study, "leuko.trial": str(source.trial)})
        args = [a for c in source.configs for a in ("--config", c)] + list(source.overrides)
        if not ensemble and (epochs := refit_epochs(source)):  # an ensemble's fold models are shipped as trained
            args += epochs
            print(f"refit for {epochs[1]} epochs: the mean best epoch of its CV", file=sys.stderr)
        args += ["--data.fold", "null", "--trainer.default_root_dir", str(root), "--tracking.run_name", run_name]
        cli = LeukoCLI(
            args=args, run=False, parent_run_id=source.sweep_run_id if is_rank_zero() else None, extra_tags=tags
        )
        tracking = cli.config["tracking"]
        if not tracking.enabled or cli.trainer.logger is None:
            raise RegisterError(
                "tracking is off (tracking.enabled false or trainer.logger false): registering needs MLflow"
            )
        check_tta(tta, cli.datamodule.shape)
        test, folds = None, None  # test: scored after calibration when the model is not the refit alone
        if ensemble:
            cv_dir = Path(cv_dir) if cv_dir is not None else fold_ensemble.run_cv(source, root, out, name)
            if not is_rank_zero():
                return {}
            members, folds = fold_ensemble.load_members(cv_dir, cli)
            for save in [c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback)]:
                save.save_config(cli.trainer, cli.model, "register")  # config.yaml and params, as a fit logs them
        else:
            print(f"refit on every non-test patient: {shlex.join(args[:-6])}", file=sys.stderr)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if tta == "none" and decisions == "balanced":  # else scored as it ships, biases and views included
                tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
                test = _check_metric({k.removeprefix("test/"): float(v) for k, v in tested.items()}, metric)
            if not cli.trainer.is_global_zero:
                return {}
            members = [cli.model.net]
        model = {"members": members, "folds": folds, "cv_dir": cv_dir if ensemble else None, "tta": tta,
                 "decisions": decisions}  # fmt: skip
        return _log_and_register(cli, source, test, model, name=name, metric=metric)


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path):
    """On an error inside, folder is removed again when nothing was written to it."""
    try:
        yield folder
    except BaseException:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder
        raise


def _check_metric(test: dict, metric: str) -> dict:
    if metric not in test:
        raise RegisterError(
            f"metric {metric!r} is not among the test metrics {sorted(test)}; pass --metric with one of them"
        )
    return test


def _refit_folder(out: str | Path, source: Source) -> Path:
    """out/register-<study>-trial<n> (or register-<time>), never one another register holds (-2, ... then).

    Rank zero claims it; the other DDP ranks, which Lightning starts with its environment, use the same."""
    from leuko.training.cv import is_rank_zero  # heavy import here, as in source_from_study

    label = f"register-{source.study}-trial{source.trial:03d}" if source.study is not None else None
    if not is_rank_zero():
        return Path(out) / (os.environ.get(REFIT_FOLDER) or label or time.strftime("register-%Y%m%d-%H%M%S"))
    folder = run_dir.new_folder(out, label, stamp=False) if label else run_dir.new_folder(out, "register")
    os.environ[REFIT_FOLDER] = folder.name
    return folder


def _log_and_register(cli, source: Source, test: dict | None, model: dict, *, name: str, metric: str) -> dict:
    """Log the model to the refit run, register it incomplete, crown it, complete it (see the module docstring).

    model: {"members": nets, "folds", "cv_dir" (an ensemble's CV, else None), "tta"}; test None: scored here on
    the model as it ships (fold_ensemble.held_out_report), once its temperature is known."""
    # heavy imports here, as in source_from_study
    import mlflow

    from leuko.deploy.trust import trust_config
    from leuko.evaluation.heldout import split_settings
    from leuko.tracking import fold_ensemble
    from leuko.tracking.lineage import lineage_tags
    from leuko.tracking.model_card import card_for_refit
    from leuko.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cli.config["tracking"].uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    run_id = cli.trainer.logger.run_id
    config = model_config(cli)
    # The run says KILLED until its version is complete: what a kill from here on leaves behind, even
    # SIGKILL, which no handler can catch.
    client.set_terminated(run_id, "KILLED")
    try:
        # temperature and review threshold from the CV's out-of-fold cells; hashes of the training patients
        calibrate_on = fold_ensemble.calibration_dir(model["cv_dir"], source.cv_dir)
        patients = cli.datamodule.subset("train")["patient_id"]
        config.update(trust_config(calibrate_on, config["classes"], patients, model["decisions"]))
        config["tta"] = model["tta"]
        if model["cv_dir"] is not None:
            weights = weight_names(len(model["members"]))
            config["ensemble"] = {"weights": weights, "folds": model["folds"], "cv_dir": str(model["cv_dir"])}
            source = replace(source, cv=source.cv or run_dir.read_summary(model["cv_dir"]))
        report = {"test": test, "rows": None, "metrics": {}, "probs": None}
        if test is None:  # the model as it ships: calibrated, averaged over its members and views
            terms = fold_ensemble.held_out_terms(
                model["members"], cli.datamodule, temperature(config), model["tta"], bias=class_bias(config)
            )
            labels = cli.datamodule.subset("test")["label_index"].to_numpy()
            report = fold_ensemble.held_out_report(terms, labels, config["classes"], model["tta"])
        test = _check_metric(report["test"], metric)
        score = test[metric]
        lineage = lineage_tags(cli.config["data"]["prepared_dir"])
        card = card_for_refit(  # MODEL_CARD.md
            cli, config, lineage, cv=source.cv, metric=metric, run_id=run_id, probs=report["probs"]
        )
        model_uri = log_model(client, cli, config, source.cv, run_id, card, model["members"], report["metrics"])
        tags = _version_tags(source, test, metric, config, lineage)
        version = str(mlflow.register_model(model_uri, name, tags={**tags, STATUS: INCOMPLETE}).version)
        decision = crown(client, uri, name, version, score, metric)
        _complete_version(client, name, version, decision, config, source.cv.get(metric), score, metric, card)
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {
        "name": name,
        "version": version,
        "alias": decision.alias,
        "reason": decision.reason,
        "score": score,
        "metric": metric,
        "test": test,
        "comparison": report["rows"],  # None for a refit without TTA, else fold_ensemble.held_out_report's rows
        "cv": source.cv,
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": f"models:/{name}/{version}",
        # where its held-out test patients are (the baselines beside it use the same split)
        "data": split_settings(cli.config["data"]),
    }


def _complete_version(
    client, name: str, version: str, decision, config: dict, cv, score: float, metric: str, card: str | None = None
) -> None:
    """The decision tags and description (a summary line, then the model card) of a crowned version, then
    leuko.status=complete, last."""
    from leuko.tracking.model_card import description, model_summary  # heavy imports here, as in source_from_study

    compared = {
        "leuko.decision": f"{decision.alias}: {decision.reason}",
        "leuko.compared_to": decision.compared_to or "none",
        "leuko.champion_score": "none" if decision.champion_score is None else f"{decision.champion_score:.6f}",
    }
    for key, value in compared.items():
        client.set_model_version_tag(name, version, key, value)
    summary = (
        f"{model_summary(config)}; test {metric} {score:.4f}"
        + (f", cross-validated {cv['mean']:.4f} +- {cv['std']:.4f}" if cv else "")
        + f". {decision.alias}: {decision.reason}."
    )
    client.update_model_version(name, version, description=description(summary, card) if card else summary)
    client.set_model_version_tag(name, version, STATUS, COMPLETE)


def _version_tags(source: Source, test: dict, metric: str, config: dict, lineage: dict) -> dict[str, str]:
    """The tags a registered version carries, besides the alias decision."""
    score = test[metric]
    tags = {
        "leuko.score": f"{score:.{SCORE_DECIMALS}f}",  # what champion.decide compares a new version with
        "leuko.metric": f"test/{metric}",
        "leuko.classes": ",".join(config["classes"]),
        **{f"leuko.test_{k}": f"{v:.6f}" for k, v in test.items() if not k.startswith("recall_")},
        **{
            f"leuko.cv_{k}": f"{v['mean']:.6f} +- {v['std']:.6f}"
            for k, v in source.cv.items()
            if k in ("balanced_accuracy", "macro_f1", "accuracy")
        },
        **lineage,
    }
    if source.study is not None:
        tags.update({"leuko.study": source.study, "leuko.trial": str(source.trial)})
    return tags


def print_summary(result: dict) -> None:
    from leuko.tracking.fold_ensemble import table_lines  # heavy imports here, as in source_from_study

    name, uri = result["name"], result["tracking_uri"]
    cv = result["cv"].get(result["metric"])
    print(f"\nregistered {name} version {result['version']} (run {result['run_id']})")
    print(
        f"  test {result['metric']}: {result['score']:.4f}"
        + (f"   cross-validated: {cv['mean']:.4f} +- {cv['std']:.4f}" if cv else "")
    )
    print(f"  alias: {result['alias']} ({result['reason']})")
    for title, rows, key in (
        ("on the same held-out test patients:", result.get("comparison"), "model"),
        ("baselines on the same held-out test patients:", result.get("baselines"), "method"),
    ):
        if rows:
            print(f"  {title}")
            print("\n".join(f"    {line}" for line in table_lines(rows, key)))
    env = "" if uri == "sqlite:///mlflow.db" else f"MLFLOW_TRACKING_URI={uri} "
    alias_uri = f"models:/{name}@{CHAMPION}"
    print(f"  this version: models:/{name}/{result['version']}    current champion: {alias_uri}")
    print("next:")
    print(f"  {env}leuko predict --model {alias_uri} --input data --out predictions.csv")
    print(f"  {env}mlflow models serve -m {alias_uri} --env-manager local -h 127.0.0.1 -p 5002")
    print(f"  MLflow UI: make mlflow-ui  (or mlflow ui --backend-store-uri {uri})")
