"""The data of a pack (:mod:`mma_lightning.packing.module`): each run's own datamodule, side by side.

Each run of a pack keeps the data of a separate run: its own datamodule, so its own seed (its validation split
and its training order), loaders and settings. The training loader is the list of the runs' loaders, which
Lightning iterates together (a ``CombinedLoader``: one batch of every run per step) and whose positions it saves in
every checkpoint (each is a :class:`~mma_lightning.data.resumable.ResumableDataLoader`, so a pack resumes
mid-epoch exactly); validation and test take the runs' loaders one after another (dataloader ``i`` is run
``i``'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from mma_lightning.namespaces import DataModuleHost


class PackedDataModuleLogic(DataModuleHost):
    """The runs' datamodules of a pack (one per run, in run order; all with the same training-set size and
    batch size, so every step has one batch of each run)."""

    def __init__(self, datamodules: Sequence[Any]) -> None:
        super().__init__()
        if not datamodules:
            raise ValueError("datamodules must hold one datamodule per run of the pack, got none")
        self.datamodules = list(datamodules)

    def prepare_data(self) -> None:
        """Each run's ``prepare_data``."""
        for dm in self.datamodules:
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Each run's ``setup`` (attached to this trainer), then a check that every run has the same training
        set size and batch size."""
        for dm in self.datamodules:
            dm.trainer = self.trainer
            dm.setup(stage)
        if stage in (None, "fit"):
            sizes = [(getattr(dm, "num_train_samples", None), getattr(dm, "batch_size", None))
                     for dm in self.datamodules]
            if len(set(sizes)) > 1:
                raise ValueError("the runs of a pack must have the same training-set size and batch size "
                                 f"(num_train_samples, batch_size) so that they step together, got {sizes}")

    @property
    def num_train_samples(self) -> int:
        """The runs' training-set size (the same in every run)."""
        return int(self.datamodules[0].num_train_samples)

    @property
    def image_shape(self) -> Any:
        """The runs' image shape (the first's: the runs share one architecture)."""
        return getattr(self.datamodules[0], "image_shape", None)

    @property
    def num_classes(self) -> Any:
        """The runs' number of classes (the first's)."""
        return getattr(self.datamodules[0], "num_classes", None)

    def train_dataloader(self) -> list[Any]:
        """The runs' training loaders, iterated together (one batch of each per step)."""
        return [dm.train_dataloader() for dm in self.datamodules]

    def val_dataloader(self) -> list[Any]:
        """The runs' validation loaders, one after another (none when a run has none)."""
        return _loaders(dm.val_dataloader() for dm in self.datamodules)

    def test_dataloader(self) -> list[Any]:
        """The runs' test loaders, one after another."""
        return _loaders(dm.test_dataloader() for dm in self.datamodules)

    def state_dict(self) -> dict[str, Any]:
        """Every run's datamodule state."""
        return {str(i): dm.state_dict() for i, dm in enumerate(self.datamodules)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every run's datamodule state."""
        for i, dm in enumerate(self.datamodules):
            dm.load_state_dict(state_dict.get(str(i), {}))


def _loaders(loaders: Any) -> list[Any]:
    """One loader per run, or none at all when any run has none (dataloader ``i`` must stay run ``i``'s)."""
    loaders = list(loaders)
    return [] if any(isinstance(loader, list) and not loader for loader in loaders) else loaders


# The pytorch_lightning class (mma_lightning.lightning.packing has it on lightning.pytorch's).
class PackedDataModule(PackedDataModuleLogic, pl.LightningDataModule):
    """:class:`PackedDataModuleLogic` on pytorch_lightning (the default namespace)."""
