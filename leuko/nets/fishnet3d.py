"""FISH-Net-inspired 3D CNN of the RI tomography study (Ryu et al., 2021).

Built from the paper's description (no reference code):
  down1 (FishNet "tail"): stacked downsampling blocks, batch norm -> leaky ReLU -> 3D conv -> 3D max pool;
  up    (FishNet "body"): nearest-neighbour upsampling refined by residual blocks;
  down2 (FishNet "head"): downsampling again, each step taking the upsampled features concatenated
        with the down1 features of the same resolution (residual transfer);
  classifier: batch norm -> leaky ReLU -> 1x1x1 3D conv -> adaptive average pooling.
Residual blocks are pre-activation (BN -> leaky ReLU -> conv), as in FishNet.

With widths (w0, ..., wS) and an R^3 input, down1 yields t_i at R/2^i with w_i channels
(i = 1..S), up climbs from R/2^S back to R/2, and down2 goes from R/2 to R/2^S again.

stem="conv" (the paper's net) is one 3x3x3 conv, and down1's first step another, at full resolution.
stem="pool" (the `*_pool` variants) is FishNet's own 2D stem in 3D (conv -> BN -> leaky ReLU -> 2x
max pool, as in ResNet): one narrow conv and a max pool at full resolution, the rest of the net from
R/2 on (R above becomes R/2). Most of a small 3D CNN's time on a CPU goes to its full-resolution
layers, and the max pool keeps what a strided stem loses: the brightest voxel of each 2x2x2 block
(granules). Measured on 32^3 phantom cells, 2 CPU threads (benchmarks/time_to_accuracy.py): about 3x
the training volumes/s of fishnet3d_tiny at the same validation accuracy per epoch; a space-to-depth
stem was faster still but lost about 0.1 balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from leuko.errors import ConfigError

# the paper names leaky ReLU without a slope: PyTorch's default
NEGATIVE_SLOPE = 0.01


def _preact_conv(c_in: int, c_out: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.BatchNorm3d(c_in),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        nn.Conv3d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
    ]


class PreActBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_preact_conv(channels, channels, 3), *_preact_conv(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the first BN reads x before the in-place activation: x itself is not modified
        return x + self.body(x)


class DownBlock(nn.Sequential):
    """BN -> leaky ReLU -> 3x3x3 conv -> 2x max pool, then `blocks` residual blocks."""

    def __init__(self, c_in: int, c_out: int, *, blocks: int = 0) -> None:
        super().__init__(
            *_preact_conv(c_in, c_out, 3),
            nn.MaxPool3d(2),
            *(PreActBlock(c_out) for _ in range(blocks)),
        )

    @property
    def conv(self) -> nn.Conv3d:
        return self[2]


class UpBlock(nn.Module):
    """BN -> leaky ReLU -> 1x1x1 conv (c_in -> c_out), nearest upsampling, residual blocks."""

    def __init__(self, c_in: int, c_out: int, *, blocks: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*_preact_conv(c_in, c_out, 1))
        self.refine = nn.Sequential(*(PreActBlock(c_out) for _ in range(blocks)))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.reduce(x)  # (B, c_out, d, h, w)
        # to the transfer's exact size (not a fixed x2) so that odd input sizes line up
        x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, c_out, D', H', W')
        return self.refine(x)


class FishNet3D(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 4,
        widths: Sequence[int] = (8, 16, 32, 64, 128),
        blocks: int = 2,
        num_features: int = 256,
        stem: Literal["conv", "pool"] = "conv",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if stem not in ("conv", "pool"):
            raise ConfigError(
                f"FishNet3D: stem={stem!r} is not one of 'conv' (the paper's) or 'pool' (conv + max pool)"
            )
        if len(widths) < 3:
            raise ConfigError(
                f"FishNet3D: widths={widths} needs at least 3 entries (stem width and two or more "
                "downsampling steps), e.g. (8, 16, 32, 64)"
            )
        depth = len(widths) - 1  # number of 2x downsampling steps in down1 (and in the whole net)
        self.num_features = num_features

        # a plain conv first: a leading BN -> leaky ReLU would squash the negative half of the
        # normalised input volume
        if stem == "conv":
            self.stem: nn.Module = nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False)
        else:
            self.stem = nn.Sequential(
                nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False),
                nn.BatchNorm3d(widths[0]),
                nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
                nn.MaxPool3d(2),
            )
        self.down1 = nn.ModuleList(DownBlock(widths[i], widths[i + 1]) for i in range(depth))
        self.bridge = nn.Sequential(*(PreActBlock(widths[-1]) for _ in range(blocks)))
        # up[k] goes from level depth-k to level depth-k-1, ending at level 1 (R/2): the full
        # resolution is never revisited, which keeps FLOPs and memory in check
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i], blocks=blocks) for i in reversed(range(1, depth)))
        # down2[j-1] reads cat(features at level j, transfer t_j): 2 * w_j channels
        self.down2 = nn.ModuleList(DownBlock(2 * widths[j], widths[j + 1], blocks=blocks) for j in range(1, depth))
        self.classifier = nn.Sequential(
            *_preact_conv(widths[-1], num_features, 1),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(1),
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=NEGATIVE_SLOPE)

    @classmethod
    def input_shape_kwargs(cls, input_shape: Sequence[int]) -> dict[str, Any]:
        return {}  # convolutions and global average pooling take any volume shape

    def no_weight_decay(self) -> set[str]:
        return set()  # only the biases and norm weights, which every net leaves undecayed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, w0, D, H, W); "pool": (B, w0, D/2, H/2, W/2), called D, H, W below
        transfers = []
        for block in self.down1:
            x = block(x)  # t_i: (B, w_i, D/2^i, H/2^i, W/2^i), i = 1..S
            transfers.append(x)
        x = self.bridge(x)  # (B, wS, D/2^S, ...)
        for block, skip in zip(self.up, reversed(transfers[:-1]), strict=True):
            x = block(x, skip.shape[-3:])  # (B, w_j, D/2^j, ...), j = S-1 .. 1
        for block, skip in zip(self.down2, transfers[:-1], strict=True):
            x = block(torch.cat([x, skip], dim=1))  # (B, 2 w_j, ...) -> (B, w_j+1, D/2^(j+1), ...)
        return self.classifier(x)  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))  # (B, num_classes)


def fishnet3d(**kwargs: Any) -> FishNet3D:
    """Four downsampling steps from 8 to 128 channels, two residual blocks per step (~5 M parameters).

    An 8-wide stem keeps the only full-resolution 3x3x3 conv of down1 cheap; four steps take
    32^3 cells to 2^3 and 48x96x96 crops to 3x6x6 before pooling.
    """
    args: dict[str, Any] = dict(widths=(8, 16, 32, 64, 128), blocks=2, num_features=256)
    return FishNet3D(**(args | kwargs))


def fishnet3d_tiny(**kwargs: Any) -> FishNet3D:
    """Three steps of 4 -> 32 channels, one residual block each, for tests."""
    args: dict[str, Any] = dict(widths=(4, 8, 16, 32), blocks=1, num_features=32)
    return FishNet3D(**(args | kwargs))


def fishnet3d_pool_tiny(**kwargs: Any) -> FishNet3D:
    """The CPU net of the default recipe: the pooled stem, then three steps of 8 -> 64 channels (~0.8 M parameters).

    0.41 GFLOP per training volume at 32^3, against 0.78 for fishnet3d_tiny, on wider (faster) tensors;
    32^3 cells end on a 2^3 grid, as with fishnet3d.
    """
    args: dict[str, Any] = dict(widths=(8, 16, 32, 64), blocks=1, num_features=64, stem="pool")
    return FishNet3D(**(args | kwargs))
