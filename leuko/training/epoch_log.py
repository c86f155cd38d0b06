"""One plain line per training epoch, for a run whose output goes to a log rather than a terminal.

Lightning's progress bar redraws itself in place; written to a file (`leuko cv > cv.log`, a SLURM job's
output, a DVC stage) it shows nothing until the run ends, or one line of thousands of characters.
LeukoCLI turns the bar off there and adds EpochLog instead:

    fold_0: epoch 3/30  train/loss 0.712  val/balanced_accuracy 0.812  val/auroc 0.950  (5.2 s)
"""

from __future__ import annotations

import sys
import time

import lightning as L

SCORES = ("train/loss_epoch", "val/loss", "val/balanced_accuracy", "val/auroc")  # shown when logged


class EpochLog(L.Callback):
    """Print `<label>: epoch e/max  <score> <value> ...  (<seconds> s)` to stderr after each epoch (rank 0 only)."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, so its scores are in callback_metrics. Every rank reads them:
        # under DDP, reading a metric logged with sync_dist reduces it across the processes, so a read on rank 0
        # alone would wait for the others forever.
        line = self.line(trainer, time.perf_counter() - self._started)
        if trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)

    def line(self, trainer: L.Trainer, seconds: float) -> str:
        metrics = trainer.callback_metrics
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"{self.label}: " * bool(self.label) + f"epoch {trainer.current_epoch + 1}{epochs}"]
        parts += [f"{k.removesuffix('_epoch')} {float(metrics[k]):.3f}" for k in SCORES if k in metrics]
        return "  ".join(parts + [f"({seconds:.1f} s)"])
