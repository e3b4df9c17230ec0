"""The training methods: each trains under a Lightning Trainer on CPU and its loss is the one it defines.

standard, PGD-AT (Madry et al. 2018), PGDLS (Ding et al. 2020), TRADES (Zhang et al. 2019), MMA and OMMA
(Ding et al. 2020) share :class:`AdversarialModule`; these tests pin each method's loss against an
independent computation on the same batch and weights.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mma_lightning import MMAModule, PGDATModule, PGDLSModule, StandardModule, TRADESModule
from mma_lightning.attacks import get_norm
from mma_lightning.data import TensorDataModule
from mma_lightning.methods.base import AdversarialModule

SHAPE = (1, 4, 4)
NUM_CLASSES = 3
FAST_EVAL = dict(eval_eps=0.1, eval_nb_iter=2, eval_search_steps=2)


def tiny_net(num_classes: int = NUM_CLASSES, batch_norm: bool = True) -> nn.Module:
    """A two-layer MLP on 4x4 inputs; BatchNorm makes train/eval mode matter."""
    torch.manual_seed(0)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16) if batch_norm else nn.Identity(),
                         nn.ReLU(), nn.Linear(16, num_classes))


def linear_net(num_classes: int = 2) -> nn.Module:
    """A linear classifier: with two classes the CE input gradient keeps one sign per coordinate."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], num_classes))


def batch(n: int = 16, seed: int = 0, lo: float = 0.0, hi: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, *SHAPE, generator=g)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=g)


METHODS: dict[str, Callable[[nn.Module, str], AdversarialModule]] = {
    "standard": lambda net, norm: StandardModule(net, norm=norm, **FAST_EVAL),
    "pgd_at": lambda net, norm: PGDATModule(net, norm=norm, eps=0.1, nb_iter=3, **FAST_EVAL),
    "pgdls": lambda net, norm: PGDLSModule(net, norm=norm, eps=0.1, nb_iter=3, ramp_fraction=0.5, **FAST_EVAL),
    "trades": lambda net, norm: TRADESModule(net, norm=norm, eps=0.1, nb_iter=3, beta=6.0, **FAST_EVAL),
    "mma": lambda net, norm: MMAModule(net, norm=norm, max_eps=0.2, min_eps=0.05, nb_iter=3, search_steps=3,
                                       **FAST_EVAL),
    "omma": lambda net, norm: MMAModule(net, norm=norm, max_eps=0.2, min_eps=0.05, nb_iter=3, search_steps=3,
                                        clean_loss_coeff=0.0, **FAST_EVAL),
}


def quiet_trainer(max_steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks)


def datamodule(n: int = 64, batch_size: int = 16) -> TensorDataModule:
    x, y = batch(n, seed=3)
    return TensorDataModule(x, y, val_size=16, batch_size=batch_size)


class TrainingInputs(pl.Callback):
    """Per step: the clean batch, and the last train-mode input of the net (the point the loss is taken at)."""

    def __init__(self) -> None:
        self.clean: list[Tensor] = []
        self.trained_on: list[Tensor] = []
        self.eps: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, b, batch_idx: int) -> None:
        self.clean.append(b[0].clone())
        self.eps.append(float(module.training_eps()))
        self.handle = module.net.register_forward_pre_hook(self._hook)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, out, b, batch_idx: int) -> None:
        self.handle.remove()

    def _hook(self, net: nn.Module, args: tuple[Tensor, ...]) -> None:
        if net.training:
            self.trained_on.append(args[0].detach().clone())


# --- every method trains ------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_fits_a_few_steps(method: str, norm: str) -> None:
    module = METHODS[method](tiny_net(), norm)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, datamodule=datamodule())
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters())), "no parameter moved"
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for name in module.train_stat_names:  # logged (MMA's avg_eps is NaN while no row is correct)
        assert f"train/{name}_step" in metrics, name
    for name in ("val/acc", "val/robust_acc", "val/avg_eps"):
        assert torch.isfinite(metrics[name]), name
    assert all(m.training for m in module.net.modules()), "a method left the net in eval mode"


