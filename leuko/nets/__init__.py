"""Networks for single-cell volumes: name -> constructor, and the one builder that takes a name.

Every net maps (B, C, D, H, W) to logits (B, num_classes), has `num_features` and
`forward_features(x) -> (B, num_features)`, and takes `drop_rate` (dropout before the head). Each net
class also owns two details the training system must not guess:
  input_shape_kwargs(input_shape) -> dict   (classmethod) the constructor arguments it derives from the
                                            data's volume shape (D, H, W), e.g. a ViT's img_size
  no_weight_decay() -> set[str]             names of parameters that AdamW leaves undecayed, besides
                                            biases and norm weights (timm's convention)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from leuko.errors import ConfigError
from leuko.nets.fishnet3d import FishNet3D, fishnet3d, fishnet3d_pool_tiny, fishnet3d_tiny
from leuko.nets.resnet3d import ResNet3D, resnet3d_50, resnet3d_50_slim, resnet3d_50_tiny
from leuko.nets.vit3d import ViT3D, vit3d, vit3d_convstem, vit3d_convstem_tiny, vit3d_tiny

NETS: dict[str, Callable[..., nn.Module]] = {
    "resnet3d_50": resnet3d_50,
    "resnet3d_50_slim": resnet3d_50_slim,
    "resnet3d_50_tiny": resnet3d_50_tiny,
    "vit3d": vit3d,
    "vit3d_tiny": vit3d_tiny,
    "fishnet3d": fishnet3d,
    "fishnet3d_tiny": fishnet3d_tiny,
    # other stems under new names, so that the names above stay the studies' nets
    "fishnet3d_pool_tiny": fishnet3d_pool_tiny,
    "vit3d_convstem": vit3d_convstem,
    "vit3d_convstem_tiny": vit3d_convstem_tiny,
}


def net_class(name: str) -> type[nn.Module]:
    """The model class the variant `name` builds."""
    # variants are `def variant(**kwargs) -> ModelClass`: the model class holds the real signature
    return inspect.signature(_lookup(name), eval_str=True).return_annotation


def net_kwargs(name: str) -> list[str]:
    """Names of the keyword arguments the net `name` accepts."""
    return list(inspect.signature(net_class(name)).parameters)


def constructor_kwargs(
    name: str, kwargs: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None
) -> dict[str, Any]:
    """kwargs completed with what the net takes from the volume shape; a value given in kwargs wins."""
    derived = net_class(name).input_shape_kwargs(input_shape) if input_shape is not None else {}
    return derived | dict(kwargs or {})


def build_net(
    name: str, *, in_channels: int, num_classes: int, input_shape: Sequence[int] | None = None, **kwargs: Any
) -> nn.Module:
    """The net `name` for data of in_channels channels, num_classes classes and volumes of input_shape (D, H, W)."""
    ctor = _lookup(name)
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ConfigError(f"net {name!r}: in_channels={in_channels!r} must be a positive int (1 for RI, 2 for HHG)")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"net {name!r}: num_classes={num_classes!r} must be a positive int")
    valid = net_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"net {name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(valid)}")
    return ctor(in_channels=in_channels, num_classes=num_classes, **constructor_kwargs(name, kwargs, input_shape))


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in NETS:
        raise ConfigError(f"unknown net {name!r}; choose one of: {', '.join(NETS)}")
    return NETS[name]


__all__ = ["NETS", "FishNet3D", "ResNet3D", "ViT3D", "build_net", "constructor_kwargs", "net_class", "net_kwargs"]
