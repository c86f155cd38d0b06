"""A registered model as one nn.Module: prepared volumes -> calibrated class probabilities.

    p(x) = mean over members m and TTA views v of softmax(net_m(v(x)) / T + b)              (B, classes)

members: the nets of the model (one for a refit, the k fold models of a CV for an ensemble); T: the model's
temperature (model_config.json calibration.temperature), fitted on the out-of-fold predictions of the CV the
members came from, so it scales each member's logits as it was fitted to; b: the model's class biases
(calibration.bias, fitted with T when registered with `--decisions prevalence`), else 0; views:
leuko.deploy.tta. One member, no TTA and no biases is exactly softmax(net(x) / T), what registered models
returned before ensembles.

The model's inference code (leuko.deploy.pyfunc_model) runs it batch by batch; `leuko export` and predict's
ONNX cache (leuko.deploy.graph) export it whole, so the graph averages inside. The views and members run
one after another on the same batch: memory stays that of one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leuko.deploy.tta import apply_view, views


class Ensemble(nn.Module):
    def __init__(
        self,
        members: Sequence[nn.Module],
        temperature: float = 1.0,
        tta: str = "none",
        bias: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member net")
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)
        # a buffer, so it moves with .to(device) and is a constant of an exported graph; not in the state dict
        self.register_buffer("bias", None if bias is None else torch.tensor(bias, dtype=torch.float32), False)
        self.tta = tta
        self.views = views(tta)

    @property
    def size(self) -> int:
        return len(self.members)

    def _term(self, net: nn.Module, seen: torch.Tensor) -> torch.Tensor:
        """One member's calibrated probabilities on one view: (B, classes)."""
        logits = net(seen).float() / self.temperature
        return (logits if self.bias is None else logits + self.bias).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for flips, turn in self.views:
            seen = apply_view(x, flips, turn)  # (B, C, D, H, W)
            for net in self.members:
                p = self._term(net, seen)  # (B, classes)
                total = p if total is None else total + p
        n = len(self.views) * len(self.members)
        return total if n == 1 else total / n

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """(views, members, B, classes): each member's calibrated probabilities on each view, the identity view
        first; forward(x) is their mean over the first two axes."""
        return torch.stack(
            [torch.stack([self._term(net, apply_view(x, f, t)) for net in self.members]) for f, t in self.views]
        )
