"""The default leukocyte classes, in label-index order."""

DEFAULT_CLASSES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")
