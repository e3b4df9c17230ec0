"""Adopt an existing ``(x, y)`` LightningDataModule for MMA: :func:`with_index`.

MMA keys its per-sample eps table by the sample's position in the training set (Ding et al., ICLR 2020,
Algorithm 1: each sample's eps is remembered between epochs), so its training batches must be
``(x, y, index)``. A datamodule written for plain classification (the lightning-hydra-template's, say) yields
``(x, y)``. :func:`with_index` wraps it without touching its code: its ``prepare_data`` / ``setup`` /
``teardown`` / ``state_dict`` run as they are, its validation and test loaders pass through unchanged, and
its training loader is rebuilt over the same dataset with the same settings (batch size, ``drop_last``,
workers, pinning, collate function, ...) as a :class:`~mma_lightning.data.resumable.ResumableDataLoader`
whose batches carry the index, so a mid-epoch checkpoint resumes exactly.
"""

from __future__ import annotations

import inspect
import sys
import typing
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from mma_lightning.data.indexed import IndexedDataModuleLogic, IndexedDataset
from mma_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from mma_lightning.namespaces import DataModuleHost, lightning_types

# DataLoader settings copied from the wrapped training loader (batch_size, drop_last, sampler handled apart).
_LOADER_SETTINGS = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                    "persistent_workers", "pin_memory_device", "in_order")
# Loaders of the wrapped module passed through as they are (when it defines them).
_PASSED_LOADERS = ("val_dataloader", "test_dataloader", "predict_dataloader")
# Hooks of LightningDataModule that move batches: run the wrapped module's own on (x, y), the index kept aside.
_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


