"""Batches that carry sample indices: ``(x, y, index)``.

MMA remembers a per-sample eps between epochs, keyed by the sample's position in the training set, so every
loader of this package yields ``(x, y, index)``: ``x`` float in [0, 1] (normalisation lives in the model),
``y`` int64, ``index`` int64 = position of the sample in that split's dataset.

:class:`IndexedDataset` adds the index to any map-style dataset; :class:`IndexedDataModule` is the shared
base of the package's datamodules: seeded validation split, global batch size divided over the devices, and
loaders over :class:`IndexedDataset` (train: shuffled, ``drop_last=True`` so per-rank batches are equal
under DDP).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mma_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from mma_lightning.namespaces import DataModuleHost, check_trainer_namespace


class IndexedDataset(Dataset):
    """Wrap a map-style dataset of ``(x, y)`` pairs so that item ``i`` is ``(x, y, i)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[index]
        return x, y, index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"


def seeded_split(num_samples: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(num_samples)`` at random (reproducibly for a given ``seed``) into train and val indices.

    Returns ``(train_indices, val_indices)`` with ``len(val_indices) == val_size``.
    """
    if not 0 <= val_size < num_samples:
        raise ValueError(
            f"val_size must satisfy 0 <= val_size < {num_samples} (the training set size), got {val_size}"
        )
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def per_device_batch_size(global_batch_size: int, world_size: int, name: str = "batch_size") -> int:
    """The per-device share of a global batch size; ``ValueError`` when it does not divide evenly."""
    if global_batch_size % world_size:
        raise ValueError(
            f"{name}={global_batch_size} is the global batch size and must be divisible by the trainer's "
            f"world size ({world_size} devices); choose a multiple of {world_size}"
        )
    return global_batch_size // world_size


def check_positive(name: str, value: int | None, optional: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a positive int (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class IndexedDataModuleLogic(DataModuleHost):
    """Base datamodule whose loaders yield ``(x, y, index)``.

    Subclasses implement :meth:`build_datasets`, returning the plain ``(x, y)`` train / val / test datasets
    (val and test may be ``None``); they are built once, on first use. ``batch_size`` and
    ``eval_batch_size`` are GLOBAL batch sizes: :meth:`setup` divides them by the trainer's world size.
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("eval_batch_size", eval_batch_size, optional=True)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.world_size = 1
        self.rank = 0
        self.per_device_batch_size = self.batch_size
        self.per_device_eval_batch_size = self.eval_batch_size
        self._datasets: tuple[Dataset, Dataset | None, Dataset | None] | None = None

    @property  # type: ignore[override]
    def trainer(self) -> Any:
        """The Trainer this datamodule is attached to (Lightning sets it); a Trainer of the other Lightning
        namespace is refused with a message naming this library's package for it
        (:func:`~mma_lightning.namespaces.check_trainer_namespace`)."""
        return self.__dict__.get("_attached_trainer")

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        if trainer is not None:
            check_trainer_namespace(self, trainer)
        self.__dict__["_attached_trainer"] = trainer

    def build_datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """The ``(x, y)`` train, val and test datasets (val / test ``None`` when absent)."""
        raise NotImplementedError

    def _get_datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        if self._datasets is None:
            self._datasets = self.build_datasets()
        return self._datasets

    @property
    def train_set(self) -> Dataset:
        """The training split (after the validation split was carved out), yielding ``(x, y)``."""
        return self._get_datasets()[0]

    @property
    def val_set(self) -> Dataset | None:
        """The validation split, or ``None``."""
        return self._get_datasets()[1]

    @property
    def test_set(self) -> Dataset | None:
        """The test split, or ``None``."""
        return self._get_datasets()[2]

    @property
    def num_train_samples(self) -> int:
        """Size of the training split: train indices are ``0 .. num_train_samples - 1``."""
        return len(self.train_set)  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        """Divide the global batch sizes by the trainer's world size (if attached) and build the splits."""
        self.world_size = int(self.trainer.world_size) if self.trainer is not None else 1
        self.rank = int(getattr(self.trainer, "global_rank", 0)) if self.trainer is not None else 0
        self.per_device_batch_size = per_device_batch_size(self.batch_size, self.world_size, "batch_size")
        self.per_device_eval_batch_size = per_device_batch_size(
            self.eval_batch_size, self.world_size, "eval_batch_size"
        )
        self._get_datasets()

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        per_rank = len(dataset) // self.world_size  # type: ignore[arg-type]
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            drop_last=train and per_rank >= batch_size,  # never drop the only batch
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if not train:
            return DataLoader(IndexedDataset(dataset), shuffle=False, **kwargs)
        # The loader's own generator seeds its worker processes: creating an iterator does not draw from the
        # global torch stream (dropout, augmentation), which a checkpoint restores (exact resume).
        generator = torch.Generator().manual_seed(self.seed)
        sampler = ResumableSampler(IndexedDataset(dataset), num_replicas=self.world_size, rank=self.rank,
                                   shuffle=True, seed=self.seed)
        return ResumableDataLoader(IndexedDataset(dataset), sampler=sampler, generator=generator, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``(x, y, index)`` batches of the training split, ``drop_last=True``; a
        :class:`~mma_lightning.data.resumable.ResumableDataLoader` (order seeded by ``seed + epoch`` as
        ``DistributedSampler``, this rank's share under DDP), so a mid-epoch checkpoint resumes exactly."""
        return self._loader(self.train_set, self.per_device_batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """``(x, y, index)`` batches of the validation split in order (``[]`` when there is none)."""
        val = self.val_set
        return [] if val is None else self._loader(val, self.per_device_eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader | list:
        """``(x, y, index)`` batches of the test split in order (``[]`` when there is none)."""
        test = self.test_set
        return [] if test is None else self._loader(test, self.per_device_eval_batch_size, train=False)


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class IndexedDataModule(IndexedDataModuleLogic, pl.LightningDataModule):
    """:class:`IndexedDataModuleLogic` on pytorch_lightning (the default namespace)."""
