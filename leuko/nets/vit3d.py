"""Vision Transformer over 3D patches (the HHGM study's "ViT 3D").

Conv3d patch embedding + cls token + learned position embedding, then timm's pre-norm
transformer blocks (fused scaled-dot-product attention), a final LayerNorm and a linear head on
the cls token. Unlike MONAI's ViT, forward returns logits only.

The `vit3d_convstem*` variants change two things, both known fixes for ViTs on small data:
  stem="conv"        a convolutional stem instead of the linear patch embedding (Xiao et al. 2021,
                     "Early convolutions help transformers see better"): stride-2 3x3x3 convs with
                     batch norm and ReLU halve the volume until it is on the patch grid, then a 1x1x1
                     conv projects to embed_dim. Same token grid; the embedding is non-linear and
                     sees across patch borders.
  global_pool="avg"  the head reads the mean of the patch tokens instead of the cls token.
Why: on 32^3 phantom cells vit3d_tiny plateaus near 0.6 validation balanced accuracy however long it
trains: a linear map of each 8^3 patch does not pick out fine granules, so it calls most
neutrophils eosinophils. On fold 0, 30 epochs at 64 wide x 3 blocks: linear patches + mean token
0.66, conv stem + cls token 0.81, conv stem + mean token 0.88 (benchmarks/time_to_accuracy.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from leuko.errors import ConfigError

Size3 = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Size3:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"ViT3D: {name}={value!r} must be a positive int or three positive ints (D, H, W)")
    return out  # type: ignore[return-value]


def _resize_pos_embed(pos_embed: torch.Tensor, old_grid: Size3, new_grid: Size3) -> torch.Tensor:
    """Trilinear resize of the patch position embeddings; the cls position is kept as is."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, E), (1, N, E)
    patch_pos = patch_pos.reshape(1, *old_grid, -1).permute(0, 4, 1, 2, 3)  # (1, E, gd, gh, gw)
    patch_pos = F.interpolate(patch_pos, size=new_grid, mode="trilinear", align_corners=False)
    patch_pos = patch_pos.flatten(2).transpose(1, 2)  # (1, N', E)
    return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + N', E)


def _check_multiple(spatial: Size3, patch_size: Size3) -> None:
    if any(s % p for s, p in zip(spatial, patch_size, strict=True)):
        fits = tuple(max(p, round(s / p) * p) for s, p in zip(spatial, patch_size, strict=True))
        raise ConfigError(
            f"ViT3D: input spatial shape {spatial} is not a multiple of patch_size {patch_size}; "
            f"crop or pad the volumes (e.g. to {fits}) or choose another patch_size"
        )


class PatchEmbed3D(nn.Module):
    def __init__(self, *, in_channels: int, embed_dim: int, patch_size: Size3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size3]:
        _check_multiple(tuple(x.shape[-3:]), self.patch_size)
        x = self.proj(x)  # (B, E, gd, gh, gw)
        grid: Size3 = tuple(x.shape[-3:])  # type: ignore[assignment]
        return x.flatten(2).transpose(1, 2), grid  # (B, N, E)


class ConvStem3D(nn.Module):
    """Stride-2 3x3x3 conv -> BN -> ReLU, repeated until the volume is on the patch grid, then a 1x1x1 conv.

    Each step halves the axes whose patch size is not yet reached (patch (8, 16, 16): three steps over
    all axes, a fourth over H and W), so patch sides must be powers of two. Widths double per step and
    end at embed_dim // 2 (at least min_width), as in Xiao et al. 2021.
    """

    def __init__(self, *, in_channels: int, embed_dim: int, patch_size: Size3, min_width: int = 16) -> None:
        super().__init__()
        if any(p & (p - 1) for p in patch_size):
            raise ConfigError(f"ViT3D: stem='conv' needs patch sizes that are powers of two, got {patch_size}")
        self.patch_size = patch_size
        steps = max(p.bit_length() - 1 for p in patch_size)  # log2 of the largest patch side
        layers: list[nn.Module] = []
        c_in, reached = in_channels, [1, 1, 1]
        for i in range(steps):
            c_out = max(embed_dim // 2 ** (steps - i), min_width)
            stride = tuple(2 if r < p else 1 for r, p in zip(reached, patch_size, strict=True))
            reached = [r * s for r, s in zip(reached, stride, strict=True)]
            layers += [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out)]
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        layers.append(nn.Conv3d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size3]:
        _check_multiple(tuple(x.shape[-3:]), self.patch_size)
        x = self.proj(x)  # (B, E, gd, gh, gw)
        grid: Size3 = tuple(x.shape[-3:])  # type: ignore[assignment]
        return x.flatten(2).transpose(1, 2), grid  # (B, N, E)


