"""The margin search under bfloat16 autocast (``bf16-mixed``): its forwards run in float32, PGD's stay in bf16.

Under autocast the model's input is rounded to bfloat16 (steps of 0.004 for pixels in [0.5, 1)), so a bisection
in bfloat16 resolves the crossing more coarsely than its final bracket says (attacks/line_search.py,
"Precision"; benchmarks/bf16_margins.py measures it on LeNet5 and WRN-28-4). From the same ray, the search
under autocast must agree with float32 within its bracket; the search must stay one capturable graph and leave
the model as it found it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mma_lightning.attacks import find_margin, get_norm, pgd
from mma_lightning.attacks.line_search import bisect_ray, outside_autocast, root_find_ray
from mma_lightning.attacks.losses import SUCCESS_MARGINS, SUCCESS_TESTS

STEPS = 10
INIT, UPPER = 0.02, 0.3


def conv_net() -> nn.Sequential:
    """A tiny CNN whose logits are as large as a trained net's (the last layer scaled up): the soft margin
    SLM < 0 on most points, and bfloat16's rounding of them matters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    head = net[-1]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.mul_(60)
        head.bias.mul_(60)
    return net.eval()


def batch(n: int = 128) -> tuple[nn.Sequential, Tensor, Tensor]:
    """Pixels in [0.5, 1] (bfloat16's coarsest steps inside the box), labelled by the net itself."""
    net = conv_net()
    x = 0.5 + 0.5 * torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def pgd_ray(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """A float32 PGD direction at radius INIT (the ray both precisions then search)."""
    x_pgd = pgd(net, x, y, "linf", eps=INIT, nb_iter=5, loss="slm", generator=torch.Generator().manual_seed(0))
    return (x_pgd - x) / INIT


def test_bisection_under_bf16_agrees_with_float32_within_its_bracket() -> None:
    net, x, y = batch()
    direction = pgd_ray(net, x, y)
    init, upper = torch.full((x.shape[0],), INIT), torch.full((x.shape[0],), UPPER)
    is_adv = SUCCESS_TESTS["slm"]

    def search(full_precision: bool = True) -> tuple[Tensor, Tensor]:
        hi, found, _ = bisect_ray(net, x, y, direction, init, upper, STEPS, is_adv, 0.0, 1.0,
                                  full_precision=full_precision)
        return hi, found

    hi32, found32 = search()
    with bf16():
        hi16, found16 = search()
        hi16_before, found16_before = search(full_precision=False)
    with torch.no_grad():
        correct = ~is_adv(net(x), y)
    inside = correct & found32 & found16_before
    assert inside.float().mean() > 0.5  # most points are correct and their rays cross the boundary
    # the final bracket: [0, init] or [init, upper] halved STEPS - 1 times
    width = torch.where(hi32 <= init, init, upper - init) / 2 ** (STEPS - 1)
    assert torch.equal(found16, found32)
    assert ((hi16 - hi32).abs() <= width).all()
    # the test can fail: with the forwards in bfloat16 the boundary moves by more than the bracket
    beyond = ((hi16_before - hi32).abs() > 1.001 * width) & inside
    assert beyond.float().mean() > 0.2, f"{beyond.float().mean():.2%}"


def test_root_finder_under_bf16_agrees_with_float32() -> None:
    net, x, y = batch()
    direction = pgd_ray(net, x, y)
    init, upper = torch.full((x.shape[0],), INIT), torch.full((x.shape[0],), UPPER)
    margin_fn, is_adv = SUCCESS_MARGINS["slm"], SUCCESS_TESTS["slm"]
    with torch.no_grad():
        clean = margin_fn(net(x), y)
    hi32, found32, x32 = root_find_ray(net, x, y, direction, init, upper, 5, margin_fn, is_adv, clean, 0.0, 1.0)
    with bf16():
        hi16, found16, x16 = root_find_ray(net, x, y, direction, init, upper, 5, margin_fn, is_adv, clean, 0.0,
                                           1.0)
    assert found32.float().mean() > 0.5
    assert torch.equal(found16, found32) and torch.equal(hi16, hi32) and torch.equal(x16, x32)


@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_pgd_runs_in_bf16_and_the_search_in_float32(search: str) -> None:
    """A forward hook on the last layer: PGD's K grad-enabled forwards give bfloat16 logits, every forward
    of the search (bisection; root-finder, boundary and FMN steps) float32."""
    net, x, y = batch(16)
    seen: list[tuple[bool, torch.dtype]] = []
    net[-1].register_forward_hook(lambda m, i, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    with bf16():
        clean = net(x)
        seen.clear()
        find_margin(net, x, y, "linf", init_eps=INIT, max_eps=UPPER, nb_iter=4, search_steps=STEPS, loss="slm",
                    success="slm", clean_logits=clean, search=search, root_steps=3, refine_steps=3,
                    generator=torch.Generator().manual_seed(0))
    assert seen[:4] == [(True, torch.bfloat16)] * 4
    assert {dtype for _, dtype in seen[4:]} == {torch.float32}
    assert len(seen) == 4 + (STEPS if search == "bisection" else 3 + 3 + 2)


@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_search_under_autocast_compiles_as_one_graph_and_matches_eager(search: str) -> None:
    """``fullgraph=True`` raises on any graph break (a host sync, an untraceable context): the autocast switch
    is a region of the graph, and the captured search computes what the eager one does."""
    torch._dynamo.reset()
    net, x, y = batch(16)
    noise = get_norm("linf").start_noise(x, torch.Generator().manual_seed(0))

    def margins(x: Tensor, y: Tensor, noise: tuple[Tensor, ...]) -> Tensor:
        with torch.no_grad():
            clean = net(x)
        return find_margin(net, x, y, "linf", init_eps=INIT, max_eps=UPPER, nb_iter=2, search_steps=3,
                           loss="slm", success="slm", clean_logits=clean, search=search, root_steps=2,
                           refine_steps=2, start_noise=noise).eps

    compiled = torch.compile(margins, fullgraph=True, backend="eager")
    with bf16():
        eager = margins(x, y, noise)
        captured = compiled(x, y, noise)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    torch.testing.assert_close(captured, eager, rtol=0, atol=1e-7)


@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_search_under_autocast_leaves_modes_grads_and_autocast_as_they_were(search: str) -> None:
    net, x, y = batch(16)
    bn, conv = net[1], net[0]
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
    net.train()
    bn.eval()  # a frozen BatchNorm inside a model in train mode
    conv.weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    assert bn.running_mean is not None
    stats = bn.running_mean.clone()
    with bf16():
        find_margin(net, x, y, "linf", init_eps=INIT, max_eps=UPPER, nb_iter=3, search_steps=4, loss="slm",
                    success="slm", search=search, root_steps=2, refine_steps=2,
                    generator=torch.Generator().manual_seed(0))
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(bn.running_mean, stats)


def test_outside_autocast_is_a_no_op_without_autocast_or_when_disabled() -> None:
    x = torch.rand(2, 3)
    with outside_autocast(x):
        assert not torch.is_autocast_enabled("cpu")
    with bf16():
        with outside_autocast(x, enabled=False):
            assert torch.is_autocast_enabled("cpu")
        with outside_autocast(x):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    with outside_autocast(torch.empty(2, device="meta")):  # a device without autocast
        pass
