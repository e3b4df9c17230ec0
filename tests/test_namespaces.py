"""Both Lightning namespaces: every module, datamodule and callback under ``pytorch_lightning`` (default) and
``lightning.pytorch`` (``mma_lightning.lightning``), built from the same logic classes, trained by each
namespace's own Trainer: fit, validate, test, checkpoint reload, DDP spawn."""

from __future__ import annotations

import importlib
import inspect
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as L  # noqa: E402
import pytorch_lightning as pl  # noqa: E402

import mma_lightning  # noqa: E402
import mma_lightning.lightning as mml  # noqa: E402
from mma_lightning.namespaces import lightning_types  # noqa: E402

# (default package, lightning package) pairs whose __all__ must match name for name.
MIRRORS = [("mma_lightning", "mma_lightning.lightning"),
           ("mma_lightning.methods", "mma_lightning.lightning.methods"),
           ("mma_lightning.data", "mma_lightning.lightning.data"),
           ("mma_lightning.evaluation", "mma_lightning.lightning.evaluation"),
           ("mma_lightning.callbacks", "mma_lightning.lightning.callbacks"),
           ("mma_lightning.cli.checkpoint", "mma_lightning.lightning.checkpoint"),
           ("mma_lightning.packing", "mma_lightning.lightning.packing")]
NAMESPACES = {"pytorch_lightning": (pl, mma_lightning), "lightning": (L, mml)}
LIGHTNING_BASES = ("LightningModule", "LightningDataModule", "Callback", "plugins.CheckpointIO", "loggers.Logger")
DATAMODULE_FACTORIES = {"mnist5k_datamodule"}  # functions returning a datamodule: each namespace has its own


def _base(ns: ModuleType, dotted: str) -> type:
    for part in dotted.split("."):
        ns = getattr(ns, part)
    return ns  # type: ignore[return-value]


def _is_lightning_class(obj: object, ns: ModuleType) -> bool:
    return inspect.isclass(obj) and issubclass(obj, tuple(_base(ns, b) for b in LIGHTNING_BASES))


def _public_classes(module: ModuleType) -> dict[str, object]:
    """``__all__``, or for a module without one, its Lightning classes."""
    names = getattr(module, "__all__", None) or [
        n for n, o in vars(module).items() if _is_lightning_class(o, pl) and o.__module__ == module.__name__]
    return {n: getattr(module, n) for n in names}


@pytest.mark.parametrize(("default_name", "other_name"), MIRRORS)
def test_every_lightning_class_exists_in_both_namespaces_from_the_same_logic(default_name: str,
                                                                              other_name: str) -> None:
    default, other = importlib.import_module(default_name), importlib.import_module(other_name)
    names = _public_classes(default)
    namespaced = 0
    for name, obj in names.items():
        mirror = getattr(other, name)
        if name in DATAMODULE_FACTORIES:
            continue
        if not _is_lightning_class(obj, pl):
            assert mirror is obj, f"{other_name}.{name} should be the namespace-free {default_name}.{name}"
            continue
        namespaced += 1
        assert _is_lightning_class(mirror, L) and not _is_lightning_class(mirror, pl), name
        assert not _is_lightning_class(obj, L), name
        # Same code: each class adds nothing of its own to the shared logic class (its first base).
        logic = obj.__mro__[1]
        assert logic.__name__ == f"{name}Logic" and mirror.__mro__[1] is logic, name
        own = {k for cls in (obj, mirror) for k in vars(cls)
               if not k.startswith("__") and k != "_abc_impl"}  # ABCMeta's bookkeeping (CheckpointIO)
        assert not own, f"{name} defines {own} outside its logic class"
    assert namespaced > 0


def test_the_class_hierarchy_is_mirrored() -> None:
    assert issubclass(mml.PGDLSModule, mml.PGDATModule) and issubclass(mml.MMAModule, mml.AdversarialModule)
    assert issubclass(mml.data.FashionMNISTDataModule, mml.data.MNISTDataModule)
    assert issubclass(mml.data.TensorDataModule, mml.data.IndexedDataModule)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_mnist5k_datamodule_returns_the_namespace_datamodule(namespace: str) -> None:
    ns, package = NAMESPACES[namespace]
    dm = package.data.mnist5k_datamodule(val_size=100)
    assert type(dm) is package.data.TensorDataModule and isinstance(dm, ns.LightningDataModule)


