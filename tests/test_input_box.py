"""Inputs outside the data box stop with one message: normalised batches (MNIST's mean/std put
them in [-0.42, 2.82]) would make every eps and margin silently wrong. Checked on the first batch of each stage
and by every evaluation entry point; sync-free afterwards."""

from __future__ import annotations

import re
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mma_lightning import MMAModule
from mma_lightning.data import TensorDataModule
from mma_lightning.evaluation import estimate_margins, evaluate_model, robust_accuracy
from mma_lightning.models import Normalize

MEAN, STD = 0.1307, 0.3081  # the lightning-hydra-template's MNIST normalisation


def blobs(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 4x4 images in [0, 1], spanning the whole box (so normalised they leave it)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (0.5 + 0.4 * (y.view(-1, 1, 1, 1).float() - 1) + 0.2 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    x[0].fill_(0.0)
    x[1].fill_(1.0)
    return x, y


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def module(**kwargs) -> MMAModule:
    return MMAModule(kwargs.pop("net", None) or tiny_net(), max_eps=0.1, min_eps=0.02, nb_iter=2,
                     search_steps=2, eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2,
                     optimizer=partial(torch.optim.Adam, lr=1e-2), **kwargs)


def trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kwargs)
    return pl.Trainer(**args)


def datamodule(x: torch.Tensor, y: torch.Tensor) -> TensorDataModule:
    return TensorDataModule(x, y, x_val=x, y_val=y, x_test=x, y_test=y, batch_size=8)


BOX_MESSAGE = (
    r"the {where} inputs lie in \[-0.4242, 2.821\], outside the data box \[clip_min, clip_max\] = \[0, 1\]: every "
    r"eps is measured in input units and the attacks clip to the box, so robust accuracies and margins would be "
    r"wrong \(inputs normalised outside the model\?\). Fix: either move the normalisation into the model, net = "
    r"torch.nn.Sequential\(mma_lightning.models.Normalize\(mean, std\), net\), and feed inputs in \[0, 1\] "
    r"\(e.g. torchvision's ToTensor\(\) without Normalize\); or set clip_min and clip_max to the range of your "
    r"data \(the normalised box, e.g. \(0 - mean\) / std and \(1 - mean\) / std; eps is then in normalised units\)$")


def test_normalised_batches_stop_every_stage_with_the_range_the_box_and_both_fixes() -> None:
    x, y = blobs()
    dm = datamodule(normalised(x), y)
    with pytest.raises(ValueError, match=BOX_MESSAGE.format(where="training")):
        trainer(limit_train_batches=1, limit_val_batches=0).fit(module(), datamodule=dm)
    with pytest.raises(ValueError, match=BOX_MESSAGE.format(where="validation")):
        trainer().validate(module(), datamodule=dm, verbose=False)
    with pytest.raises(ValueError, match=BOX_MESSAGE.format(where="test")):
        trainer().test(module(), datamodule=dm, verbose=False)


def test_the_first_fix_normalize_inside_the_model_and_the_second_a_box_of_the_datas_range() -> None:
    x, y = blobs()
    inside = module(net=nn.Sequential(Normalize([MEAN], [STD]), tiny_net()))
    t = trainer(limit_train_batches=2, limit_val_batches=1)
    t.fit(inside, datamodule=datamodule(x, y))
    assert t.global_step == 2
    boxed = module(clip_min=normalised(torch.tensor(0.0)).item(), clip_max=normalised(torch.tensor(1.0)).item())
    trainer(limit_train_batches=1, limit_val_batches=1).fit(boxed, datamodule=datamodule(normalised(x), y))


def test_sync_free_after_the_first_batch_unless_debug_checks() -> None:
    """Only each stage's first batch is read on the host: a later batch out of the box passes by default
    (as the other value checks), and stops with ``debug_checks=True``."""
    x, y = blobs()
    x_mixed = torch.cat([x[:8], normalised(x[8:])])
    loader = DataLoader(TensorDataset(x_mixed, y), batch_size=8)
    trainer().validate(module(), dataloaders=loader, verbose=False)
    with pytest.raises(ValueError, match=re.escape("the validation inputs lie in")):
        trainer().validate(module(debug_checks=True), dataloaders=loader, verbose=False)


@pytest.mark.parametrize("entry", ["robust_accuracy", "estimate_margins", "evaluate_model"])
def test_every_evaluation_entry_point_checks_the_box(entry: str) -> None:
    x, y = blobs(16)
    net = tiny_net()
    cheap = dict(nb_iter=1, restarts=1, losses=["ce"])
    calls = {
        "robust_accuracy": lambda data, **box: robust_accuracy(net, data, "linf", [0.1], **cheap, **box),
        "estimate_margins": lambda data, **box: estimate_margins(net, data, "linf", 0.2, nb_iter=1,
                                                                 search_steps=1, losses=["ce"], **box),
        "evaluate_model": lambda data, **box: evaluate_model(net, data, "linf", [0.1], **cheap, margins=False,
                                                             sanity=False, progress=False, **box),
    }
    with pytest.raises(ValueError, match=BOX_MESSAGE.format(where="evaluation")):
        calls[entry]((normalised(x), y))
    calls[entry]((x, y))  # pixels in [0, 1]
    calls[entry]((normalised(x), y), clip_min=None, clip_max=None)  # no box: nothing to check
    calls[entry](DataLoader(TensorDataset(normalised(x), y), batch_size=8), clip_min=-0.43, clip_max=2.83)


def test_autoattack_checks_its_fixed_box_and_names_only_the_normalize_fix() -> None:
    pytest.importorskip("torchattacks")
    from mma_lightning.evaluation import autoattack_accuracy

    x, y = blobs(8)
    with pytest.raises(ValueError) as err:
        autoattack_accuracy(tiny_net(), (normalised(x), y), "linf", [0.1])
    message = str(err.value)
    assert message.startswith("the evaluation inputs lie in [-0.4242, 2.821], outside the data box")
    assert "mma_lightning.models.Normalize(mean, std)" in message and "clip_min and clip_max to" not in message
    assert message.endswith("(this attack's box is fixed)")
