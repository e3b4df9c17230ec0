"""The two margin searches: the reference's bisection (replayed bit for bit) and ours ("refined"), whose
margins on linear models are exact; the reference's L2 random start; the reference's train-mode subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mma_lightning.attacks import find_margin, get_norm
from mma_lightning.attacks.boundary import min_norm_to_hyperplane
from test_attacks import linear_problem

DUAL = {"linf": 1.0, "l2": 2.0}
REPLAY = Path(__file__).parent / "data" / "bisection_replay.pt"


def multiclass_problem(norm: str, seed: int = 0, d: int = 50, k: int = 10, n: int = 128):
    """Exact margin of a k-class linear model: the distance to the nearest half-space z_j >= z_y."""
    torch.manual_seed(seed)
    model = nn.Linear(d, k)
    x = torch.randn(n, d)
    with torch.no_grad():
        y = model(x).argmax(1)
        dw = model.weight.unsqueeze(0) - model.weight[y].unsqueeze(1)
        gap = (x.unsqueeze(1) * dw).sum(-1) + model.bias.unsqueeze(0) - model.bias[y].unsqueeze(1)
        dist = (gap.abs() / dw.norm(p=DUAL[norm], dim=-1).clamp_min(1e-12)).scatter(1, y.unsqueeze(1), 1e9)
    return model, x, y, dist.amin(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("rand_init", [False, True])
def test_refined_binary_linear_margins_are_exact_and_never_below(norm: str, rand_init: bool) -> None:
    model, x, y, exact = linear_problem(seed=3)
    true = exact[norm]
    res = find_margin(model, x, y, norm=norm, init_eps=float(true.median()), max_eps=float(2 * true.max()),
                      nb_iter=10, rand_init=rand_init, clip_min=None, clip_max=None, search="refined",
                      generator=torch.Generator().manual_seed(0))
    assert res.success.all()
    rel = res.eps / true - 1
    assert rel.max() < 0.01, f"max overestimate {rel.max():.2e}"
    assert (rel > -1e-5).all(), "a success below the true margin"
    assert (model(res.x_adv).argmax(1) != y).all()
    assert (get_norm(norm).norm(res.x_adv - x) <= res.eps + 1e-6).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_refined_multiclass_linear_margins_within_two_percent(norm: str) -> None:
    model, x, y, exact = multiclass_problem(norm)
    init = 0.05 if norm == "linf" else 0.15
    common = dict(norm=norm, init_eps=init, max_eps=float(2 * exact.max()), nb_iter=40, clip_min=None,
                  clip_max=None, generator=torch.Generator().manual_seed(0))
    refined = find_margin(model, x, y, search="refined", **common)
    bisection = find_margin(model, x, y, search="bisection", **common)
    assert refined.success.all()
    ratio = refined.eps / exact
    # Never below the truth, up to float32 rounding: the steps land on the boundary itself, and x + delta is
    # rounded to x's precision (1e-4 relative on the smallest margins here, 0.005).
    assert ratio.median() <= 1.02 and ratio.min() > 1 - 1e-4
    assert (bisection.eps / exact).median() > 1.1  # the single ray alone is far off: the test can fail


def test_refined_cheap_budget_matches_bisection_with_half_the_forwards() -> None:
    model, x, y, exact = multiclass_problem("linf", seed=1)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    common = dict(norm="linf", init_eps=0.05, max_eps=float(2 * exact.max()), nb_iter=40, clip_min=None,
                  clip_max=None, generator=torch.Generator().manual_seed(0))
    bis = find_margin(model, x, y, search="bisection", **common)
    n_bis = calls.count(False)
    calls.clear()
    cheap = find_margin(model, x, y, search="refined", root_steps=5, refine_steps=0, **common)
    n_cheap = calls.count(False)
    assert n_bis - n_cheap == 10 - 5  # 10 bisection forwards, 5 root-finder forwards (same clean forward)
    assert ((cheap.eps / bis.eps).median() - 1).abs() < 0.005


def test_bisection_replays_the_recorded_reference_search() -> None:
    """Recorded before the refined search existed: the default search must stay the same. The bisection's
    eps and success are compared bit for bit; x_adv up to one float32 rounding (6e-8), since the L2 norms
    behind the ray are reductions whose rounding depends on the CPU's vector width (seen: 71 of 864 entries
    of one L2 case differ by one ulp on another Xeon)."""
    rec = torch.load(REPLAY)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4))
    model.load_state_dict(rec["state_dict"])
    cases = {
        "linf_rand_argmax": dict(norm="linf", init_eps=torch.linspace(0.02, 0.2, 24), max_eps=0.5,
                                 rand_init=True, success="argmax"),
        "linf_rand_slm": dict(norm="linf", init_eps=0.05, max_eps=0.4, rand_init=True, success="slm"),
        "l2_norand_argmax": dict(norm="l2", init_eps=torch.linspace(0.2, 1.5, 24), max_eps=3.0,
                                 rand_init=False, success="argmax"),
        "l2_norand_slm_ce": dict(norm="l2", init_eps=0.5, max_eps=2.0, rand_init=False, success="slm",
                                 loss="ce"),
    }
    for name, kwargs in cases.items():
        res = find_margin(model, rec["x"], rec["y"], nb_iter=7, search_steps=6,
                          generator=torch.Generator().manual_seed(5), **kwargs)
        want = rec["results"][name]
        assert torch.equal(res.eps, want["eps"]), name
        torch.testing.assert_close(res.x_adv, want["x_adv"], rtol=0, atol=1.2e-7, msg=name)
        assert torch.equal(res.success, want["success"]), name


def reference_l2_start(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """advertorch 0.2.2 ``rand_init_delta`` for ord 2, written from its source: uniform in the box, minus x,
    ``clamp_by_pnorm`` to eps, then clipped to the box."""
    delta = torch.empty_like(x).uniform_(0.0, 1.0, generator=gen) - x
    norm = delta.flatten(1).norm(dim=1)
    delta = delta * torch.min(eps / norm, torch.ones_like(norm)).reshape(-1, 1, 1, 1)
    return (x + delta).clamp(0.0, 1.0) - x


def test_l2_random_start_is_the_reference_start() -> None:
    torch.manual_seed(0)
    x = (torch.rand(512, 1, 28, 28) > 0.8).float() * torch.rand(512, 1, 28, 28)  # sparse, MNIST-like
    eps = torch.full((512,), 2.0)
    ours = get_norm("l2").random_init(x, eps, torch.Generator().manual_seed(1), 0.0, 1.0)
    ref = reference_l2_start(x, 2.0, torch.Generator().manual_seed(2))
    assert ((x + ours) >= 0).all() and ((x + ours) <= 1).all()
    n_ours, n_ref = ours.flatten(1).norm(dim=1), ref.flatten(1).norm(dim=1)
    assert torch.allclose(n_ours, eps, rtol=1e-5)  # on the sphere: the box never forces a shrink here
    assert abs(n_ours.mean() - n_ref.mean()) < 1e-3
    # Same distribution: per-pixel means and spreads agree (the start points towards the box's centre).
    assert (ours.mean(0) - ref.mean(0)).abs().max() < 0.01
    assert abs(ours.std() - ref.std()) < 0.002
    # The old start (uniform in the ball, then box-clipped) is what the issue measured: far inside.
    old = get_norm("l2").random_init(x, eps, torch.Generator().manual_seed(1))
    assert ((x + old).clamp(0, 1) - x).flatten(1).norm(dim=1).mean() < 1.6


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_min_norm_to_hyperplane_in_a_box(norm: str) -> None:
    torch.manual_seed(0)
    grad = torch.randn(64, 30)
    x = torch.rand(64, 30)
    target = torch.rand(64) * 0.5
    delta = min_norm_to_hyperplane(get_norm(norm), grad, target, -x, 1 - x)
    assert ((x + delta) >= -1e-7).all() and ((x + delta) <= 1 + 1e-7).all()
    reached = (grad * delta).sum(1)
    reachable = (grad.clamp_min(0) * (1 - x) + grad.clamp_max(0) * (-x)).sum(1) > target
    assert torch.allclose(reached[reachable], target[reachable], rtol=1e-4, atol=1e-6)
    # No feasible point of smaller norm: random feasible points (rescaled onto the plane) are never shorter.
    geometry = get_norm(norm)
    for _ in range(20):
        other = torch.randn(64, 30).mul(0.3).clamp(-x, 1 - x)
        scale = target / (grad * other).sum(1)
        other = other * scale.unsqueeze(1)
        ok = reachable & (scale > 0) & ((x + other) >= 0).all(1) & ((x + other) <= 1).all(1)
        assert (geometry.norm(other)[ok] >= geometry.norm(delta)[ok] - 1e-5).all()


def test_train_mode_search_forwards_only_the_correct_rows() -> None:
    """The reference's train-mode search sees only the correct subset (BatchNorm statistics are theirs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3  # five rows misclassified from the start
    sizes = []
    model.register_forward_pre_hook(lambda m, inp: sizes.append((m.training, inp[0].shape[0])))
    find_margin(model, x, y, init_eps=0.1, max_eps=2.0, nb_iter=2, search_steps=4, search_train_mode=True,
                clip_min=None, clip_max=None, clean_logits=model(x))
    train_sizes = [n for training, n in sizes if training]
    assert train_sizes == [11] * 4
    assert not model.training


