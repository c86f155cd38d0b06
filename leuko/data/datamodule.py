"""LeukoDataModule: one fold of a prepared cohort, with augmentation batched on the device."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from leuko.data.augment import BatchAugment
from leuko.data.folds import TEST, SplitError, fold_masks, fold_names, make_splits, read_splits
from leuko.data.prepared import VOLUMES, load_prepared


@dataclass
class Augmentation:
    """Strengths of the training-time augmentation; 0 turns an operation off."""

    elastic: float = 0.0  # max displacement, voxels
    elastic_grid: int = 4
    noise: float = 0.0  # Gaussian noise std, in normalised units
    crop: float = 0.0  # max fraction of each side cropped away, then resized back
    flip: float = 0.0  # probability per axis
    rot90: float = 0.0  # probability
    rotate: float = 0.0  # max angle of a free rotation about a random axis, degrees
    gain: float = 0.0  # max relative intensity change


class MemmapVolumes(Dataset):
    """Cells as rows of the prepared memmap; a worker only slices it."""

    def __init__(self, volumes_path: Path, rows: np.ndarray, labels: np.ndarray, cell_ids: list[str]):
        self.volumes_path = volumes_path
        self.rows = rows
        self.labels = labels
        self.cell_ids = cell_ids
        self._volumes: np.ndarray | None = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self._volumes is None:
            self._volumes = np.load(self.volumes_path, mmap_mode="r")
        volume = torch.from_numpy(np.array(self._volumes[self.rows[i]]))  # (C, D, H, W)
        return {"volume": volume, "label": int(self.labels[i]), "cell_id": self.cell_ids[i]}


class EpochSampler(Sampler[int]):
    """Shuffles (or draws class-balanced, with replacement) from a generator seeded by (seed, epoch).

    Lightning calls set_epoch before each epoch, so a fit resumed from last.ckpt sees the same order
    an uninterrupted fit would have; a sampler on the global RNG could not promise that.
    """

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None):
        self.n = n
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        return iter(order.tolist())


class LeukoDataModule(L.LightningDataModule):
    def __init__(
        self,
        prepared_dir: str = "prepared",
        splits: str | None = None,
        fold: int | None = 0,
        k: int = 5,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 2,
        balanced_sampling: bool = False,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        augment: Augmentation = Augmentation(),  # noqa: B008 (LightningCLI reads the default; it is only read)
        pin_memory: bool = True,
    ):
        """
        Args:
            prepared_dir: output of `leuko prepare`.
            splits: a CSV from `leuko folds`; when None, folds are made from the prepared index with k,
                test_fraction and seed (the same split `leuko folds` would write).
            fold: which fold validates; the others (never the test patients) train. None trains on every
                non-test cell with no validation set (the refit before registering a model).
            balanced_sampling: draw training cells with probability inversely proportional to class size.
            predict_split: which cells `predict` runs on.
        """
        super().__init__()
        self.save_hyperparameters()
        self.prepared_dir = Path(prepared_dir)
        _, self.index, self.meta = load_prepared(self.prepared_dir)
        self.volumes_path = self.prepared_dir / VOLUMES
        self._augment_generators: dict[torch.device, torch.Generator] = {}
        self.classes: list[str] = list(self.meta["classes"])
        self.augment = BatchAugment(**asdict(augment)) if isinstance(augment, Augmentation) else BatchAugment(**augment)
        self.splits = self._load_splits()
        if fold is None:
            is_test = (self.splits["fold"] == TEST).to_numpy()
            self.masks = {"train": ~is_test, "val": np.zeros_like(is_test), "test": is_test}
        else:
            self.masks = fold_masks(self.splits, fold)

    @property
    def fold_names(self) -> list[str]:
        return fold_names(self.splits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    def _load_splits(self) -> pd.DataFrame:
        hp = self.hparams
        if hp.splits is None:
            splits = make_splits(self.index, k=hp.k, test_fraction=hp.test_fraction, seed=hp.seed)
        else:
            splits = read_splits(hp.splits)
        by_id = splits.set_index("cell_id")["fold"]
        unknown = sorted(set(self.index["cell_id"]) - set(by_id.index))
        if unknown:
            raise SplitError(
                f"splits {hp.splits} do not cover {len(unknown)} prepared cell(s) (e.g. {unknown[:3]}); "
                f"remake them from the same manifest with `leuko folds`"
            )
        # Re-order the splits to the prepared index so masks line up with memmap rows.
        return pd.DataFrame({"cell_id": self.index["cell_id"], "fold": by_id.loc[self.index["cell_id"]].to_numpy()})

    def subset(self, name: str) -> pd.DataFrame:
        """The prepared-index rows of one subset: train, val, test or all."""
        if name == "all":
            return self.index
        return self.index[self.masks[name]]

    def _dataset(self, name: str) -> MemmapVolumes:
        rows = self.subset(name)
        if len(rows) == 0:
            raise SplitError(
                f"fold {self.hparams.fold} has no {name} cells in {self.prepared_dir}; "
                f"check the splits (`leuko folds` prints cells per fold) or choose another fold"
            )
        return MemmapVolumes(
            self.volumes_path,
            rows["row"].to_numpy(),
            rows["label_index"].to_numpy(),
            rows["cell_id"].astype(str).tolist(),
        )

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.train_set = self._dataset("train") if stage == "fit" else None
            self.val_set = None if self.hparams.fold is None else self._dataset("val")
        elif stage == "test":
            self.test_set = self._dataset("test")
        elif stage == "predict":
            self.predict_set = self._dataset(self.hparams.predict_split)

    def _loader(self, dataset: MemmapVolumes, *, sampler: Sampler | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        weights = None
        if self.hparams.balanced_sampling:
            labels = torch.tensor(self.train_set.labels, dtype=torch.long)
            counts = torch.bincount(labels, minlength=self.num_classes).clamp(min=1)
            weights = (1.0 / counts.double())[labels]
        # Under DDP, Lightning swaps this for a DistributedSampler (use_distributed_sampler).
        return self._loader(self.train_set, sampler=EpochSampler(len(self.train_set), self.hparams.seed, weights))

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Augment on whatever device the batch now lives on, and only while training.
        if self.trainer is not None and self.trainer.training:
            volume = batch["volume"]
            batch["volume"] = self.augment(volume, generator=self._augment_generator(volume.device))
        return batch

    def _augment_generator(self, device: torch.device) -> torch.Generator:
        # Seeded by (seed, epoch, batch, rank): a resumed fit augments exactly as an uninterrupted one,
        # and DDP ranks draw independently. Seeding a generator costs no host-device sync.
        trainer = self.trainer
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        seed = (
            (self.hparams.seed * 1_000_003 + trainer.current_epoch) * 1_000_003 + batch
        ) * 1_009 + trainer.global_rank
        if device not in self._augment_generators:
            self._augment_generators[device] = torch.Generator(device=device)
        return self._augment_generators[device].manual_seed(seed % (2**63))

    def class_counts(self, name: str = "train") -> np.ndarray:
        labels = self.subset(name)["label_index"].to_numpy()
        return np.bincount(labels, minlength=self.num_classes)
