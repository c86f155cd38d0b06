"""An exponential moving average (EMA) of the weights: validated, checkpointed and shipped instead of the raw weights.

In a recipe (conf/experiment/phantoms_tiny.yaml):

    trainer:
      callbacks:
        - class_path: leuko.training.averaging.EMAWeights
          init_args: {decay: 0.99}
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging

from leuko.errors import ConfigError


class EMAWeights(WeightAveraging):
    """An EMA of the weights (and batch-norm statistics), updated after every optimizer step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first epochs' average is not
    held back by the random initial weights (Lightning's EMAWeightAveraging uses the fixed decay from the start:
    measured on the default cohort, its average reached 0.90 two epochs later).

    During the fit (Lightning's WeightAveraging): every validation scores the averaged weights, so the best
    checkpoint is chosen on them, and every checkpoint's state_dict holds them (the raw weights ride along for
    a resume). After the fit the callback steps aside: a `validate` or `predict` with ckpt_path="best" then
    scores that checkpoint's averaged weights. Lightning's own callback would still swap in the last average at
    each validation and reload the raw weights from the checkpoint, so CV scores and predictions would not be
    the best checkpoint's.

    Args:
        decay: weight of the old average at each optimizer step; 0.99 averages about the last 100 steps.
    """

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        super().__init__(multi_avg_fn=self._update)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # checked here, not in __init__: jsonargparse would bury an error raised while it parses the config
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"EMAWeights decay {self.decay}: give a number between 0 and 1, e.g. 0.99")
        super().setup(trainer, pl_module, stage)

    @torch.no_grad()
    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        """One EMA step over tensors of one device and dtype (AveragedModel's multi_avg_fn)."""
        n = float(updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:  # counters such as batch norm's num_batches_tracked
            for old, new in zip(averaged, current, strict=True):
                old.copy_(new)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)  # the module keeps the final average
        self._average_model = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is not None:  # resuming a fit: the average and the raw weights come back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # else a checkpoint scored after the fit: its state_dict (the average) is already loaded