def test_lightning_types_sees_both_namespaces() -> None:
    assert lightning_types("LightningModule") == (pl.LightningModule, L.LightningModule)
    assert lightning_types("loggers.TensorBoardLogger") == (pl.loggers.TensorBoardLogger,
                                                            L.loggers.TensorBoardLogger)


def blobs(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes of 4x4 images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    noise = 0.1 * torch.randn(n, 1, 4, 4, generator=g)
    x = (0.5 + 0.3 * (y.view(-1, 1, 1, 1).float() - 1) + noise).clamp(0, 1)
    return x, y


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_mma(package: ModuleType, net: nn.Module | None = None):
    return package.MMAModule(net or tiny_net(), max_eps=0.1, min_eps=0.02, nb_iter=2, search_steps=3,
                             eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2,
                             optimizer=partial(torch.optim.Adam, lr=1e-2))


def tiny_datamodule(package: ModuleType):
    x, y = blobs()
    return package.data.TensorDataModule(x[:32], y[:32], x_val=x[32:], y_val=y[32:], x_test=x[32:],
                                         y_test=y[32:], batch_size=8)


def trainer(ns: ModuleType, tmp_path: Path, **kwargs):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=tmp_path,
                enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    args.update(kwargs)
    return ns.Trainer(**args)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_fit_validate_test_and_reload_with_each_namespace(namespace: str, tmp_path: Path) -> None:
    ns, package = NAMESPACES[namespace]
    torch.manual_seed(0)
    module, dm = tiny_mma(package), tiny_datamodule(package)
    robustness = package.evaluation.RobustnessCallback([0.05, 0.1], max_samples=8, nb_iter=2,
                                                       margin_nb_iter=2, margin_search_steps=2, batch_size=8)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/avg_eps", mode="max",
                                        save_last=True)
    board = ns.loggers.TensorBoardLogger(tmp_path, name="tb")
    t = trainer(ns, tmp_path, callbacks=[robustness, ckpt], logger=board)
    t.fit(module, datamodule=dm)
    assert t.global_step == 8 and robustness.last_result is not None
    assert "robust/avg_robust_acc" in t.callback_metrics
    val = t.validate(module, datamodule=dm, verbose=False)[0]
    test = t.test(module, datamodule=dm, verbose=False)[0]
    assert {"val/acc", "val/avg_eps"} <= set(val) and {"test/acc", "test/avg_eps"} <= set(test)
    # the RobustnessCallback found this namespace's TensorBoardLogger: its figures are in the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(board.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "robust/margins" in events.Tags()["images"]

    reloaded = type(module).load_from_checkpoint(ckpt.last_model_path, net=tiny_net())
    assert type(reloaded) is type(module) and dict(reloaded.hparams) == dict(module.hparams)
    for key, value in module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    # The checkpoint resumes under the same namespace's Trainer (optimiser state, eps table, step count).
    t2 = trainer(ns, tmp_path, max_epochs=3, logger=False, enable_checkpointing=False)
    t2.fit(tiny_mma(package), datamodule=tiny_datamodule(package), ckpt_path=ckpt.last_model_path)
    assert t2.global_step == 12


def test_a_trainer_refuses_the_other_namespace(tmp_path: Path) -> None:
    """Why the mirror exists: each namespace's Trainer checks for its own LightningModule class, first thing in
    ``fit`` (before any hook the library could use, so this message stays Lightning's)."""
    with pytest.raises(TypeError, match="LightningModule"):
        trainer(L, tmp_path, logger=False).fit(tiny_mma(mma_lightning), datamodule=tiny_datamodule(mml))


