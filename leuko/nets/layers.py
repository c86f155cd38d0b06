"""Layers that more than one net uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepth3D(nn.Module):
    """(B, C, D, H, W) -> (B, 8 C, ceil(D/2), ceil(H/2), ceil(W/2)): each 2x2x2 block becomes 8 channels.

    Lossless and free of FLOPs: a stem that starts with it runs the first conv at half resolution on 8x the
    channels, which CPUs compute several times faster than a narrow full-resolution conv (TResNet's
    space-to-depth stem, in 3D). Odd sides are zero-padded at the end first: 0 is the medium around a cell
    in normalised volumes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[-3:]
        x = F.pad(x, (0, w % 2, 0, h % 2, 0, d % 2))  # (B, C, D', H', W'), all even
        b, c, d, h, w = x.shape
        x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, 2, 2, 2, D'/2, H'/2, W'/2)
        return x.reshape(b, c * 8, d // 2, h // 2, w // 2)
