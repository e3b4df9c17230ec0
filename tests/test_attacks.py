"""The attacks' contract: exact margins on linear models, geometry, no side effects, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mma_lightning.attacks import L2Norm, LinfNorm, find_margin, get_norm, pgd

NORM_DUAL = {"linf": 1.0, "l2": 2.0}  # margin of w.x+b in the Lp ball = |w.x+b| / ||w||_q, 1/p + 1/q = 1


def linear_problem(d: int = 20, n: int = 128, seed: int = 0):
    """A binary linear classifier (two logits), points labelled as predicted, and their exact margins."""
    torch.manual_seed(seed)
    model = nn.Linear(d, 2)
    x = torch.randn(n, d)
    with torch.no_grad():
        y = model(x).argmax(1)
        w = model.weight[1] - model.weight[0]
        f = (x @ w + model.bias[1] - model.bias[0]).abs()
    exact = {norm: f / w.norm(p=q) for norm, q in NORM_DUAL.items()}
    return model, x, y, exact


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_find_margin_recovers_exact_linear_margin(norm: str) -> None:
    model, x, y, exact = linear_problem()
    true = exact[norm]
    res = find_margin(model, x, y, norm=norm, init_eps=float(true.median()), max_eps=float(2 * true.max()),
                      nb_iter=40, search_steps=20, rand_init=False, clip_min=None, clip_max=None)
    assert res.success.all()
    rel = (res.eps - true) / true
    assert rel.abs().max() < 0.01, f"max relative error {rel.abs().max():.2e}"
    # Never a success below the true margin (float rounding aside): every reported point is verified.
    assert (res.eps >= true * (1 - 1e-5)).all()
    dist = get_norm(norm).norm(res.x_adv - x)
    assert (dist >= true * (1 - 1e-5)).all()
    assert (model(res.x_adv).argmax(1) != y).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_find_margin_with_random_start_is_a_verified_upper_bound(norm: str) -> None:
    model, x, y, exact = linear_problem(seed=1)
    true = exact[norm]
    res = find_margin(model, x, y, norm=norm, init_eps=float(true.median()), max_eps=float(2 * true.max()),
                      nb_iter=40, search_steps=20, clip_min=None, clip_max=None,
                      generator=torch.Generator().manual_seed(0))
    assert res.success.all()
    assert (res.eps >= true * (1 - 1e-5)).all()
    # Linf sign steps reach the optimal corner; L2's random start leaves a few degrees of angle.
    assert ((res.eps - true) / true).max() < (0.01 if norm == "linf" else 0.08)


@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_find_margin_in_box_contract_on_small_cnn(search: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    for norm in ("linf", "l2"):
        res = find_margin(model, x, y, norm=norm, init_eps=0.05, max_eps=0.5 if norm == "linf" else 3.0,
                          search=search)
        pred = model(res.x_adv).argmax(1)
        clean_wrong = model(x).argmax(1) != y
        assert (res.eps[clean_wrong] == 0).all() and res.success[clean_wrong].all()
        assert torch.equal(res.x_adv[clean_wrong], x[clean_wrong])
        assert (pred[res.success] != y[res.success]).all()
        assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
        dist = get_norm(norm).norm(res.x_adv - x)
        assert (dist[res.success] <= res.eps[res.success] + 1e-6).all()
        assert (res.eps[~res.success] == (0.5 if norm == "linf" else 3.0)).all()
        assert not res.x_adv.requires_grad and not res.eps.requires_grad


@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_find_margin_reports_failure_at_max_eps(search: str) -> None:
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([100.0, 0.0]))  # class 0 everywhere in the box
    x = torch.rand(8, 4)
    y = torch.zeros(8, dtype=torch.long)
    res = find_margin(model, x, y, norm="linf", init_eps=0.1, max_eps=0.3, search=search)
    assert not res.success.any()
    assert torch.allclose(res.eps, torch.full((8,), 0.3))


def test_per_sample_init_eps_tensor() -> None:
    model, x, y, exact = linear_problem(n=16)
    init = exact["linf"].clamp_min(1e-3)  # start right at each sample's margin
    res = find_margin(model, x, y, norm="linf", init_eps=init, max_eps=float(3 * init.max()),
                      rand_init=False, clip_min=None, clip_max=None, search_steps=20)
    assert torch.allclose(res.eps, exact["linf"], rtol=0.01)


class BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("attack", ["pgd", "find_margin", "find_margin_refined"])
def test_attacks_have_no_side_effects(attack: str) -> None:
    torch.manual_seed(0)
    model = BNDropNet()
    model.train()
    model.features[1].eval()  # a frozen BN inside a model in train mode: must stay as it is
    model.head[2].weight.requires_grad_(False)
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    with torch.no_grad():  # non-trivial running stats
        model.features[1].running_mean.uniform_(-1, 1)
    flags = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    if attack == "pgd":
        pgd(model, x, y, norm="l2", eps=1.0, nb_iter=5, step_size=0.25)
    else:
        find_margin(model, x, y, norm="linf", init_eps=0.1, max_eps=0.5, nb_iter=5,
                    search="refined" if attack.endswith("refined") else "bisection")
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_reference_train_mode_search_updates_batchnorm_and_restores_flags() -> None:
    model = BNDropNet().eval()
    before = model.features[1].running_mean.clone()
    find_margin(model, torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,)), init_eps=0.1, max_eps=0.5,
                nb_iter=2, search_train_mode=True)
    assert not model.training and not model.features[1].training
    assert not torch.equal(model.features[1].running_mean, before)


def test_attacks_work_under_inference_mode() -> None:
    model = BNDropNet().eval()
    with torch.inference_mode():
        x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
        x_adv = pgd(model, x, y, eps=0.1, nb_iter=3)
        res = find_margin(model, x, y, init_eps=0.1, max_eps=0.5, nb_iter=3)
        refined = find_margin(model, x, y, init_eps=0.1, max_eps=0.5, nb_iter=3, search="refined")
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert res.eps.shape == (8,) and refined.eps.shape == (8,)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box_and_increases_loss(norm: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 5, (64,))
    eps = torch.linspace(0.0, 0.3, 64) if norm == "linf" else torch.linspace(0.0, 1.0, 64)
    x_adv = pgd(model, x, y, norm=norm, eps=eps, nb_iter=10)
    assert (get_norm(norm).norm(x_adv - x) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    ce = nn.functional.cross_entropy
    assert ce(model(x_adv), y) > ce(model(x), y)


def test_linf_geometry() -> None:
    g = LinfNorm()
    delta = torch.tensor([[0.5, -0.7, 0.1], [0.05, -0.02, 0.0]])
    eps = torch.tensor([0.3, 0.1])
    assert torch.allclose(g.project(delta, eps), torch.tensor([[0.3, -0.3, 0.1], [0.05, -0.02, 0.0]]))
    assert torch.allclose(g.norm(delta), torch.tensor([0.7, 0.05]))
    assert torch.allclose(g.step(torch.tensor([[2.0, -3.0, 0.0]] * 2), eps),
                          torch.tensor([[0.3, -0.3, 0.0], [0.1, -0.1, 0.0]]))
    r = g.random_init(torch.zeros(1000, 3), torch.full((1000,), 0.2))
    assert r.abs().max() <= 0.2 and r.abs().max() > 0.15


def test_l2_geometry() -> None:
    g = L2Norm()
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    eps = torch.tensor([1.0, 1.0])
    proj = g.project(delta, eps)
    assert torch.allclose(proj, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))  # outside: shrink; inside: kept
    assert torch.allclose(g.norm(proj), torch.tensor([1.0, 0.5]))
    step = g.step(torch.tensor([[0.0, 2.0], [1e-9, 0.0]]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(step[0], torch.tensor([0.0, 0.5]))
    assert step[1].abs().max() < 1e-2  # floor 1e-6 on the gradient norm: tiny gradients stay tiny
    r = g.random_init(torch.zeros(500, 10), torch.full((500,), 2.0))
    assert (g.norm(r) <= 2.0 + 1e-5).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(init_eps=-0.1), "init_eps must be > 0"),
        (dict(init_eps=0.6, max_eps=0.5), "max_eps must be >= init_eps"),
        (dict(y=torch.tensor([0, 1, 3, 0])), r"y must hold labels in \[0, 2\]"),
        (dict(y=torch.tensor([0, 1, 2])), "x and y must have the same length"),
        (dict(x=torch.tensor([[0.1, float("nan")]] * 4)), "x must be finite"),
        (dict(nb_iter=0), "nb_iter must be an integer >= 1"),
        (dict(search_steps=1.5), "search_steps must be an integer >= 1"),
        (dict(success="soft"), "success must be one of"),
        (dict(search="fmn"), r"search must be one of \['bisection', 'refined'\]"),
        (dict(search="refined", root_steps=0), "root_steps must be an integer >= 1"),
        (dict(search="refined", refine_steps=-1), "refine_steps must be an integer >= 0"),
        (dict(search="refined", search_train_mode=True), "search_train_mode=True .* needs search='bisection'"),
        (dict(clip_min=0.0, clip_max=None), "clip_min and clip_max"),
    ],
)
def test_find_margin_bad_input(kwargs: dict, match: str) -> None:
    model = nn.Linear(2, 3)
    args = dict(x=torch.rand(4, 2), y=torch.tensor([0, 1, 2, 0]), norm="linf", init_eps=0.1, max_eps=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        find_margin(model, **args)


def test_pgd_bad_input() -> None:
    model = nn.Linear(2, 3)
    x, y = torch.rand(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd(model, x, y, eps=-1.0)
    with pytest.raises(ValueError, match=r"eps must be a float or a tensor of shape \[N\]"):
        pgd(model, x, y, eps=torch.ones(3))
    with pytest.raises(ValueError, match="loss must be one of"):
        pgd(model, x, y, loss="hinge")


def test_fp16_autocast_scales_the_attack_objective_and_steps_ignore_the_scale() -> None:
    """docs/lightning-notes.md, item 6: under float16 autocast the attack objective is scaled so input gradients do not
    underflow; sign and normalised steps are invariant to that factor, so fp32 attacks are unchanged."""
    from mma_lightning.attacks.pgd import FP16_ATTACK_SCALE, fp16_gradient_scale

    x = torch.rand(8, 1, 4, 4)
    assert fp16_gradient_scale(x) == 1.0
    with torch.autocast("cpu", dtype=torch.float16):
        assert fp16_gradient_scale(x) == FP16_ATTACK_SCALE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp16_gradient_scale(x) == 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    y = torch.randint(0, 5, (8,))
    for norm in ("linf", "l2"):
        plain = pgd(model, x, y, norm=norm, eps=0.2, nb_iter=5, rand_init=False)
        scaled = pgd(model, x, y, norm=norm, eps=0.2, nb_iter=5, rand_init=False,
                     loss=lambda z, t: 1024.0 * nn.functional.cross_entropy(z, t, reduction="none"))
        assert torch.allclose(plain, scaled, atol=1e-6)