class _CollateWithIndex:
    """The wrapped loader's collate function on the ``(x, y)`` samples, the indices appended as int64."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[tuple[Any, Any, int]]) -> tuple[Any, Any, Tensor]:
        batch = self.collate_fn([(x, y) for x, y, _ in samples])
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("with_index needs a training loader whose batches are (x, y), got "
                             f"{type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__")
                                                          else ""))
        return batch[0], batch[1], torch.tensor([index for _, _, index in samples], dtype=torch.int64)


def _sampler_order(loader: DataLoader) -> tuple[bool, int | None, bool]:
    """``(shuffle, seed or None, sampler drop_last)`` of the wrapped loader's sampler; ``ValueError`` for an order
    that a resumable loader cannot reproduce (a weighted or custom sampler, a custom batch sampler)."""
    batch_sampler = loader.batch_sampler
    if loader.batch_size is None or type(batch_sampler) is not BatchSampler:
        raise ValueError("with_index needs a training loader with a batch_size and torch's own batching, got "
                         f"batch_sampler={type(batch_sampler).__name__}: the resumable loader cannot reproduce a "
                         "custom batch sampler")
    sampler, dataset = loader.sampler, loader.dataset
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle), int(sampler.seed), bool(sampler.drop_last)
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(dataset):  # type: ignore[arg-type]
        return True, None, False
    if type(sampler) is SequentialSampler:
        return False, None, False
    raise ValueError("with_index supports training loaders with shuffle=True or False (or a DistributedSampler), "
                     f"got sampler={type(sampler).__name__}: the resumable loader cannot reproduce its order")


class WithIndexDataModuleLogic(DataModuleHost):
    """A LightningDataModule around ``datamodule`` whose training batches are ``(x, y, index)``.

    Lightning's calls go to the wrapped module (``prepare_data``, ``setup`` with the trainer attached,
    ``teardown``, ``state_dict`` / ``load_state_dict``, the batch-transfer hooks on ``(x, y)``), so do attribute
    reads the wrapper does not have (``num_classes``, ...). ``val_dataloader`` / ``test_dataloader`` /
    ``predict_dataloader`` are the wrapped module's (absent when it has none). ``seed`` orders the shuffled training epochs (``seed + epoch``,
    as ``DistributedSampler``) unless the wrapped loader's sampler is a ``DistributedSampler`` with its own seed.
    """

    def __init__(self, datamodule: Any, seed: int = 0) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.datamodule = datamodule
        self.seed = seed
        self.prepare_data_per_node = getattr(datamodule, "prepare_data_per_node", True)
        self._train_dataset: Dataset | None = None
        # The wrapped module's own loaders and hooks only, so that Lightning sees what it defines (no validation
        # loop for a datamodule without a validation loader).
        for loader in _PASSED_LOADERS:
            if _overrides(datamodule, loader):
                setattr(self, loader, getattr(datamodule, loader))
        for hook in _BATCH_HOOKS:
            if _overrides(datamodule, hook):
                setattr(self, hook, _pair_hook(getattr(datamodule, hook)))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks; never for private ones (pickling, copy, half-built objects).
        if name.startswith("_") or name == "datamodule":
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    def __repr__(self) -> str:
        return f"with_index({self.datamodule!r})"

    # --- Lightning's calls, passed on ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The wrapped module's ``prepare_data`` (downloads, ...)."""
        self.datamodule.trainer = self.trainer
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Attach the trainer to the wrapped module (it may divide its batch size by the world size) and run its
        ``setup``."""
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        """The wrapped module's ``teardown``."""
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped module's state (Lightning stores it in checkpoints)."""
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped module's state."""
        self.datamodule.load_state_dict(state_dict)

    # --- the training loader, with the index ---------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader:
        """The wrapped training loader's dataset, batch size and settings in a resumable loader that yields
        ``(x, y, index)``; shuffled (by ``seed + epoch``) when the wrapped one shuffles, this rank's share under
        DDP."""
        loader = self.datamodule.train_dataloader()
        if not isinstance(loader, DataLoader):
            raise ValueError("with_index needs a datamodule whose train_dataloader() returns one torch DataLoader, "
                             f"got {type(loader).__name__}")
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("with_index needs a map-style training dataset (samples addressed by index), got the "
                             f"IterableDataset {type(dataset).__name__}")
        shuffle, sampler_seed, sampler_drop_last = _sampler_order(loader)
        seed = self.seed if sampler_seed is None else sampler_seed
        trainer = self.trainer
        world_size = int(trainer.world_size) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else 0
        indexed = IndexedDataset(dataset)
        kwargs = {name: getattr(loader, name) for name in _LOADER_SETTINGS if hasattr(loader, name)}
        if kwargs.get("num_workers", 0) > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        collate = loader.collate_fn
        self._train_dataset = dataset
        return ResumableDataLoader(
            indexed,
            sampler=ResumableSampler(indexed, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=sampler_drop_last),
            batch_size=loader.batch_size,
            drop_last=loader.drop_last,
            collate_fn=_CollateWithIndex(default_collate if collate is None else collate),
            # Its own generator seeds the workers: creating an iterator draws nothing from the global stream.
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )

    @property
    def num_train_samples(self) -> int:
        """Size of the wrapped training set (the eps table's size): indices are ``0 .. num_train_samples - 1``."""
        if self._train_dataset is None:
            self._train_dataset = self.datamodule.train_dataloader().dataset
        return len(self._train_dataset)  # type: ignore[arg-type]


def _overrides(datamodule: Any, name: str) -> bool:
    """Whether ``datamodule`` defines its own method ``name`` (in its class or, as ``from_datasets`` does, on the
    instance), not Lightning's default; compared by code as Lightning's ``is_overridden``."""
    code = getattr(getattr(datamodule, name, None), "__code__", None)
    return code is not None and all(code is not getattr(getattr(base, name, None), "__code__", None)
                                    for base in lightning_types("LightningDataModule"))


def _pair_hook(hook: Any) -> Any:
    """``hook`` run on ``(x, y)``, a training batch's index put back after it."""

    def run(batch: Any, *args: Any) -> Any:
        if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[2], Tensor):
            x, y = hook((batch[0], batch[1]), *args)
            return x, y, batch[2] if not isinstance(x, Tensor) else batch[2].to(x.device)
        return hook(batch, *args)

    return run


