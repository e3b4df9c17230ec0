"""How attacks run a model without side effects the caller can see.

docs/lightning-notes.md, item 2 and 3: attacks inside Lightning may be called under ``torch.inference_mode()`` (the
default ``Trainer`` evaluates that way), and must leave every submodule's ``training`` flag as they found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mma_lightning.attacks.gradients import traced


@contextmanager
def model_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Run ``model`` in train (``True``) or eval (``False``) mode, then restore each submodule's own flag.

    Restoring module by module matters: a caller may keep, e.g., a frozen BatchNorm in eval mode inside a
    model in train mode, which a plain ``model.train(previous)`` would overwrite.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block, each one's own flag restored on exit.

    An attack needs the gradient to its input only. Eager autograd prunes the weight gradients anyway, but a
    ``torch.compile``d backbone (AOTAutograd) runs one fused backward that computes every gradient its
    inputs require: with frozen parameters that backward is the input gradient alone. ``.grad`` is never
    touched. Under ``torch.compile`` or a ``torch.func`` transform, where ``requires_grad_`` cannot be
    traced, nothing is changed: the attacks then take ``torch.func.grad`` (:mod:`.gradients`).
    """
    if traced():  # torch.func.grad differentiates with respect to the input only (attacks.gradients)
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def grad_enabled_outside_inference() -> Iterator[None]:
    """Enable autograd even inside ``torch.inference_mode()`` (where ``enable_grad`` alone is not enough).

    Inputs created in inference mode must be cloned inside this block (see :func:`usable_for_autograd`).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def usable_for_autograd(t: Tensor) -> Tensor:
    """A normal-tensor copy of an inference tensor (which autograd refuses to save); other tensors as they are."""
    if traced():  # a captured function gets normal tensors (its caller sees to it: methods.base)
        return t
    return t.clone() if t.is_inference() else t
