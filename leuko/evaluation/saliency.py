"""What a net looked at in one prepared cell: 3D Grad-CAM and occlusion sensitivity, each a (D, H, W) map in [0, 1].

    grad_cam    MONAI's GradCAM: the feature map of cam_layer, weighted by the class score's mean gradient over
                it, ReLU, upsampled trilinearly to the volume. cam_layer is the deepest layer whose grid still
                has at least MIN_GRID voxels per axis (a 2^3 grid says little about a 32^3 cell):
                    ResNet3D   backbone.layer4, layer3, layer2, layer1
                    FishNet3D  the classifier's 1x1x1 conv, then the down2 blocks, then the up blocks
                    ViT3D      the patch tokens entering the last block, reshaped to their 3D grid (its class
                               token reads them there; after the last block only the class token counts)
                    other      its Conv3d layers, deepest first
    occlusion   MONAI's OcclusionSensitivity: the drop of the class probability when a Gaussian-weighted cube
                around each voxel is pulled to 0, the medium of a prepared volume; clipped at 0

Each map is scaled so that its maximum is 1 (a map that is 0 everywhere stays 0). Probabilities are the
calibrated ones (logits / temperature, plus the model's class biases if it has them). The net is copied first:
the hooks never touch the caller's net.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.visualize import GradCAM, OcclusionSensitivity
from torch import nn

from leuko.nets import FishNet3D, ResNet3D, ViT3D

MIN_GRID = 4  # voxels per axis a Grad-CAM layer keeps, when the net has such a layer
TOKENS = "tokens"  # the name of the ViT token grid layer in _CamNet


class _CamNet(nn.Module):
    """net -> logits / temperature (+ class biases), with an identity layer `tokens` that a ViT's patch tokens
    pass through as a (B, E, gd, gh, gw) grid, so that Grad-CAM can hook them like a feature map."""

    def __init__(self, net: nn.Module, temperature: float = 1.0, bias: Sequence[float] | None = None) -> None:
        super().__init__()
        self.net = net
        self.temperature = float(temperature)
        self.register_buffer("bias", None if bias is None else torch.tensor(bias, dtype=torch.float32), False)
        self.tokens = nn.Identity()
        if isinstance(net, ViT3D):
            net.blocks[-1].norm1.register_forward_hook(self._through_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, ViT3D):
            patch = self.net.patch_embed.proj.kernel_size
            self._grid = tuple(s // p for s, p in zip(x.shape[-3:], patch))
        logits = self.net(x) / self.temperature  # (B, classes)
        return logits if self.bias is None else logits + self.bias

    def _through_grid(self, module, args, out: torch.Tensor) -> torch.Tensor:
        cls, tokens = out[:, :1], out[:, 1:]  # (B, 1, E), (B, N, E)
        b, n, e = tokens.shape
        grid = self.tokens(tokens.transpose(1, 2).reshape(b, e, *self._grid))  # (B, E, gd, gh, gw)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + N, E)


def candidate_layers(net: nn.Module) -> list[str]:
    """Names (in _CamNet) of the layers Grad-CAM may use, deepest first (module docstring)."""
    if isinstance(net, ViT3D):
        return [TOKENS]
    if isinstance(net, ResNet3D):
        return [f"net.backbone.layer{i}" for i in (4, 3, 2, 1)]
    if isinstance(net, FishNet3D):
        return (
            ["net.classifier.2"]
            + [f"net.down2.{i}" for i in reversed(range(len(net.down2)))]
            + [f"net.up.{i}" for i in reversed(range(len(net.up)))]
        )
    return [f"net.{name}" for name, m in reversed(list(net.named_modules())) if isinstance(m, nn.Conv3d)]


def cam_layer(model: _CamNet, x: torch.Tensor) -> str:
    """The deepest candidate layer whose output grid has at least MIN_GRID voxels per axis (else the finest)."""
    names = candidate_layers(model.net)
    modules = dict(model.named_modules())
    sizes: dict[str, int] = {}
    hooks = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: sizes.__setitem__(n, min(out.shape[2:])))
        for n in names
        if n in modules
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    seen = [n for n in names if n in sizes]
    if not seen:
        raise ValueError(f"{type(model.net).__name__}: no layer for Grad-CAM among {names}; pass a layer name")
    return next((n for n in seen if sizes[n] >= MIN_GRID), max(seen, key=lambda n: sizes[n]))


def _unit(volume: torch.Tensor) -> np.ndarray:
    """(D, H, W) float32 scaled to a maximum of 1 (all-zero stays zero)."""
    volume = volume.detach().float().clamp_min(0).cpu().numpy()
    top = volume.max()
    return (volume / top if top > 0 else volume).astype(np.float32)


def grad_cam(
    net: nn.Module, x: np.ndarray, class_idx: int, *, layer: str | None = None, temperature: float = 1.0
) -> tuple[np.ndarray, str]:
    """((D, H, W) map, layer used) for one prepared cell x (C, D, H, W) and class class_idx."""
    model = _CamNet(copy.deepcopy(net).cpu().eval(), temperature).eval()
    volume = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (1, C, D, H, W)
    layer = layer or cam_layer(model, volume)
    if layer not in dict(model.named_modules()):
        raise ValueError(f"Grad-CAM layer {layer!r} is not in the net; its candidates: {candidate_layers(net)}")
    with torch.enable_grad():
        cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=lambda m: m)(volume, class_idx=class_idx)
    return _unit(cam[0, 0]), layer  # (D, H, W)


def occlusion(
    net: nn.Module,
    x: np.ndarray,
    class_idx: int,
    *,
    mask_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    temperature: float = 1.0,
    bias: Sequence[float] | None = None,
    n_batch: int = 32,
) -> np.ndarray:
    """(D, H, W) drop of the class probability when the neighbourhood of each voxel is occluded.

    mask_size: the occluded cube (voxels per axis), default a quarter of each side (at least 2)."""
    model = _CamNet(copy.deepcopy(net).cpu().eval(), temperature, bias).eval()
    volume = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (1, C, D, H, W)
    mask = tuple(mask_size) if mask_size else tuple(max(2, s // 4) for s in volume.shape[2:])
    occluder = OcclusionSensitivity(model, mask_size=mask, n_batch=n_batch, overlap=overlap, verbose=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI indexes tensors with lists, which torch warns about
        p = model(volume).softmax(-1)[0, class_idx]
        sens, _ = occluder(volume)  # (1, classes, D, H, W): the probabilities with each neighbourhood occluded
    return _unit(p - sens[0, class_idx].as_tensor())  # (D, H, W)


def explain_cell(
    net: nn.Module,
    x: np.ndarray,
    class_idx: int,
    *,
    methods: Sequence[str],
    layer: str | None = None,
    temperature: float = 1.0,
    mask_size: Sequence[int] | None = None,
    bias: Sequence[float] | None = None,
) -> tuple[dict[str, np.ndarray], str | None]:
    """({method: (D, H, W) map}, Grad-CAM layer or None) of one prepared cell; methods: "gradcam", "occlusion".
    Grad-CAM differentiates the logit, which class biases only shift; occlusion's probabilities include them."""
    maps, used = {}, None
    if "gradcam" in methods:
        maps["gradcam"], used = grad_cam(net, x, class_idx, layer=layer, temperature=temperature)
    if "occlusion" in methods:
        maps["occlusion"] = occlusion(net, x, class_idx, mask_size=mask_size, temperature=temperature, bias=bias)
    return maps, used
