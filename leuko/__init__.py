"""leuko: label-free 3D leukocyte differentiation."""

__version__ = "0.1.0"
