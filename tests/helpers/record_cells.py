"""A callback that records which cells each DDP rank trained on."""

from pathlib import Path

import lightning as L


class RecordCells(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"epoch{trainer.current_epoch}_rank{trainer.global_rank}.txt"
        with path.open("a") as f:
            f.write("\n".join(batch["cell_id"]) + "\n")
