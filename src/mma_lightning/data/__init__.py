"""Data for MMA training: datamodules whose loaders yield ``(x, y, index)``.

``x`` is float in [0, 1] (normalisation lives in the model), ``y`` int64, ``index`` int64 = position of the
sample in its split (train: ``0 .. num_train_samples - 1``), which keys MMA's per-sample eps table. :func:`with_index` adapts any ``(x, y)`` LightningDataModule.
"""

from mma_lightning.data.indexed import (
    IndexedDataModule,
    IndexedDataset,
    check_positive,
    per_device_batch_size,
    seeded_split,
)
from mma_lightning.data.offline import load_mnist5k, mnist5k_datamodule, mnist5k_path
from mma_lightning.data.tensors import TensorDataModule
from mma_lightning.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    IDXFolderDataset,
    ImageFolderDataModule,
    MNISTDataModule,
    SVHNDataModule,
    VisionDataModule,
    read_idx,
)
from mma_lightning.data.with_index import WithIndexDataModule, with_index

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "IDXFolderDataset",
    "ImageFolderDataModule",
    "IndexedDataModule",
    "IndexedDataset",
    "MNISTDataModule",
    "SVHNDataModule",
    "TensorDataModule",
    "VisionDataModule",
    "WithIndexDataModule",
    "check_positive",
    "load_mnist5k",
    "mnist5k_datamodule",
    "mnist5k_path",
    "per_device_batch_size",
    "read_idx",
    "seeded_split",
    "with_index",
]
