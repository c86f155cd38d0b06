"""Test-time augmentation (TTA): the views of a prepared volume whose probabilities a registered model averages.

    none        the volume as given: 1 view
    flip        all 8 combinations of flipping D, H and W (the identity among them)
    flip_rot90  those 8, each also with a quarter turn in the (H, W) plane: 16 views; needs H == W

Why all 8 flip combinations, not the identity and the three single-axis flips: the 8 form a group, so
flipping the input only reorders the views, and their mean is exactly invariant to flipping the input
along any axis. The 4 views of the identity and single-axis flips are not closed under composition, and
their mean changes when the input is flipped. flip_rot90 is likewise the whole group of the symmetries
of a box with a square (H, W) face. Training augments with flips and quarter turns (leuko.data.augment),
so the net has seen such views. Cost: views x members forward passes per volume.

Light on purpose (no torch import): the CLI reads TTA_MODES and DEFAULT_TTA while building its parser;
leuko.deploy.ensemble applies the views.
"""

from __future__ import annotations

from collections.abc import Sequence

from leuko.errors import LeukoError

TTA_MODES = ("none", "flip", "flip_rot90")
# The mode `leuko register` ships by default; the measured gain on the real cohort decides whether it changes.
DEFAULT_TTA = "none"
# Dims of a (B, C, D, H, W) batch to flip: every subset of D (2), H (3) and W (4), the identity first.
# A view is (dims to flip, whether a quarter turn in (H, W) comes first).
FLIPS = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
VIEWS = {
    "none": (((), False),),
    "flip": tuple((f, False) for f in FLIPS),
    "flip_rot90": tuple((f, False) for f in FLIPS) + tuple((f, True) for f in FLIPS),
}


class TTAError(LeukoError, ValueError):
    """A TTA mode leuko does not know, or one the model's input shape cannot take; the message says which."""


def check_tta(tta: str, shape: Sequence[int] | None = None, *, where: str = "--tta") -> str:
    """tta, when it is a known mode that fits a prepared (D, H, W) shape; TTAError otherwise."""
    if tta not in TTA_MODES:
        raise TTAError(f"{where} {tta!r}: choose one of {', '.join(TTA_MODES)}")
    if tta == "flip_rot90" and shape is not None and shape[1] != shape[2]:
        raise TTAError(
            f"{where} flip_rot90: a quarter turn in (H, W) needs H == W, but the model's volumes are "
            f"{' x '.join(map(str, shape))} (D x H x W); use --tta flip, or prepare square (H, W) volumes"
        )
    return tta


def views(tta: str) -> list[tuple[tuple[int, ...], bool]]:
    """[(dims to flip, quarter turn in (H, W))] of a mode, the identity first."""
    return list(VIEWS[check_tta(tta, where="tta")])


def apply_view(x, flips: tuple[int, ...], turn: bool):
    """A (B, C, D, H, W) torch tensor seen from one view: turned a quarter in (H, W) (as torch.rot90(x, 1,
    dims=(3, 4)), written as a flip and a transpose because ONNX has no rot90), then flipped along flips."""
    if turn:
        x = x.flip(4).transpose(3, 4)
    return x.flip(flips) if flips else x