def test_a_default_module_built_next_to_lightning_pytorch_says_which_package_to_use(monkeypatch,
                                                                                    tmp_path: Path) -> None:
    """The module itself: ``lightning.Trainer.fit`` refuses it before any of its hooks runs, so the hint comes
    when it is built in a process on ``lightning.pytorch`` that never imported ``mma_lightning.lightning`` (the
    lightning-hydra-template's case); then Lightning's own ``TypeError``."""
    import re
    import sys
    import warnings

    monkeypatch.delitem(sys.modules, "mma_lightning.lightning")
    hint = HINT.format(subject="MMAModule is", name="MMAModule")
    with pytest.warns(UserWarning, match=f"^{re.escape(hint)}$"):
        module = tiny_mma(mma_lightning)
    with pytest.raises(TypeError, match="LightningModule"):
        trainer(L, tmp_path, logger=False).fit(module, datamodule=tiny_datamodule(mml))
    monkeypatch.setitem(sys.modules, "mma_lightning.lightning", mml)  # the user knows the mirror: no hint
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is a pytorch_lightning class")
        tiny_mma(mma_lightning)
        tiny_mma(mml)


def test_a_subclass_defined_next_to_lightning_pytorch_says_which_package_to_use(monkeypatch) -> None:
    """LightningCLI refuses a subclass of a default-namespace module before building it
    (``MisconfigurationException: Cannot add arguments from``): the hint comes when the subclass is defined."""
    import re
    import sys

    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    monkeypatch.delitem(sys.modules, "mma_lightning.lightning")
    hint = HINT.format(subject="MMAClassifier derives from MMAModule, which is", name="MMAModule")
    with pytest.warns(UserWarning, match=f"^{re.escape(hint)}$"):
        class MMAClassifier(mma_lightning.MMAModule):
            pass
    with pytest.raises(MisconfigurationException, match="Cannot add arguments from"):
        LightningCLI(MMAClassifier, args=[])


HINT = ("{subject} a pytorch_lightning class (from mma_lightning) and lightning.pytorch is imported: a "
        "lightning.Trainer refuses it (TypeError: `model` must be a `LightningModule`), and so does "
        "lightning.pytorch.cli.LightningCLI (MisconfigurationException: Cannot add arguments from ...). With "
        "lightning.pytorch, use `from mma_lightning.lightning import {name}` (and mma_lightning.lightning.data, "
        "...); with a pytorch_lightning.Trainer, nothing to change")

OTHER_NAMESPACE = ("{name} is a {ours} class (from {ours_pkg}) and the Trainer is a {theirs} Trainer "
                   "({trainer}): a Trainer takes only the classes of its own namespace. With a {theirs} Trainer, "
                   "take the same classes from {theirs_pkg} (e.g. `from {theirs_pkg} import MMAModule`, "
                   "`{theirs_pkg}.data.{example}`); or keep {ours_pkg} with a {ours} Trainer")


@pytest.mark.parametrize(("trainer_ns", "module_ns"), [("lightning", "pytorch_lightning"),
                                                       ("pytorch_lightning", "lightning")])
def test_a_datamodule_under_the_other_namespaces_trainer_names_the_package_to_use(trainer_ns: str,
                                                                                  module_ns: str,
                                                                                  tmp_path: Path) -> None:
    """Where the library sees the Trainer (its datamodules are attached to it; mma-train builds both), the
    mismatch names ``mma_lightning.lightning`` (or ``mma_lightning``), not Lightning's
    ``ValueError: Expected a parent``."""
    from mma_lightning.namespaces import check_trainer_namespace

    ns, package = NAMESPACES[trainer_ns]
    other = NAMESPACES[module_ns][1]
    names = {"pytorch_lightning": ("pytorch_lightning", "mma_lightning", "pytorch_lightning.Trainer"),
             "lightning": ("lightning.pytorch", "mma_lightning.lightning", "lightning.Trainer")}
    (ours, ours_pkg, _), (theirs, theirs_pkg, trainer_name) = names[module_ns], names[trainer_ns]
    expected = OTHER_NAMESPACE.format(ours=ours, ours_pkg=ours_pkg, theirs=theirs, theirs_pkg=theirs_pkg,
                                      trainer=trainer_name, name="{name}", example="{example}")
    t = trainer(ns, tmp_path, logger=False, max_epochs=1)
    with pytest.raises(ValueError) as err:
        t.fit(tiny_mma(package), datamodule=tiny_datamodule(other))
    assert str(err.value) == expected.format(name="TensorDataModule", example="TensorDataModule")
    with pytest.raises(ValueError) as err:  # mma-train's check of its module against its trainer._target_
        check_trainer_namespace(tiny_mma(other), t)
    assert str(err.value) == expected.format(name="MMAModule", example="MNISTDataModule")
    check_trainer_namespace(tiny_mma(package), t)  # the same namespace: nothing to say