def test_mma_module_trains_with_the_refined_search_and_refuses_an_unknown_one() -> None:
    from mma_lightning import MMAModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y, index = torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,)), torch.arange(12)
    for search in ("bisection", "refined"):
        module = MMAModule(net, max_eps=0.5, min_eps=0.05, nb_iter=3, search=search, refine_steps=2,
                           num_train_samples=12)
        loss = module.training_loss(x, y, index)
        assert torch.isfinite(loss) and loss.requires_grad
        assert (module.eps_store.eps <= 1.05 * 0.5 + 1e-6).all()
    with pytest.raises(ValueError, match=r"search must be one of \['bisection', 'refined'\]"):
        MMAModule(net, search="fab")
    with pytest.raises(ValueError, match=r"eval_search must be one of"):
        MMAModule(net, eval_search="fab")
    with pytest.raises(ValueError, match=r"eval_loss must be one of"):
        MMAModule(net, eval_loss="margin")


def test_refined_success_at_the_far_end_of_the_ray_is_a_verified_point() -> None:
    """Regression: a first adversarial trial at t = max_eps must set the returned point, not only success."""
    model, x, y, exact = linear_problem(seed=4, n=32)
    true = exact["linf"]
    res = find_margin(model, x, y, norm="linf", init_eps=0.1 * true, max_eps=1.01 * true, nb_iter=5,
                      rand_init=False, clip_min=None, clip_max=None, search="refined", root_steps=2,
                      refine_steps=0)
    assert res.success.all()
    assert (model(res.x_adv).argmax(1) != y).all()
    # eps is capped at max_eps; x + t u - x measures t up to the rounding of x (1e-4 relative here).
    assert (get_norm("linf").norm(res.x_adv - x) <= res.eps * (1 + 1e-3)).all()


