"""A datamodule over in-memory tensors, for tests and notebooks."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from mma_lightning.data.indexed import IndexedDataModule, IndexedDataModuleLogic, seeded_split


def _check_pair(x: Tensor | None, y: Tensor | None, x_name: str, y_name: str) -> None:
    if (x is None) != (y is None):
        raise ValueError(f"pass both {x_name} and {y_name} or neither (got only one of them)")
    if x is not None and y is not None and len(x) != len(y):
        raise ValueError(
            f"{x_name} and {y_name} must have the same length (first dimension), got {len(x)} and {len(y)}"
        )


class TensorDataModuleLogic(IndexedDataModuleLogic):
    """Train / val / test splits from tensors; loaders yield ``(x, y, index)``.

    ``x`` should be float in [0, 1]; ``y`` is cast to int64. Without ``x_val``, ``val_size > 0`` carves a
    seeded validation split out of the training tensors. ``batch_size`` is the global batch size.
    """

    def __init__(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        val_size: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        _check_pair(x_train, y_train, "x_train", "y_train")
        _check_pair(x_val, y_val, "x_val", "y_val")
        _check_pair(x_test, y_test, "x_test", "y_test")
        if x_val is not None and val_size:
            raise ValueError(f"pass either x_val/y_val or val_size > 0, not both (got val_size={val_size})")
        labels = [y for y in (y_train, y_val, y_test) if y is not None]
        self._num_classes = int(max(int(y.max()) for y in labels if len(y)) + 1)
        if x_val is None and val_size:
            train_idx, val_idx = seeded_split(len(x_train), val_size, seed)
            x_val, y_val = x_train[val_idx], y_train[val_idx]
            x_train, y_train = x_train[train_idx], y_train[train_idx]
        self.val_size = val_size
        self._datasets = (
            TensorDataset(x_train, y_train.long()),
            None if x_val is None else TensorDataset(x_val, y_val.long()),  # type: ignore[union-attr]
            None if x_test is None else TensorDataset(x_test, y_test.long()),  # type: ignore[union-attr]
        )

    def build_datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """The splits, built in ``__init__``."""
        assert self._datasets is not None
        return self._datasets

    @property
    def num_classes(self) -> int:
        """Number of classes: ``1 + max label`` over all given label tensors."""
        return self._num_classes


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class TensorDataModule(TensorDataModuleLogic, IndexedDataModule):
    """:class:`TensorDataModuleLogic` on pytorch_lightning (the default namespace)."""