@pytest.mark.parametrize("name", ["PGDATModule", "PGDLSModule", "StandardModule", "TRADESModule"])
def test_every_method_fits_under_lightning_pytorch(name: str, tmp_path: Path) -> None:
    kwargs = {"StandardModule": {}, "TRADESModule": {"eps": 0.1, "nb_iter": 2}}.get(name, {"eps": 0.1,
                                                                                           "nb_iter": 2})
    module = getattr(mml, name)(tiny_net(), eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2, **kwargs)
    t = trainer(L, tmp_path, max_epochs=1, limit_val_batches=1, logger=False, enable_checkpointing=False)
    t.fit(module, datamodule=tiny_datamodule(mml))
    assert t.global_step == 4


def test_each_trainer_takes_its_own_namespace_atomic_checkpoint_io(tmp_path: Path) -> None:
    """A lightning.pytorch Trainer refuses the default plugin (a lightning_fabric CheckpointIO): the mirror."""
    from mma_lightning.cli.checkpoint import AtomicCheckpointIO
    from mma_lightning.lightning.checkpoint import AtomicCheckpointIO as LAtomicCheckpointIO

    with pytest.raises(Exception, match="Found invalid type for plugin"):
        trainer(L, tmp_path, logger=False, plugins=[AtomicCheckpointIO()])
    for ns, io in ((L, LAtomicCheckpointIO()), (pl, AtomicCheckpointIO())):
        assert trainer(ns, tmp_path, logger=False, plugins=[io]).strategy.checkpoint_io is io


def test_best_and_last_checkpoint_under_lightning_pytorch(tmp_path: Path) -> None:
    from mma_lightning.lightning.checkpoint import BestAndLastCheckpoint

    ckpt = BestAndLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/avg_eps", mode="max", save_last=True)
    t = trainer(L, tmp_path, max_epochs=1, limit_val_batches=1, logger=False, callbacks=[ckpt])
    t.fit(tiny_mma(mml), datamodule=tiny_datamodule(mml))
    assert (tmp_path / "ckpt" / "last.ckpt").is_file() and Path(ckpt.best_model_path).is_file()


class _DumpEpsLogic:
    """Each rank saves its step count and eps table when training ends."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        dump = (trainer.global_step, pl_module.eps_store.eps.cpu())
        torch.save(dump, self.out / f"rank{trainer.global_rank}.pt")


class DumpEpsPL(_DumpEpsLogic, pl.Callback):
    """For the pytorch_lightning Trainer."""


class DumpEpsL(_DumpEpsLogic, L.Callback):
    """For the lightning.pytorch Trainer."""


@pytest.mark.slow
@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_ddp_spawn_two_cpu_processes_with_each_namespace(namespace: str, tmp_path: Path) -> None:
    ns, package = NAMESPACES[namespace]
    torch.manual_seed(0)
    module = tiny_mma(package)
    dump = (DumpEpsPL if namespace == "pytorch_lightning" else DumpEpsL)(tmp_path)
    t = trainer(ns, tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                enable_checkpointing=False, callbacks=[dump])
    t.fit(module, datamodule=tiny_datamodule(package))
    (steps0, eps0), (steps1, eps1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # 32 samples, global batch 8 = 4 per rank: 4 steps per rank, one eps table shared by both ranks,
    # and ddp_spawn hands rank 0's weights and buffers (the eps table) back to this process.
    assert steps0 == steps1 == 4 and torch.equal(eps0, eps1) and eps0.shape == (32,)
    assert torch.equal(module.eps_store.eps, eps0)
