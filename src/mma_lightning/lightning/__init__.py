"""mma-lightning for the ``lightning.pytorch`` namespace (``pip install "mma-lightning[lightning]"``).

``pytorch_lightning`` and ``lightning.pytorch`` hold distinct copies of Lightning's classes, and a
``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning`` module. This package offers every module,
datamodule and callback of :mod:`mma_lightning` on ``lightning.pytorch``'s base classes under the same names
(``mma_lightning.lightning.MMAModule``, ``mma_lightning.lightning.data.MNISTDataModule``,
``mma_lightning.lightning.evaluation.RobustnessCallback``, ...). The classes are the same namespace-free logic
classes (``MMAModuleLogic``, ...) as the default ones, combined with the other namespace's base classes: no
code is copied, and everything namespace-free (attacks, models, evaluation functions) is re-exported as is.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> from mma_lightning.lightning import MMAModule  # doctest: +SKIP
    >>> L.Trainer(max_steps=10).fit(MMAModule(net, max_eps=0.45), datamodule)  # doctest: +SKIP
"""

try:
    import lightning.pytorch  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("mma_lightning.lightning needs the `lightning` package: "
                      "pip install \"mma-lightning[lightning]\" (or pip install lightning)") from err

import mma_lightning as _default
from mma_lightning import *

# Re-exported: __all__ is the default package's, which names these too.
from mma_lightning.lightning import callbacks, checkpoint, data, evaluation, methods, packing  # noqa: F401
from mma_lightning.lightning.methods import (  # noqa: F401
    AdversarialModule,
    MMAModule,
    PGDATModule,
    PGDLSModule,
    StandardModule,
    TRADESModule,
)

__all__ = list(_default.__all__)