def with_index(datamodule: Any, seed: int = 0) -> Any:
    """A datamodule of ``datamodule``'s Lightning namespace whose training batches gain the sample index; given a
    datamodule class, a class (:func:`with_index_class`): ``LightningCLI(MMAModule, with_index(MyDataModule))``.

    ``datamodule`` is any LightningDataModule (``pytorch_lightning`` or ``lightning.pytorch``) whose training
    loader yields ``(x, y)`` over a map-style dataset; the result is a :class:`WithIndexDataModule` of the same
    namespace (``mma_lightning.lightning.data.WithIndexDataModule`` for ``lightning.pytorch``): training
    batches ``(x, y, index)`` from a resumable loader with the wrapped loader's settings, ``num_train_samples``
    the training set's size, validation and test loaders the wrapped ones. A datamodule that already yields
    the index (this package's own) is returned as is. ``seed`` orders the shuffled epochs (``seed + epoch``).

    Example::

        net = nn.Sequential(Normalize([0.1307], [0.3081]), SimpleDenseNet())  # normalisation inside the model
        trainer.fit(MMAModule(net, max_eps=0.3), datamodule=with_index(MNISTDataModule()))  # the template's
    """
    if isinstance(datamodule, type):
        return with_index_class(datamodule, seed=seed)
    if isinstance(datamodule, (IndexedDataModuleLogic, WithIndexDataModuleLogic)):
        return datamodule
    if isinstance(datamodule, pl.LightningDataModule):
        return WithIndexDataModule(datamodule, seed=seed)
    lightning_pytorch = sys.modules.get("lightning.pytorch")
    if lightning_pytorch is not None and isinstance(datamodule, lightning_pytorch.LightningDataModule):
        from mma_lightning.lightning.data import WithIndexDataModule as LightningWithIndexDataModule

        return LightningWithIndexDataModule(datamodule, seed=seed)
    raise ValueError("with_index needs a LightningDataModule (pytorch_lightning or lightning.pytorch), got "
                     f"{type(datamodule).__name__}")


def with_index_class(datamodule_class: type, seed: int = 0) -> type:
    """A :class:`WithIndexDataModule` class (of ``datamodule_class``'s namespace) that builds ``datamodule_class``
    from its own arguments and wraps it (:func:`with_index`): for LightningCLI users who keep their datamodule
    class fixed, ``LightningCLI(MMAModule, with_index(MyDataModule))``, whose ``--data.<argument>`` are
    ``MyDataModule``'s. ``seed`` orders the shuffled epochs. A class that already yields the index is returned as
    is.
    """
    if not (isinstance(datamodule_class, type)
            and issubclass(datamodule_class, lightning_types("LightningDataModule"))):
        raise ValueError("with_index needs a LightningDataModule class or object (pytorch_lightning or "
                         f"lightning.pytorch), got {datamodule_class!r}")
    if issubclass(datamodule_class, (IndexedDataModuleLogic, WithIndexDataModuleLogic)):
        return datamodule_class
    base: type = WithIndexDataModule
    if not issubclass(datamodule_class, pl.LightningDataModule):
        from mma_lightning.lightning.data import WithIndexDataModule as LightningWithIndexDataModule

        base = LightningWithIndexDataModule

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        WithIndexDataModuleLogic.__init__(self, datamodule_class(*args, **kwargs), seed=seed)

    # The signature LightningCLI (jsonargparse) reads: the wrapped class's arguments, their annotations resolved
    # in the wrapped class's module.
    signature = inspect.signature(datamodule_class)
    try:
        hints = typing.get_type_hints(datamodule_class.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: keep them as written
        hints = {}
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [p.replace(annotation=hints.get(name, p.annotation)) for name, p in signature.parameters.items()]
    __init__.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    __init__.__annotations__ = {name: hint for name, hint in hints.items() if name != "return"}
    __init__.__doc__ = f"Build ``{datamodule_class.__name__}(*args, **kwargs)`` and wrap it (``with_index``)."
    name = f"{datamodule_class.__name__}WithIndex"
    return type(name, (base,), {"__init__": __init__, "__module__": datamodule_class.__module__,
                                "__qualname__": name, "__doc__": f"``with_index({datamodule_class.__name__})``: "
                                f"{datamodule_class.__name__}'s training batches with the sample index."})


# The pytorch_lightning class: the namespace-free logic above on pytorch_lightning's base class
# (mma_lightning.lightning.data builds the lightning.pytorch one from the same logic class).
class WithIndexDataModule(WithIndexDataModuleLogic, pl.LightningDataModule):
    """:class:`WithIndexDataModuleLogic` on pytorch_lightning (the default namespace).

    ``datamodule`` is typed as this namespace's LightningDataModule, so LightningCLI builds it from a class path
    and its own arguments (``--data.datamodule=my_project.MyDataModule --data.datamodule.batch_size=64``), and
    Hydra from a nested ``_target_``.
    """

    def __init__(self, datamodule: pl.LightningDataModule, seed: int = 0) -> None:
        super().__init__(datamodule, seed=seed)
