"""No host synchronisation in a steady-state training step, for every method.

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``, a boolean
mask index, ...) makes the CPU wait for the device. These CPU tests wrap the module's ``training_step`` (and
``validation_step``) after a first warm-up call, and make every such read raise inside the wrapped call only:
the attacks' value checks run on the first batch only, torchmetrics' NaN filter is off, and Lightning's
logging of tensors does not read them. ``benchmarks/gpu_check.py`` checks the same on CUDA with
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from mma_lightning import MMAModule, PGDATModule
from mma_lightning.data import TensorDataModule
from mma_lightning.methods.base import AdversarialModule
from test_methods import FAST_EVAL, METHODS, batch, tiny_net


class HostSyncError(AssertionError):
    """A tensor value was read on the host inside a guarded step."""


def _raiser(what: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(f"host synchronisation in a guarded step: {what}")

    return fail


def _is_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside this block, every Python-level way of reading a tensor's value on the host raises."""
    patches: dict[tuple[Any, str], Any] = {}

    def patch(owner: Any, name: str, new: Any) -> None:
        patches[(owner, name)] = getattr(owner, name)
        setattr(owner, name, new)

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "__bool__", "__int__",
                 "__float__", "__index__", "__array__"):
        patch(Tensor, name, _raiser(f"Tensor.{name}"))
    for name in ("nonzero", "masked_select"):
        patch(torch, name, _raiser(f"torch.{name}"))
    getitem, setitem = Tensor.__getitem__, Tensor.__setitem__

    def guarded_getitem(self: Tensor, index: Any) -> Any:
        if _is_mask(index):
            raise HostSyncError("host synchronisation in a guarded step: boolean-mask indexing")
        return getitem(self, index)

    def guarded_setitem(self: Tensor, index: Any, value: Any) -> None:
        if _is_mask(index):
            raise HostSyncError("host synchronisation in a guarded step: boolean-mask assignment")
        setitem(self, index, value)

    patch(Tensor, "__getitem__", guarded_getitem)
    patch(Tensor, "__setitem__", guarded_setitem)
    try:
        yield
    finally:
        for (owner, name), original in patches.items():
            setattr(owner, name, original)


def guard_after_first_call(module: pl.LightningModule, hook: str) -> list[int]:
    """Wrap ``module.<hook>``: the first call runs as is, every later call under :func:`no_host_sync`.

    Returns a list that records, per call, 1 if it ran guarded (so a test can tell the guard was exercised).
    """
    original = getattr(module, hook)
    guarded: list[int] = []
    calls: list[int] = []

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            return original(*args, **kwargs)
        guarded.append(1)
        with no_host_sync():
            return original(*args, **kwargs)

    setattr(module, hook, wrapped)
    return guarded


def fit(module: AdversarialModule, max_steps: int = 3) -> None:
    """2 training batches per epoch, so step 3 is the first of epoch 2; 2 validation batches after epoch 1."""
    x, y = batch(64, seed=3)
    data = TensorDataModule(x, y, val_size=32, batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)


def test_the_guard_catches_each_kind_of_host_read() -> None:
    t = torch.ones(3)
    reads: list[Callable[[], Any]] = [
        lambda: t.sum().item(), lambda: bool(t.any()), lambda: int(t[0]), lambda: float(t[0]),
        lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(), lambda: t[t > 0], lambda: t.nonzero(), lambda: torch.nonzero(t),
        lambda: range(10)[t.long()[0]],
    ]
    for read in reads:
        with no_host_sync(), pytest.raises(HostSyncError):
            read()
    with no_host_sync():  # device-side work passes
        torch.where(t > 0, t, -t)[0:2].to(torch.float64).sum()
    assert bool(t.all())  # patches restored


@pytest.mark.parametrize("method", sorted(METHODS))
def test_steady_state_training_step_has_no_host_sync(method: str) -> None:
    module = METHODS[method](tiny_net(), "linf")
    guarded_train = guard_after_first_call(module, "training_step")
    guarded_val = guard_after_first_call(module, "validation_step")
    fit(module)
    assert len(guarded_train) == 2 and len(guarded_val) == 1


def test_refined_search_training_step_has_no_host_sync() -> None:
    """The refined search (root-finder, boundary step, FMN steps) in training and validation."""
    module = MMAModule(tiny_net(), max_eps=0.2, min_eps=0.05, nb_iter=3, search="refined", eval_search="refined",
                       **FAST_EVAL)
    guarded_train = guard_after_first_call(module, "training_step")
    guarded_val = guard_after_first_call(module, "validation_step")
    fit(module)
    assert len(guarded_train) == 2 and len(guarded_val) == 1


def test_debug_checks_run_the_value_checks_on_every_step() -> None:
    """The switch is real: with ``debug_checks=True`` the attacks read values in every step (caught here),
    and the same checks ran on the first batch in the default mode (bad labels are reported there)."""
    module = MMAModule(tiny_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2, debug_checks=True,
                       **FAST_EVAL)
    guard_after_first_call(module, "training_step")
    with pytest.raises(HostSyncError):
        fit(module)
    bad = PGDATModule(tiny_net(num_classes=2), eps=0.1, nb_iter=2, **FAST_EVAL)  # labels 0..2, 2 logits
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 1\]"):
        fit(bad)
