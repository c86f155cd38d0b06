"""VolumeClassifier: the training system around a net from leuko.nets."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from leuko.errors import ConfigError
from leuko.nets import build_net


def _metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            # Balanced accuracy is the mean per-class recall.
            "balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
        }
    )


class VolumeClassifier(L.LightningModule):
    def __init__(
        self,
        net: str = "fishnet3d_tiny",
        net_kwargs: dict | None = None,
        in_channels: int = 1,
        num_classes: int = 4,
        class_names: list[str] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        optimizer: Literal["adamw", "adam"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        scheduler: Literal["cosine", "multistep"] = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        class_weights: Literal["none", "balanced"] | list[float] = "none",
        channels_last: bool = False,
        compile: bool = False,
        mixup: float = 0.0,
    ):
        """
        Args:
            net: a name from leuko.nets.NETS; net_kwargs go to its constructor.
            in_channels, num_classes, class_names, input_shape: taken from the prepared data by the CLI;
                the net decides what it takes from input_shape (a ViT's img_size, unless net_kwargs gives one).
            optimizer: AdamW, or Adam as the RI study used (weight decay then is L2, not decoupled).
            warmup_epochs: linear warm-up (fractions allowed), then cosine decay to lr * min_lr_ratio.
            scheduler: "cosine" as above, or "multistep": lr times gamma at each milestone (fractions of the
                training, e.g. (0.5, 0.75): the MedMNIST protocol's x0.1 at 50% and 75% of the epochs).
            class_weights: "balanced" weighs the loss by inverse training-class frequency.
            channels_last: channels_last_3d memory format (faster convolutions on recent GPUs).
            compile: torch.compile the net.
            mixup: alpha of mixup (Zhang et al. 2018): each training batch becomes lam * x + (1 - lam) * x[perm]
                with lam ~ Beta(alpha, alpha), and the loss the same mix of both labels' losses; 0 is off.
        """
        super().__init__()
        self.save_hyperparameters()
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"class_names has {len(self.class_names)} names but num_classes is {num_classes}")
        if mixup < 0:
            raise ConfigError(f"mixup={mixup}: give the alpha of its Beta distribution, e.g. 0.2, or 0 for none")
        if not all(0 < m < 1 for m in milestones):
            raise ConfigError(
                f"milestones {tuple(milestones)} must be fractions of the training in (0, 1), e.g. [0.5, 0.75]"
            )
        self.net = build_net(
            net, in_channels=in_channels, num_classes=num_classes, input_shape=input_shape, **(net_kwargs or {})
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        # Kept out of the module tree (object.__setattr__), so checkpoints hold the weights once, under
        # net.*, and load whether or not the loading side compiles.
        object.__setattr__(self, "_compiled_net", torch.compile(self.net) if compile else None)
        if isinstance(class_weights, list) and len(class_weights) != num_classes:
            raise ConfigError(f"class_weights has {len(class_weights)} values but there are {num_classes} classes")
        self.register_buffer("loss_weights", torch.ones(num_classes), persistent=False)
        self.train_metrics = _metrics(num_classes).clone(prefix="train/")
        self.val_metrics = _metrics(num_classes).clone(prefix="val/")
        self.test_metrics = _metrics(num_classes).clone(prefix="test/")
        self.val_recall = MulticlassRecall(num_classes, average=None)
        self.test_recall = MulticlassRecall(num_classes, average=None)
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # Filled at the end of each validation/test epoch for plots and reports.
        self.last_confusion: dict[str, torch.Tensor] = {}
        # (probs, labels) of this epoch's training batches, for the train metrics at epoch end
        self._train_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        net = self._compiled_net if self._compiled_net is not None else self.net
        return net(x)  # (B, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)  # (B, num_features)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if getattr(datamodule, "in_channels", self.hparams.in_channels) != self.hparams.in_channels:
            raise ConfigError(
                f"net {self.hparams.net!r} was built for in_channels={self.hparams.in_channels} but the prepared "
                f"data in {datamodule.prepared_dir} has {datamodule.in_channels} channel(s); drop model.in_channels "
                f"from the config (the CLI takes it from the data) or prepare data of the matching modality"
            )
        if stage == "fit" and self.hparams.class_weights != "none":
            self.loss_weights = self._class_weights(datamodule).to(self.device)

    def _class_weights(self, datamodule) -> torch.Tensor:
        if isinstance(self.hparams.class_weights, list):
            return torch.tensor(self.hparams.class_weights, dtype=torch.float32)
        counts = torch.as_tensor(datamodule.class_counts("train"), dtype=torch.float32).clamp(min=1)
        return counts.sum() / (len(counts) * counts)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), labels, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, labels = batch["volume"], batch["label"]
        if self.hparams.mixup > 0:
            alpha = torch.tensor(float(self.hparams.mixup))
            lam = float(torch.distributions.Beta(alpha, alpha).sample())  # torch's generator: seeded like the rest
            perm = torch.randperm(len(x), device=x.device)
            logits = self(lam * x + (1 - lam) * x[perm])
            loss = lam * self._loss(logits, labels) + (1 - lam) * self._loss(logits, labels[perm])
            labels = labels if lam >= 0.5 else labels[perm]  # the train metrics: each volume's larger share
        else:
            logits = self(x)
            loss = self._loss(logits, labels)
        # Kept on the device and fed to the metrics at epoch end: torchmetrics' update runs torch.unique and
        # torch.bincount, each of which waits for the GPU, so updating here would stall every step.
        self._train_outputs.append((logits.detach().float().softmax(-1), labels))
        # Logged as tensors: Lightning reduces them at epoch end, no host sync per step.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(logits), sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._train_outputs:
            probs, labels = (torch.cat(parts) for parts in zip(*self._train_outputs))
            self._train_outputs.clear()
            self.train_metrics.update(probs, labels)
        self.log_dict(self.train_metrics.compute(), sync_dist=False)
        self.train_metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["volume"])
        probs = logits.float().softmax(-1)
        self.log(
            f"{stage}/loss", self._loss(logits, batch["label"]), on_epoch=True, batch_size=len(logits), sync_dist=True
        )
        getattr(self, f"{stage}_metrics").update(probs, batch["label"])
        getattr(self, f"{stage}_recall").update(probs, batch["label"])
        getattr(self, f"{stage}_confusion").update(probs, batch["label"])

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        recall = getattr(self, f"{stage}_recall")
        confusion = getattr(self, f"{stage}_confusion")
        # The sanity check's couple of batches are scored nowhere: a class missing from them would only warn
        # that its AUROC is undefined.
        if self._trainer is None or not self.trainer.sanity_checking:
            # torchmetrics syncs its states across DDP processes in compute().
            self.log_dict(metrics.compute())
            per_class = recall.compute()
            self.log_dict({f"{stage}/recall_{name}": per_class[i] for i, name in enumerate(self.class_names)})
            self.last_confusion[stage] = confusion.compute().cpu()
        for metric in (metrics, recall, confusion):
            metric.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(batch["volume"])
        probs = logits.float().softmax(-1)
        return {"cell_id": batch["cell_id"], "probs": probs.cpu(), "pred": probs.argmax(-1).cpu()}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_cls(parameter_groups(self.net, hp.weight_decay), lr=hp.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = min(int(round(hp.warmup_epochs * total / epochs)), total - 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if hp.scheduler == "multistep":
                return hp.gamma ** sum(step >= round(m * total) for m in hp.milestones)
            progress = (step - warmup) / max(total - warmup, 1)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parameter_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, undecayed] optimizer groups over the trainable parameters of net.

    Biases and norm weights (1-D) and what the net names in no_weight_decay() (e.g. a ViT's position
    embedding and cls token) are not decayed: standard for AdamW on ViTs and CNNs alike.
    """
    skip = net.no_weight_decay()
    decay, no_decay = [], []
    for name, param in net.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
