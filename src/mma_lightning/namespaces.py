"""The two import namespaces of Lightning: ``pytorch_lightning`` (this package's default) and
``lightning.pytorch`` (``pip install lightning``, the namespace of Lightning's current documentation).

They hold distinct copies of the same classes, so ``isinstance(module, pytorch_lightning.LightningModule)``
is False for a ``lightning.pytorch`` module. Code that must accept both asks :func:`lightning_types`
instead. Only namespaces already imported are looked at: an object of a namespace that was never imported
cannot exist, and no namespace gets imported as a side effect.
"""

from __future__ import annotations

import contextvars
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # For the type checker only: each namespace-free logic class (``MMAModuleLogic``, ...) is always combined
    # with a Lightning base class of one namespace, so it may use that base's API (``self.log``, ``self.trainer``).
    from typing import Any

    from pytorch_lightning import Callback as CallbackHost
    from pytorch_lightning import LightningDataModule as DataModuleHost
    from pytorch_lightning import LightningModule
    from pytorch_lightning.callbacks import ModelCheckpoint as ModelCheckpointHost

    class ModuleHost(LightningModule):
        hparams: Any  # an AttributeDict: the settings read as attributes
else:
    CallbackHost = DataModuleHost = ModuleHost = ModelCheckpointHost = object

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
"""The module paths of the two namespaces."""


def lightning_types(name: str) -> tuple[type, ...]:
    """The class ``name`` (a dotted path inside a namespace, e.g. ``"LightningModule"`` or
    ``"loggers.TensorBoardLogger"``) from every imported Lightning namespace, for ``isinstance``.

    The default namespace is always imported, so the tuple is never empty.
    """
    importlib.import_module(NAMESPACES[0])
    found = []
    for namespace in NAMESPACES:
        if namespace not in sys.modules:
            continue
        module_path, _, attr = f"{namespace}.{name}".rpartition(".")
        found.append(getattr(importlib.import_module(module_path), attr))
    return tuple(found)


PACKAGES = {"pytorch_lightning": "mma_lightning", "lightning.pytorch": "mma_lightning.lightning"}
"""The package of this library's classes for each namespace."""


def namespace_of(obj: object) -> str | None:
    """The Lightning namespace (one of :data:`NAMESPACES`) whose classes ``obj`` (a class, or an object of
    that class) derives from: a module, datamodule, callback or Trainer; ``None`` for neither."""
    for klass in (obj if isinstance(obj, type) else type(obj)).__mro__:
        for namespace in NAMESPACES:
            if klass.__module__ == namespace or klass.__module__.startswith(f"{namespace}."):
                return namespace
    return None


def check_trainer_namespace(obj: object, trainer: object) -> None:
    """``ValueError`` when ``obj`` (this library's module, datamodule or callback) and ``trainer`` (a Trainer or
    its class) are of different Lightning namespaces, naming the package of the Trainer's namespace (:data:`PACKAGES`).

    Each namespace's Trainer takes only its own classes; without this check the mismatch surfaces as
    Lightning's own ``TypeError`` or ``ValueError: Expected a parent``, which name neither package.
    """
    ours, theirs = namespace_of(obj), namespace_of(trainer)
    if ours is None or theirs is None or ours == theirs:
        return
    name = type(obj).__name__
    trainer_name = "lightning.Trainer" if theirs == "lightning.pytorch" else "pytorch_lightning.Trainer"
    raise ValueError(
        f"{name} is a {ours} class (from {PACKAGES[ours]}) and the Trainer is a {theirs} Trainer "
        f"({trainer_name}): a Trainer takes only the classes of its own namespace. With a {theirs} Trainer, "
        f"take the same classes from {PACKAGES[theirs]} (e.g. `from {PACKAGES[theirs]} import MMAModule`, "
        f"`{PACKAGES[theirs]}.data.{name if name.endswith('DataModule') else 'MNISTDataModule'}`); or keep "
        f"{PACKAGES[ours]} with a {ours} Trainer")


_HINTS = contextvars.ContextVar("mma_lightning_namespace_hints", default=True)


@contextmanager
def without_namespace_hint() -> Iterator[None]:
    """No :func:`other_namespace_hint` inside: for objects the library builds for a Trainer it builds itself
    (``mma-eval``'s method around a backbone), whose namespace the user never chose."""
    token = _HINTS.set(False)
    try:
        yield
    finally:
        _HINTS.reset(token)


def other_namespace_hint(obj: object) -> str | None:
    """A hint for ``obj``, a ``pytorch_lightning`` class of this library or a project's subclass of one (the class
    or an object of it), built or defined in a process that imported ``lightning.pytorch`` but not
    :mod:`mma_lightning.lightning` (a project on ``import lightning`` adopting ``mma_lightning.MMAModule``): a
    ``lightning.Trainer`` refuses it first thing in ``fit``, and LightningCLI before building it
    (``MisconfigurationException: Cannot add arguments from``), before any hook of the library runs, so no later
    check can name the fix. ``None`` otherwise (``pytorch_lightning`` is always imported here, so the reverse
    cannot be told), and inside :func:`without_namespace_hint`."""
    if (not _HINTS.get() or namespace_of(obj) != NAMESPACES[0] or NAMESPACES[1] not in sys.modules
            or PACKAGES[NAMESPACES[1]] in sys.modules):
        return None
    klass = obj if isinstance(obj, type) else type(obj)
    ours = next((k for k in klass.__mro__ if k.__module__.startswith("mma_lightning.")), klass)
    name, subject = ours.__name__, klass.__name__
    if klass is not ours:
        subject = f"{klass.__name__} derives from {ours.__name__}, which"
    return (f"{subject} is a pytorch_lightning class (from mma_lightning) and lightning.pytorch is imported: a "
            "lightning.Trainer refuses it (TypeError: `model` must be a `LightningModule`), and so does "
            "lightning.pytorch.cli.LightningCLI (MisconfigurationException: Cannot add arguments from ...). With "
            f"lightning.pytorch, use `from mma_lightning.lightning import {name}` (and mma_lightning.lightning.data, "
            "...); with a pytorch_lightning.Trainer, nothing to change")