# --- PGD-AT -----------------------------------------------------------------------------------------------
def captured_training_point(module: AdversarialModule, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``training_loss`` on ``(x, y)`` and the last input the net saw in train mode."""
    seen: list[Tensor] = []
    handle = module.net.register_forward_pre_hook(
        lambda net, args: seen.append(args[0].detach().clone()) if net.training else None)
    try:
        loss = module.training_loss(x, y, None)
    finally:
        handle.remove()
    return loss, seen[-1]


def test_pgd_at_linf_points_lie_on_the_ball_boundary_or_the_box() -> None:
    eps = 0.1
    module = PGDATModule(linear_net(), norm="linf", eps=eps, nb_iter=10)
    x, _ = batch(32)
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(5))
    loss, x_adv = captured_training_point(module, x, y)
    delta = x_adv - x
    on_sphere = (delta.abs() - eps).abs() < 1e-6
    on_box = (x_adv == 0) | (x_adv == 1)
    assert (on_sphere | on_box).all()
    assert (delta.abs() <= eps + 1e-6).all()
    assert on_box.any() and on_sphere.float().mean() > 0.5  # both cases occur: the check is not vacuous
    assert torch.allclose(loss, F.cross_entropy(module.net(x_adv), y))


def test_pgd_at_l2_points_lie_on_the_ball_boundary() -> None:
    eps = 0.5  # inputs in [0.3, 0.7]: the L2 ball of radius 0.5 never reaches the box's faces
    module = PGDATModule(linear_net(), norm="l2", eps=eps, nb_iter=10)
    x, _ = batch(32, lo=0.3, hi=0.7)
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(5))
    loss, x_adv = captured_training_point(module, x, y)
    assert torch.allclose(get_norm("l2").norm(x_adv - x), torch.full((32,), eps), atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(module.net(x_adv), y))


def test_pgd_at_hparams_and_attack_leave_no_side_effects() -> None:
    module = PGDATModule(tiny_net(), norm="l2", eps=0.25, nb_iter=2, rand_init=False, eval_eps=0.5)
    assert (module.hparams.eps, module.hparams.nb_iter, module.hparams.rand_init) == (0.25, 2, False)
    assert module.hparams.eval_eps == 0.5 and module.norm == "l2"
    module.net[2].eval()  # a frozen BatchNorm inside a net in train mode must stay frozen
    x, y = batch()
    module.training_loss(x, y, None)
    assert all(p.grad is None for p in module.net.parameters())
    assert [m.training for m in module.net.modules()] == [True, True, True, False, True, True]


# --- PGDLS ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, expected", [
    (dict(ramp_fraction=0.5), [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),  # 0.5 of 8 steps: ramp over 4
    (dict(ramp_fraction=0.5, ramp_steps=2), [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),  # ramp_steps wins
    (dict(ramp_fraction=0.0), [1.0] * 8),  # no ramp
])
def test_pgdls_eps_ramps_linearly_and_the_attack_uses_it(kwargs: dict, expected: list[float]) -> None:
    eps = 0.2
    module = PGDLSModule(linear_net(NUM_CLASSES), norm="linf", eps=eps, nb_iter=2, step_scale=4.0,
                         **kwargs, **FAST_EVAL)
    spy = TrainingInputs()
    trainer = quiet_trainer(max_steps=8, callbacks=[spy])
    trainer.fit(module, datamodule=datamodule())
    want = [eps * e for e in expected]
    assert spy.eps == pytest.approx(want)  # start, middle and end of the ramp
    assert float(trainer.callback_metrics["train/eps"]) == pytest.approx(want[-1])
    # The attack used the ramped radius: a 2-step Linf PGD of step 2 * eps reaches the eps sphere or the box.
    for clean, x_adv, e in zip(spy.clean, spy.trained_on, want):
        dist = get_norm("linf").norm(x_adv - clean)
        assert (dist <= e + 1e-6).all()
        assert dist.max() == pytest.approx(e, abs=1e-6)


def test_pgdls_needs_ramp_steps_outside_a_trainer() -> None:
    module = PGDLSModule(tiny_net(), eps=0.3)
    with pytest.raises(ValueError, match="ramp_steps"):
        module.training_eps()
    assert PGDLSModule(tiny_net(), eps=0.3, ramp_steps=10).training_eps() == 0.0  # global_step 0: ramp start
    assert PGDLSModule(tiny_net(), eps=0.3, ramp_steps=0).training_eps() == pytest.approx(0.3)


# --- TRADES -----------------------------------------------------------------------------------------------
def test_trades_with_beta_zero_is_standard_training() -> None:
    net = tiny_net()
    trades = TRADESModule(net, norm="linf", eps=0.1, nb_iter=3, beta=0.0)
    standard = StandardModule(copy.deepcopy(net))
    x, y = batch()
    loss_trades = trades.training_loss(x, y, None)
    loss_standard = standard.training_loss(x, y, None)
    assert torch.allclose(loss_trades, loss_standard, rtol=1e-6, atol=0)
    loss_trades.backward()
    loss_standard.backward()
    for p, q in zip(trades.net.parameters(), standard.net.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_trades_loss_is_ce_plus_beta_kl_at_a_kl_maximiser(norm: str, eps: float) -> None:
    beta = 6.0
    module = TRADESModule(tiny_net(), norm=norm, eps=eps, nb_iter=10, beta=beta)
    x, y = batch(32)
    with torch.no_grad():
        module.net(x)  # one train-mode pass so BatchNorm's running statistics are not the init ones
    module.net[2].momentum = 0.0  # keep them fixed: every eval-mode forward below sees the same net
    torch.manual_seed(0)
    loss, x_adv = captured_training_point(module, x, y)
    dist = get_norm(norm).norm(x_adv - x)
    assert (dist <= eps + 1e-5).all() and (dist > 0).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # TRADES' own formula: CE + beta * KLDivLoss(sum) / B, clean probabilities as the target.
    logits, adv_logits = module.net(x), module.net(x_adv)
    kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(adv_logits, 1), F.softmax(logits, 1)) / x.shape[0]
    assert kl > 0
    reference = F.cross_entropy(logits, y) + beta * kl
    assert torch.allclose(loss, reference, rtol=1e-5)
    # ... and the same gradient: the KL term back-propagates through the clean forward too, as in TRADES.
    params = list(module.net.parameters())
    for g, h in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-6)

    # The inner maximisation is one: in eval mode, the KL at x_adv beats random points of the same ball.
    def eval_kl(points: Tensor) -> Tensor:
        module.net.eval()
        with torch.no_grad():
            p = F.softmax(module.net(x), 1)
            out = (p * (p.log() - F.log_softmax(module.net(points), 1))).sum(1)
        module.net.train()
        return out

    random_points = (x + get_norm(norm).random_init(x, torch.full((32,), eps))).clamp(0, 1)
    assert eval_kl(x_adv).mean() > 2 * eval_kl(random_points).mean()


def test_trades_leaves_modes_and_gradients_alone() -> None:
    module = TRADESModule(tiny_net(), eps=0.1, nb_iter=2)
    module.net[2].eval()
    x, y = batch()
    module.training_loss(x, y, None)
    assert all(p.grad is None for p in module.net.parameters())
    assert [m.training for m in module.net.modules()] == [True, True, True, False, True, True]


# --- MMA and OMMA -----------------------------------------------------------------------------------------
def mma(net: nn.Module, c: float, n: int, **kwargs) -> MMAModule:
    defaults = dict(max_eps=0.2, min_eps=0.05, nb_iter=3, search_steps=3)
    return MMAModule(net, norm="linf", clean_loss_coeff=c, num_train_samples=n, **{**defaults, **kwargs})


@pytest.mark.parametrize("c", [1.0 / 3.0, 0.0])
def test_mma_loss_on_an_all_wrong_batch_is_the_clean_ce(c: float) -> None:
    net = tiny_net()
    x, _ = batch()
    with torch.no_grad():
        y = (net(x).argmax(1) + 1) % NUM_CLASSES  # every sample misclassified, so SLM >= 0 everywhere
    module = mma(net, c, n=len(x))
    module.eps_store.update(torch.arange(len(x)), torch.full((len(x),), 0.15))
    loss = module.training_loss(x, y, torch.arange(len(x)))
    assert torch.allclose(loss, F.cross_entropy(net(x), y), rtol=1e-6)
    assert (module.eps_store.lookup(torch.arange(len(x))) == 0).all()  # wrong rows restart at min_eps


def test_omma_ignores_the_clean_loss() -> None:
    # Two linear classes and points far from the boundary: every row is correct and hinged out (eps* >= d_max),
    # so L_mma = 0: OMMA's loss is 0 while MMA keeps c * L_clean > 0.
    net = linear_net(2)
    with torch.no_grad():
        net[1].weight.mul_(20)
    x, _ = batch(64)
    with torch.no_grad():
        logits = net(x)
        w = net[1].weight[1] - net[1].weight[0]
        margin = (logits[:, 1] - logits[:, 0]).abs() / w.abs().sum()  # exact Linf margin
    keep = margin > 0.02
    x, y = x[keep], logits[keep].argmax(1)
    assert len(x) >= 8
    index = torch.arange(len(x))
    clean = F.cross_entropy(net(x), y)
    assert clean > 0
    omma = mma(net, 0.0, len(x), max_eps=0.01, min_eps=0.005)
    assert omma.training_loss(x, y, index) == 0
    assert (omma.eps_store.lookup(index) >= 0.01).all()  # all hinged out
    mma_c = mma(net, 1.0 / 3.0, len(x), max_eps=0.01, min_eps=0.005)
    assert torch.allclose(mma_c.training_loss(x, y, index), clean / 3)


def test_mma_loss_mixes_omma_loss_and_clean_ce() -> None:
    net = tiny_net()
    with torch.no_grad():
        net[-1].weight.mul_(10)  # confident predictions: SLM < 0 for the rows labelled as predicted
    x, y = batch()
    with torch.no_grad():
        y[::2] = net(x[::2]).argmax(1)  # half the rows correct (margin search), the others mostly wrong
    index = torch.arange(len(x))
    c = 0.25
    twin = copy.deepcopy(net)  # train-mode forwards move BatchNorm's running stats: each module its own copy
    torch.manual_seed(7)
    omma = mma(net, 0.0, len(x))
    omma_loss = omma.training_loss(x, y, index)
    torch.manual_seed(7)
    mma_loss = mma(twin, c, len(x)).training_loss(x, y, index)
    clean = F.cross_entropy(net(x), y)
    assert torch.allclose(mma_loss, (1 - c) * omma_loss + c * clean, rtol=1e-5)
    assert not torch.allclose(omma_loss, clean)  # the margin term is not the clean CE here
    assert (omma.eps_store.lookup(index) > 0).any()


# --- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, name", [
    (StandardModule, dict(norm="l1"), "norm"),
    (PGDATModule, dict(eps=-0.1), "eps"),
    (PGDATModule, dict(nb_iter=0), "nb_iter"),
    (PGDATModule, dict(nb_iter=2.5), "nb_iter"),
    (PGDATModule, dict(step_scale=0.0), "step_scale"),
    (PGDATModule, dict(norm="linf2"), "norm"),
    (PGDLSModule, dict(ramp_fraction=1.5), "ramp_fraction"),
    (PGDLSModule, dict(ramp_steps=-1), "ramp_steps"),
    (PGDLSModule, dict(eps=-1.0), "eps"),
    (TRADESModule, dict(beta=-1.0), "beta"),
    (TRADESModule, dict(eps=-0.1), "eps"),
    (TRADESModule, dict(nb_iter=0), "nb_iter"),
    (TRADESModule, dict(scheduler_interval="batch"), "scheduler_interval"),
])
def test_bad_input_is_a_value_error_naming_the_parameter(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(tiny_net(), **kwargs)


def test_hparams_mirror_each_init() -> None:
    module = PGDLSModule(tiny_net(), eps=0.2, nb_iter=5, ramp_fraction=0.3, ramp_steps=7, clip_min=None,
                         clip_max=None)
    hp = module.hparams
    assert (hp.eps, hp.nb_iter, hp.ramp_fraction, hp.ramp_steps, hp.clip_min) == (0.2, 5, 0.3, 7, None)
    assert TRADESModule(tiny_net(), beta=1.0, step_scale=2.0).hparams.beta == 1.0
    assert "net" not in hp and "optimizer" not in hp


# --- DDP ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_under_two_process_ddp(method: str) -> None:
    module = METHODS[method](tiny_net(), "linf")
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule(n=80, batch_size=32))  # 64 train samples: 2 steps of 16 a rank
    # ddp_spawn sends rank 0's weights back to this process (not the trainer's step counter).
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters())), "no parameter moved"
