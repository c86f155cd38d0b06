"""`leuko sweep`: an Optuna study over model families and hyperparameters; a trial is a cross-validated fit.

The modules, in the order a sweep walks through them:
    space        the sweep file (conf/sweep/*.yaml): schema, search space, a trial's config overrides
    study        the Optuna storage and study; the names of what leuko records on trials and studies
    run          the command: set up the study and the MLflow sweep run, start the workers, finish
    worker       one worker: ask for a trial, run it in this process or its own, report the outcome
    trial        one cross-validated trial with pruning; `python -m leuko.sweep TRIAL_DIR/trial.json`
    recovery     fail the RUNNING trials whose worker died (pid, heartbeat and start time; any storage)
    tracking     MLflow bookkeeping: the sweep run, its trials' runs nested below it
    leaderboard  one row per trial, best first

Import from the modules (leuko.sweep.run.run_sweep, leuko.sweep.space.load_sweep_config, ...); this
package re-exports nothing, so importing one module loads only what it needs.
"""
