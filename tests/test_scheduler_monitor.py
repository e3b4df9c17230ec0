"""Schedulers stepped on a metric: ``ReduceLROnPlateau`` on ``val/acc``, named by the module's
``scheduler_monitor`` option or by a factory returning Lightning's scheduler config
(conf/scheduler/reduce_on_plateau.yaml); a missing or unusable monitor is a clear error before training."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from mma_lightning import MMAModule
from mma_lightning.data import TensorDataModule
from mma_lightning.methods.schedules import lightning_scheduler

CONF = Path(__file__).resolve().parents[1] / "conf"
LR = 1e-2


def blobs(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = (0.5 + 0.3 * (y.view(-1, 1, 1, 1).float() - 1) + 0.1 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    return x, y


def module(scheduler, **kwargs) -> MMAModule:
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return MMAModule(net, max_eps=0.1, min_eps=0.02, nb_iter=1, search_steps=2, eval_eps=0.05, eval_nb_iter=1,
                     eval_search_steps=1, optimizer=partial(torch.optim.SGD, lr=LR), scheduler=scheduler,
                     **kwargs)


def fit(m: MMAModule, epochs: int = 3) -> pl.Trainer:
    x, y = blobs()
    dm = TensorDataModule(x[:16], y[:16], x_val=x[16:], y_val=y[16:], batch_size=8)
    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(m, datamodule=dm)
    return t


# A plateau that no epoch can leave: a new best val/acc must beat the best by 2 (accuracies are <= 1), so after
# the first epoch every epoch is "bad" and, with patience 0, halves the learning rate.
PLATEAU = dict(mode="max", factor=0.5, patience=0, threshold=2.0, threshold_mode="abs")


def test_reduce_on_plateau_on_val_acc_with_scheduler_monitor_steps_each_epoch() -> None:
    m = module(partial(ReduceLROnPlateau, **PLATEAU), scheduler_monitor="val/acc", scheduler_interval="epoch")
    t = fit(m, epochs=3)
    config = t.lr_scheduler_configs[0]
    assert config.monitor == "val/acc" and config.interval == "epoch" and config.reduce_on_plateau
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 2)  # epochs 2 and 3 were bad


def test_the_reduce_on_plateau_config_returns_lightnings_scheduler_config() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["scheduler=reduce_on_plateau", "scheduler.scheduler.patience=0",
                                          "scheduler.scheduler.factor=0.5", "+scheduler.scheduler.threshold=2",
                                          "+scheduler.scheduler.threshold_mode=abs"])
    assert cfg.method.scheduler_monitor is None and cfg.scheduler.monitor == "val/acc"
    factory = instantiate(cfg.scheduler)
    t = fit(module(factory), epochs=2)  # the module's scheduler_interval (step) gives way to the config's epoch
    assert t.lr_scheduler_configs[0].monitor == "val/acc" and t.lr_scheduler_configs[0].interval == "epoch"
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5)


def test_a_scheduler_without_a_monitor_keeps_stepping_per_step() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    config = lightning_scheduler(StepLR(optimizer, 1), "step", None)
    assert set(config) == {"scheduler", "interval"} and config["interval"] == "step"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(), ("the scheduler ReduceLROnPlateau steps on a metric: set scheduler_monitor to the metric's name "
             "(e.g. scheduler_monitor='val/acc' with scheduler_interval='epoch'), or return "
             "mma_lightning.methods.schedules.scheduler_config(...) from the factory")),
    (dict(scheduler_monitor="val/acc"), ("scheduler_monitor='val/acc' is logged once per validation, so the "
                                        "scheduler must step per epoch: set scheduler_interval='epoch'")),
])
def test_a_plateau_scheduler_without_a_usable_monitor_is_refused_before_training(kwargs, message) -> None:
    m = module(partial(ReduceLROnPlateau, mode="max"), **kwargs)
    with pytest.raises(ValueError) as err:
        m.configure_optimizers()
    assert str(err.value) == message


def test_bad_scheduler_settings_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="scheduler_monitor must be a metric name"):
        module(None, scheduler_monitor="")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="returned a dict without a 'scheduler' key"):
        lightning_scheduler({"monitor": "val/acc"}, "epoch", None)
    with pytest.raises(ValueError, match="scheduler_monitor='val/loss' but the scheduler factory's config "
                                         "monitors 'val/acc'"):
        lightning_scheduler({"scheduler": StepLR(optimizer, 1), "monitor": "val/acc"}, "epoch", "val/loss")
