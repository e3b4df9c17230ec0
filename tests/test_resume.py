"""Exact resume: a run stopped at a checkpoint and resumed equals the uninterrupted run bitwise on CPU
(weights, MMA eps table, optimiser), from an epoch boundary and from mid-epoch, also from a checkpoint saved by
``trainer.save_checkpoint`` after ``fit`` returned and from the one the default ``ModelCheckpoint`` writes as a
``max_steps`` fit ends (:mod:`mma_lightning.methods.resume_point`).

The model has dropout (the global torch stream), MMA's AN-PGD starts at random (the module's attack
generator) and the data are shuffled (the resumable sampler); validation and its sanity check run too.
"""

from __future__ import annotations

import importlib
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from mma_lightning.data import TensorDataModule
from mma_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from mma_lightning.methods.random_state import CHECKPOINT_KEY, RandomStreams
from mma_lightning.methods.resume_point import INEXACT_KEY

STEPS_PER_EPOCH = 6  # 120 training samples, batch 20
NAMESPACES = {"pytorch_lightning": ("pytorch_lightning", "mma_lightning", "mma_lightning.data"),
              "lightning": ("lightning.pytorch", "mma_lightning.lightning", "mma_lightning.lightning.data")}


def data(namespace: str = "pytorch_lightning") -> TensorDataModule:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(140) % 3
    x = (0.5 + 0.25 * (y.view(-1, 1, 1, 1).float() - 1) + 0.15 * torch.randn(140, 1, 4, 4, generator=g))
    datamodule = importlib.import_module(NAMESPACES[namespace][2]).TensorDataModule
    return datamodule(x.clamp(0, 1), y, val_size=20, batch_size=20, seed=7)