@pytest.mark.parametrize("norm, init, upper", [("linf", 0.02, 1.0), ("l2", 0.1, 5.0)])
def test_refined_stages_only_tighten_and_the_fmn_steps_help(norm: str, init: float, upper: float) -> None:
    """refine_steps=0 (root-finder), 1 (+ the boundary step), 6 (+ five FMN steps) from the same PGD ray:
    each stage keeps the previous stage's verified point unless it finds a smaller one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    net.requires_grad_(False)
    x = torch.rand(128, 20)
    y = net(x).argmax(1)
    res = {k: find_margin(net, x, y, norm=norm, init_eps=init, max_eps=upper, nb_iter=10, search="refined",
                          refine_steps=k, generator=torch.Generator().manual_seed(0)) for k in (0, 1, 6)}
    for r in res.values():
        assert r.success.all()
        assert (net(r.x_adv).argmax(1) != y).all()
        assert (get_norm(norm).norm(r.x_adv - x) <= r.eps + 1e-6).all()
    assert (res[1].eps <= res[0].eps).all() and (res[6].eps <= res[1].eps).all()
    assert (res[6].eps / res[0].eps).median() < 0.95  # the refinement does something on a curved model
    assert (res[6].eps < res[1].eps * (1 - 1e-3)).float().mean() > 0.2  # and so do the FMN steps
