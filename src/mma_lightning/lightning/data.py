"""The datamodules of :mod:`mma_lightning.data` as ``lightning.pytorch`` LightningDataModules.

The namespace-free names (datasets, helpers, the offline MNIST loader) are re-exported unchanged;
:func:`mnist5k_datamodule` returns this namespace's :class:`TensorDataModule`; :func:`with_index` returns a
:class:`WithIndexDataModule` of the namespace of the datamodule it wraps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L

from mma_lightning.data import *
from mma_lightning.data import __all__ as _default_all
from mma_lightning.data import offline
from mma_lightning.data.indexed import IndexedDataModuleLogic
from mma_lightning.data.tensors import TensorDataModuleLogic
from mma_lightning.data.vision import (
    CIFAR10DataModuleLogic,
    CIFAR100DataModuleLogic,
    FashionMNISTDataModuleLogic,
    ImageFolderDataModuleLogic,
    MNISTDataModuleLogic,
    SVHNDataModuleLogic,
    VisionDataModuleLogic,
)
from mma_lightning.data.with_index import WithIndexDataModuleLogic

__all__ = list(_default_all)


class IndexedDataModule(IndexedDataModuleLogic, L.LightningDataModule):
    """:class:`~mma_lightning.data.indexed.IndexedDataModuleLogic` on ``lightning.pytorch``."""


class TensorDataModule(TensorDataModuleLogic, IndexedDataModule):
    """:class:`~mma_lightning.data.tensors.TensorDataModuleLogic` on ``lightning.pytorch``."""


class VisionDataModule(VisionDataModuleLogic, IndexedDataModule):
    """:class:`~mma_lightning.data.vision.VisionDataModuleLogic` on ``lightning.pytorch``."""


class MNISTDataModule(MNISTDataModuleLogic, VisionDataModule):
    """:class:`~mma_lightning.data.vision.MNISTDataModuleLogic` on ``lightning.pytorch``."""


class FashionMNISTDataModule(FashionMNISTDataModuleLogic, MNISTDataModule):
    """:class:`~mma_lightning.data.vision.FashionMNISTDataModuleLogic` on ``lightning.pytorch``."""


class CIFAR10DataModule(CIFAR10DataModuleLogic, VisionDataModule):
    """:class:`~mma_lightning.data.vision.CIFAR10DataModuleLogic` on ``lightning.pytorch``."""


class CIFAR100DataModule(CIFAR100DataModuleLogic, CIFAR10DataModule):
    """:class:`~mma_lightning.data.vision.CIFAR100DataModuleLogic` on ``lightning.pytorch``."""


class SVHNDataModule(SVHNDataModuleLogic, VisionDataModule):
    """:class:`~mma_lightning.data.vision.SVHNDataModuleLogic` on ``lightning.pytorch``."""


class ImageFolderDataModule(ImageFolderDataModuleLogic, VisionDataModule):
    """:class:`~mma_lightning.data.vision.ImageFolderDataModuleLogic` on ``lightning.pytorch``."""


class WithIndexDataModule(WithIndexDataModuleLogic, L.LightningDataModule):
    """:class:`~mma_lightning.data.with_index.WithIndexDataModuleLogic` on ``lightning.pytorch`` (what
    :func:`~mma_lightning.data.with_index.with_index` returns for a ``lightning.pytorch`` datamodule).

    ``datamodule`` is typed as this namespace's LightningDataModule, so LightningCLI builds it from a class path
    and its own arguments (``--data.datamodule=my_project.MyDataModule --data.datamodule.batch_size=64``).
    """

    def __init__(self, datamodule: L.LightningDataModule, seed: int = 0) -> None:
        super().__init__(datamodule, seed=seed)


def mnist5k_datamodule(val_size: int = 1000, batch_size: int = 50, seed: int = 0,
                       **kwargs: Any) -> TensorDataModule:
    """:func:`mma_lightning.data.mnist5k_datamodule` with this namespace's :class:`TensorDataModule`."""
    module = offline.mnist5k_datamodule(val_size, batch_size, seed, datamodule_class=TensorDataModule, **kwargs)
    assert isinstance(module, TensorDataModule)
    return module
