"""Evaluation beyond accuracy: morphology features (morphology.py) and per-sample differentials with
Bland-Altman agreement (agreement.py). Import the modules directly; this package imports nothing."""
