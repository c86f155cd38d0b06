"""Old import path of the classifier, kept for user code: use leuko.training.module.VolumeClassifier."""

import warnings

from leuko.training.module import VolumeClassifier

__all__ = ["VolumeClassifier"]

warnings.warn(
    "leuko.classifier is now leuko.training.module; import VolumeClassifier from there",
    DeprecationWarning,
    stacklevel=2,
)
