"""3D ResNet (the HHGM study's "ResNet 3D-50") on top of MONAI's ResNet.

MONAI builds the backbone (stem, bottleneck stages, global average pool); this file only adds
the pieces every leuko net shares: `forward_features` -> (B, num_features), a dropout + linear
head, and variants sized for single-cell volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from leuko.errors import ConfigError

_EXPANSION = {"basic": ResNetBlock.expansion, "bottleneck": ResNetBottleneck.expansion}


class ResNet3D(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 4,
        layers: Sequence[int] = (3, 4, 6, 3),
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        block: str = "bottleneck",
        conv1_kernel: int = 7,
        conv1_stride: int = 1,
        no_max_pool: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in _EXPANSION:
            raise ConfigError(f"ResNet3D: block={block!r} is not one of {sorted(_EXPANSION)}")
        if len(layers) != 4 or len(block_inplanes) != 4:
            raise ConfigError(
                f"ResNet3D: layers={tuple(layers)} and block_inplanes={tuple(block_inplanes)} "
                "must have 4 entries each (one per stage)"
            )
        # MONAI's own defaults are 3 input channels (video) and 400 classes (Kinetics): always pass
        # both. feed_forward=False drops MONAI's fc so the backbone returns the pooled features and
        # the head below (with dropout) is ours. bias_downsample=False: a bias in the 1x1 shortcut
        # conv is redundant before its batch norm (MONAI keeps it only for old checkpoints).
        self.backbone = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=conv1_kernel,
            conv1_t_stride=conv1_stride,
            no_max_pool=no_max_pool,
            num_classes=num_classes,
            feed_forward=False,
            bias_downsample=False,
        )
        self.num_features = block_inplanes[-1] * _EXPANSION[block]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    @classmethod
    def input_shape_kwargs(cls, input_shape: Sequence[int]) -> dict[str, Any]:
        return {}  # convolutions and global average pooling take any volume shape

    def no_weight_decay(self) -> set[str]:
        return set()  # only the biases and norm weights, which every net leaves undecayed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, D, H, W) -> stem /2 (max pool) -> stages /1, /2, /2, /2 -> global average pool
        return self.backbone(x)  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))  # (B, num_classes)


def resnet3d_50(**kwargs: Any) -> ResNet3D:
    """ResNet-50 widths and depths: the same network as `monai.networks.nets.resnet50`.

    The stem keeps MONAI's 7^3 kernel with stride 1 followed by the stride-2 max pool: the total
    stride is 16 (not ImageNet's 32), so a 32^3 cell still ends on a 2^3 grid and 48x96x96 on
    3x6x6. A stride-2 stem would leave a single voxel for 32^3 inputs. The price is that the
    full-resolution 7^3 stem is a large share of the FLOPs (see benchmarks/nets_table.py);
    pass conv1_stride=2 for large volumes.
    """
    args: dict[str, Any] = dict(layers=(3, 4, 6, 3), block_inplanes=(64, 128, 256, 512))
    return ResNet3D(**(args | kwargs))


def resnet3d_50_slim(**kwargs: Any) -> ResNet3D:
    """ResNet-50 depth (3, 4, 6, 3 bottlenecks) at 1/8 width, with resnet3d_50_tiny's 3^3 stem: 0.73 M parameters.

    The net of the recipe for real volumes (conf/experiment/real_volumes.yaml). Against resnet3d_50_tiny (one
    bottleneck per stage) it takes about twice the time per epoch and generalises better on real volumes
    (README, VesselMNIST3D).
    """
    args: dict[str, Any] = dict(layers=(3, 4, 6, 3), block_inplanes=(8, 16, 32, 64), conv1_kernel=3, conv1_stride=1)
    return ResNet3D(**(args | kwargs))


def resnet3d_50_tiny(**kwargs: Any) -> ResNet3D:
    """One bottleneck per stage at 1/8 width, for tests: same code path as resnet3d_50.

    A 3^3 stem with stride 1 (instead of 7^3): on 32^3 test volumes a 7^3 kernel would see a
    fifth of the cell per voxel and cost most of the (tiny) net's compute; the max pool stays so
    that its code path is exercised.
    """
    args: dict[str, Any] = dict(layers=(1, 1, 1, 1), block_inplanes=(8, 16, 32, 64), conv1_kernel=3, conv1_stride=1)
    return ResNet3D(**(args | kwargs))