class ViT3D(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 4,
        img_size: int | Sequence[int] = (48, 96, 96),
        patch_size: int | Sequence[int] = (8, 16, 16),
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        stem: Literal["patch", "conv"] = "patch",
        global_pool: Literal["token", "avg"] = "token",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        img_size, patch_size = _triple(img_size, "img_size"), _triple(patch_size, "patch_size")
        if any(s % p for s, p in zip(img_size, patch_size, strict=True)):
            raise ConfigError(f"ViT3D: img_size {img_size} must be a multiple of patch_size {patch_size}")
        if stem not in ("patch", "conv"):
            raise ConfigError(f"ViT3D: stem={stem!r} is not one of 'patch' (linear, the study's) or 'conv'")
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"ViT3D: global_pool={global_pool!r} is not one of 'token' (cls token) or 'avg'")
        self.global_pool = global_pool
        if embed_dim % num_heads:
            raise ConfigError(f"ViT3D: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.grid: Size3 = tuple(s // p for s, p in zip(img_size, patch_size, strict=True))  # type: ignore[assignment]
        self.num_features = embed_dim

        embed = PatchEmbed3D if stem == "patch" else ConvStem3D
        self.patch_embed = embed(in_channels=in_channels, embed_dim=embed_dim, patch_size=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # stochastic depth grows linearly with depth (DeiT / timm)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            )
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm ViT: truncated normal (std .02) for embeddings and linear layers, zero biases
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def input_shape_kwargs(cls, input_shape: Sequence[int]) -> dict[str, Any]:
        """The data's volume shape (D, H, W) sets img_size: the grid the position embedding is learned on."""
        return {"img_size": tuple(int(s) for s in input_shape)}

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW leaves undecayed besides biases and norm weights (timm convention)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(x)  # (B, C, D, H, W) -> (B, N, E)
        pos_embed = self.pos_embed
        if grid != self.grid:  # another input size than img_size: resize the learned grid
            pos_embed = _resize_pos_embed(pos_embed, self.grid, grid)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, E)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + pos_embed  # (B, 1 + N, E)
        x = self.blocks(self.pos_drop(x))
        if self.global_pool == "avg":
            return self.norm(x[:, 1:].mean(dim=1))  # (B, E): the mean patch token
        return self.norm(x[:, 0])  # (B, E): the cls token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))  # (B, num_classes)


def vit3d(**kwargs: Any) -> ViT3D:
    """ViT-S widths (384 wide, 12 blocks, 6 heads; ~21 M parameters) for 48x96x96 cells.

    Patches of 8x16x16 voxels give a cubic 6x6x6 token grid (216 tokens) on the 48x96x96
    crop, which is half as deep as it is wide; 16^3 patches would leave 3x6x6 = 108 tokens with
    only 3 along the axial axis. ViT-B widths (768, ~86 M parameters) are a lot for the few
    thousand labelled cells of the studies.
    """
    args: dict[str, Any] = dict(img_size=(48, 96, 96), patch_size=(8, 16, 16), embed_dim=384, depth=12, num_heads=6)
    return ViT3D(**(args | kwargs))


def vit3d_tiny(**kwargs: Any) -> ViT3D:
    """Two 32-wide blocks on 8^3 patches of a 32^3 volume (64 tokens), for tests."""
    args: dict[str, Any] = dict(img_size=(32, 32, 32), patch_size=(8, 8, 8), embed_dim=32, depth=2, num_heads=2)
    return ViT3D(**(args | kwargs))


CONVSTEM = {"stem": "conv", "global_pool": "avg"}  # what the `vit3d_convstem*` variants change


def vit3d_convstem(**kwargs: Any) -> ViT3D:
    """vit3d with a convolutional stem and mean-token pooling (see the module docstring)."""
    return vit3d(**(CONVSTEM | kwargs))


def vit3d_convstem_tiny(**kwargs: Any) -> ViT3D:
    """Three 64-wide blocks after a conv stem on a 32^3 volume (4^3 tokens, ~0.2 M parameters): CPU-sized."""
    return vit3d_tiny(**(CONVSTEM | {"embed_dim": 64, "depth": 3} | kwargs))