def module(method: str = "mma", namespace: str = "pytorch_lightning") -> pl.LightningModule:
    pl.seed_everything(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    common = dict(norm="linf", eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2,
                  optimizer=partial(torch.optim.Adam, lr=1e-2))
    methods = importlib.import_module(NAMESPACES[namespace][1])
    if method == "pgd_at":
        return methods.PGDATModule(net, eps=0.1, nb_iter=2, **common)
    return methods.MMAModule(net, max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=3, **common)


def fit(steps: int, root: Path, ckpt_path: str | None = None, method: str = "mma",
        save_every: int | None = None, namespace: str = "pytorch_lightning", save_after: bool = False,
        callbacks: list[Any] | None = None, **trainer_kwargs: Any) -> pl.LightningModule:
    """Fit ``steps`` optimiser steps (from ``ckpt_path`` if given); checkpoints every ``save_every`` steps, and
    with ``save_after`` once ``fit`` has returned (``trainer.save_checkpoint(root / "after_fit.ckpt")``)."""
    lightning = importlib.import_module(NAMESPACES[namespace][0])
    m = module(method, namespace)
    callbacks = list(callbacks or [])
    if save_every is not None:
        callbacks.append(lightning.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=save_every,
                                                             save_top_k=-1, filename="{step}"))
    saving = save_every is not None or any(isinstance(c, lightning.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, deterministic=True, logger=False,
                                enable_checkpointing=saving, callbacks=callbacks,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                                default_root_dir=root, **{"max_steps": steps, "max_epochs": -1, **trainer_kwargs})
    lightning.seed_everything(0)
    trainer.fit(m, datamodule=data(namespace), ckpt_path=ckpt_path)
    if save_after:
        trainer.save_checkpoint(root / "after_fit.ckpt")
    return m


def max_diff(a: pl.LightningModule, b: pl.LightningModule) -> float:
    """Largest absolute difference over every parameter and buffer (the eps table included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def optimizer_diff(a: pl.LightningModule, b: pl.LightningModule) -> float:
    """Largest absolute difference over the optimisers' states (Adam's moments and step counts)."""
    sa, sb = a.trainer.optimizers[0].state_dict()["state"], b.trainer.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    return max(float((sa[p][k].double() - sb[p][k].double()).abs().max()) for p in sa for k in sa[p])


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> pl.LightningModule:
    """The uninterrupted MMA run: two epochs."""
    return fit(2 * STEPS_PER_EPOCH, tmp_path_factory.mktemp("straight"))


@pytest.mark.parametrize("stop", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3], ids=["epoch_boundary", "mid_epoch"])
def test_resumed_mma_run_equals_the_uninterrupted_one(tmp_path: Path, stop: int,
                                                      straight: pl.LightningModule) -> None:
    total = 2 * STEPS_PER_EPOCH
    fit(stop, tmp_path / "first", save_every=stop)
    ckpt = tmp_path / "first" / f"step={stop}.ckpt"
    assert CHECKPOINT_KEY in torch.load(ckpt, weights_only=True)
    resumed = fit(total, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert max_diff(straight, resumed) == 0.0
    assert float((straight.eps_store.eps - resumed.eps_store.eps).abs().max()) == 0.0
    assert bool((resumed.eps_store.eps > 0).any())  # the table was really used


def test_resumed_pgd_at_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """PGD-AT's random starts come from the module's generator too (mid-epoch resume)."""
    straight = fit(8, tmp_path / "straight", method="pgd_at")
    fit(4, tmp_path / "first", method="pgd_at", save_every=4)
    resumed = fit(8, tmp_path / "resumed", method="pgd_at", ckpt_path=str(tmp_path / "first" / "step=4.ckpt"))
    assert max_diff(straight, resumed) == 0.0


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], pl.LightningModule]:
    """The uninterrupted two-epoch runs, per (namespace, method), made on first use."""
    class Runs(dict):
        def __missing__(self, key: tuple[str, str]) -> pl.LightningModule:
            namespace, method = key
            self[key] = fit(2 * STEPS_PER_EPOCH, tmp_path_factory.mktemp("straight"), method=method,
                            namespace=namespace)
            return self[key]
    return Runs()


@pytest.mark.parametrize("method", ["mma", "pgd_at"])
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("stop", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3], ids=["epoch_boundary", "mid_epoch"])
def test_checkpoint_saved_after_fit_resumes_exactly(tmp_path: Path, stop: int, namespace: str, method: str,
                                                    straight_runs: dict[tuple[str, str], pl.LightningModule]
                                                    ) -> None:
    """``trainer.fit(max_steps=stop); trainer.save_checkpoint(p)``, then ``fit(ckpt_path=p)`` to a larger
    ``max_steps``: the same weights, eps table and optimiser state as the uninterrupted run (Lightning's closed fit
    loop made this resume in the next epoch; max |dw| was 0.21 here)."""
    total = 2 * STEPS_PER_EPOCH
    fit(stop, tmp_path, method=method, namespace=namespace, save_after=True)
    ckpt = torch.load(tmp_path / "after_fit.ckpt", weights_only=True)
    assert ckpt["global_step"] == stop and INEXACT_KEY not in ckpt
    resumed = fit(total, tmp_path / "resumed", method=method, namespace=namespace,
                  ckpt_path=str(tmp_path / "after_fit.ckpt"))
    straight = straight_runs[namespace, method]
    assert resumed.trainer.global_step == total
    assert max_diff(straight, resumed) == 0.0  # weights, and MMA's eps table (a buffer)
    assert optimizer_diff(straight, resumed) == 0.0
    if method == "mma":
        assert bool((resumed.eps_store.eps > 0).any())


def test_checkpoint_saved_after_a_max_epochs_fit_resumes_exactly(tmp_path: Path,
                                                                 straight: pl.LightningModule) -> None:
    """The same after a fit ended by ``max_epochs`` (one epoch, then on to two)."""
    fit(-1, tmp_path, save_after=True, max_epochs=1)
    resumed = fit(-1, tmp_path / "resumed", ckpt_path=str(tmp_path / "after_fit.ckpt"), max_epochs=2)
    assert resumed.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert max_diff(straight, resumed) == 0.0 and optimizer_diff(straight, resumed) == 0.0


def test_checkpoint_after_fit_ended_by_an_early_stop_warns(tmp_path: Path,
                                                           straight: pl.LightningModule) -> None:
    """A fit stopped by its mid-epoch validation (as EarlyStopping does) has no step-end state to save: saving
    after it and resuming from it both warn, naming the checkpoints that resume exactly; the run does drift."""
    class StopAtValidation(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = not trainer.sanity_checking

    with pytest.warns(UserWarning, match="not bitwise the uninterrupted one.*resume exactly"):
        fit(2 * STEPS_PER_EPOCH, tmp_path, save_after=True, callbacks=[StopAtValidation()], val_check_interval=3)
    assert INEXACT_KEY in torch.load(tmp_path / "after_fit.ckpt", weights_only=True)
    with pytest.warns(UserWarning, match="saved after fit returned at step 3"):
        resumed = fit(2 * STEPS_PER_EPOCH, tmp_path / "resumed", ckpt_path=str(tmp_path / "after_fit.ckpt"))
    assert max_diff(straight, resumed) > 0


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("stop", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3], ids=["epoch_boundary", "mid_epoch"])
def test_the_checkpoint_a_max_steps_fit_ends_with_resumes_exactly(
        tmp_path: Path, stop: int, namespace: str,
        straight_runs: dict[tuple[str, str], pl.LightningModule]) -> None:
    """The default ``ModelCheckpoint`` saves as a ``max_steps`` fit closes its epoch (``epoch=1-step=9.ckpt``):
    Lightning counted that epoch as processed, so a resume skipped the rest of a half-done epoch, or ran the next
    epoch in the order of the one after (max |dw| 0.21 and an eps table 0.21 off). The step's own loop state is
    written instead: bitwise the uninterrupted run."""
    lightning = importlib.import_module(NAMESPACES[namespace][0])
    fit(stop, tmp_path, namespace=namespace, callbacks=[lightning.callbacks.ModelCheckpoint(dirpath=tmp_path)])
    (ckpt,) = tmp_path.glob("*.ckpt")
    assert ckpt.name == f"epoch={(stop - 1) // STEPS_PER_EPOCH}-step={stop}.ckpt"  # the epoch of the last step
    resumed = fit(2 * STEPS_PER_EPOCH, tmp_path / "resumed", namespace=namespace, ckpt_path=str(ckpt))
    straight = straight_runs[namespace, "mma"]
    assert max_diff(straight, resumed) == 0.0 and optimizer_diff(straight, resumed) == 0.0
    assert float((straight.eps_store.eps - resumed.eps_store.eps).abs().max()) == 0.0


def test_a_checkpoint_of_a_half_epoch_closed_by_an_early_stop_warns(tmp_path: Path) -> None:
    """A stop requested by a mid-epoch validation (as EarlyStopping does) leaves no step-end state: a checkpoint
    written as fit closes that half epoch warns at save and at resume, naming the step and the skipped batches."""
    class StopAtValidation(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = not trainer.sanity_checking

    at_epoch_end = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True)
    with pytest.warns(UserWarning, match="saved at step 3 while fit closed epoch 0 after 3 of its 6 batches.*"
                                         "skips the last 3 batches of epoch 0"):
        fit(2 * STEPS_PER_EPOCH, tmp_path, callbacks=[StopAtValidation(), at_epoch_end], val_check_interval=3)
    (ckpt,) = tmp_path.glob("*.ckpt")
    assert INEXACT_KEY in torch.load(ckpt, weights_only=True)
    with pytest.warns(UserWarning, match="skips the last 3 batches of epoch 0"):
        fit(2 * STEPS_PER_EPOCH, tmp_path / "resumed", ckpt_path=str(ckpt))


def test_resume_without_the_streams_differs(tmp_path: Path, straight: pl.LightningModule) -> None:
    """The equality above is not a tautology: dropping the saved streams from the checkpoint changes the run."""
    total = 2 * STEPS_PER_EPOCH
    fit(STEPS_PER_EPOCH + 3, tmp_path / "first", save_every=STEPS_PER_EPOCH + 3)
    ckpt = torch.load(tmp_path / "first" / f"step={STEPS_PER_EPOCH + 3}.ckpt", weights_only=True)
    del ckpt[CHECKPOINT_KEY]
    torch.save(ckpt, tmp_path / "no_streams.ckpt")
    resumed = fit(total, tmp_path / "resumed", ckpt_path=str(tmp_path / "no_streams.ckpt"))
    assert max_diff(straight, resumed) > 0


def test_sampler_is_distributed_samplers_order_and_skips() -> None:
    """Same order as DistributedSampler on every rank; a skip leaves out the first global samples."""
    dataset = list(range(23))
    for world in (1, 2, 3):
        for rank in range(world):
            ref, ours = DistributedSampler(dataset, world, rank, seed=5), ResumableSampler(dataset, world, rank, seed=5)
            ref.set_epoch(2)
            ours.set_epoch(2)
            assert list(ours) == list(ref)
            ours.skip(2, 4 * world)
            assert list(ours) == list(ref)[4:]
            ours.skip(1, 4 * world)  # another epoch's position: the whole epoch
            assert list(ours) == list(ref)


def test_loader_state_round_trip() -> None:
    """The loader's state after 2 batches makes a fresh loader yield the remaining batches."""
    dataset = torch.arange(30)
    loader = ResumableDataLoader(dataset, ResumableSampler(dataset, seed=1), batch_size=4, drop_last=True)
    loader.sampler.set_epoch(3)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 3, "samples": 8}
    again = ResumableDataLoader(dataset, ResumableSampler(dataset, seed=1), batch_size=4, drop_last=True)
    again.load_state_dict(state)
    again.sampler.set_epoch(3)
    assert [b.tolist() for b in again] == full[2:]
    with pytest.raises(ValueError, match="samples"):
        again.load_state_dict({"epoch": 3})


def test_streams_restore_the_attack_generator_and_global_state() -> None:
    streams = RandomStreams()
    g = streams.generator("cpu")
    g.manual_seed(11)
    torch.manual_seed(12)
    saved = streams.gathered_state()
    expected = (torch.rand(3, generator=g), torch.rand(3))
    restored = RandomStreams()
    restored.restore(saved, rank=0, world_size=1)
    assert torch.equal(torch.rand(3, generator=restored.generator("cpu")), expected[0])
    assert torch.equal(torch.rand(3), expected[1])
