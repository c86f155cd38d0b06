"""`leuko sweep`: an Optuna study over model families and hyperparameters; a trial is a cross-validated fit."""

from leuko.sweep.core import *  # noqa: F403  (split into modules below)
