"""How close ``find_margin`` gets to the true margin, and what it costs: ``"bisection"`` vs ``"refined"``.

Both searches side by side, in one run, both norms, on
(a) multiclass linear models (d = 50, 10 classes, no box), whose margins are exact in closed form:
    ``min_j |(w_j - w_y) x + b_j - b_y| / ||w_j - w_y||_q`` (q the dual norm);
(b) an MLP and a small CNN trained on real Fashion-MNIST (the Debian files), against a strong estimate built
    independently of both searches: a bisection over the radius with, at every radius, a full PGD run with
    restarts (CE and CW losses, random starts, step ``2.5 eps / K``); a point is "robust" at a radius only
    if every restart fails.
It prints the median and p90 of estimate / exact (or / strong), the fraction found, the fraction of points where
the estimate is below the strong one (the strong estimate is an upper bound too, not the truth), forwards and
backwards per sample (counted by a forward hook: every grad-enabled forward is followed by one input-gradient
backward), and the wall-time ratio of whole ``find_margin`` calls on the same CNN batch at K = 10 (calls
alternated, median of ``--reps``).

Trained models are searched twice: "cold", from one small init eps for every point (0.02 Linf, 0.3 L2), and
"warm", from a previous estimate of the same point (MMA's regime: each sample starts at its remembered eps).

Usage: ``python benchmarks/margin_search.py [--reps 9] [--points 200] [--quick]`` (about 10 minutes on an idle
2-core CPU; the strong estimate is most of it).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mma_lightning.attacks import find_margin, get_norm, pgd

FASHION = Path("/usr/share/datasets/fashion-mnist")
DUAL = {"linf": 1.0, "l2": 2.0}
SEARCHES: dict[str, dict[str, Any]] = {
    "bisection": {"search": "bisection"},
    "refined": {"search": "refined"},
    "refined, root-finder only": {"search": "refined", "root_steps": 5, "refine_steps": 0},
}


class PassCounter:
    """Counts forward rows of a model, split into grad-enabled (followed by a backward) and no-grad."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        model.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        self.forward += inputs[0].shape[0]
        self.backward += inputs[0].shape[0] if torch.is_grad_enabled() and inputs[0].requires_grad else 0

    def reset(self) -> None:
        self.forward = self.backward = 0


def read_idx(path: Path) -> Tensor:
    """An IDX ``.gz`` file (the format of the Fashion-MNIST files) as a uint8 tensor."""
    data = gzip.open(path).read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def fashion(split: str, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of a Fashion-MNIST split in [0, 1], shape [n, 1, 28, 28]."""
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:n].float().div(255).unsqueeze(1)
    y = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:n].long()
    return x, y


def train(net: nn.Module, x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    """Standard training with Adam, batch 100."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(100):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval().requires_grad_(False)


def strong_margin(model: nn.Module, x: Tensor, y: Tensor, norm: str, upper: float, steps: int, nb_iter: int,
                  restarts: int) -> Tensor:
    """Bisection over the radius; at each radius PGD with ``restarts`` random starts per loss (CE, CW)."""
    lo, hi = torch.zeros(len(x)), torch.full((len(x),), upper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        broken = model(x).argmax(1) != y
        for loss in ("ce", "cw"):
            for _r in range(restarts):
                x_adv = pgd(model, x, y, norm, eps=mid, nb_iter=nb_iter, loss=loss, generator=gen)
                broken |= model(x_adv).argmax(1) != y
        hi, lo = torch.where(broken, mid, hi), torch.where(broken, lo, mid)
    return hi


def linear_problem(norm: str, seed: int, n: int = 256, d: int = 50, k: int = 10):
    """A random 10-class linear model, points labelled as predicted, and their exact margins."""
    torch.manual_seed(seed)
    model = nn.Linear(d, k).requires_grad_(False)
    x = torch.randn(n, d)
    y = model(x).argmax(1)
    w, b = model.weight, model.bias
    dw = w.unsqueeze(0) - w[y].unsqueeze(1)                     # [n, k, d]
    gap = (x.unsqueeze(1) * dw).sum(-1) + b.unsqueeze(0) - b[y].unsqueeze(1)
    dist = gap.abs() / dw.norm(p=DUAL[norm], dim=-1).clamp_min(1e-12)
    dist = dist.scatter(1, y.unsqueeze(1), float("inf"))
    return model, x, y, dist.amin(1)


def summarise(ratio: Tensor) -> str:
    q = torch.quantile(ratio, torch.tensor([0.5, 0.9]))
    return f"median {q[0]:.4f}  p90 {q[1]:.4f}"


def run_searches(model: nn.Module, x: Tensor, y: Tensor, truth: Tensor, norm: str, init: float | Tensor,
                 upper: float, nb_iter: int, box: bool, rand_init: bool, label: str) -> None:
    counter = PassCounter(model)
    correct = model(x).argmax(1) == y
    for name, kw in SEARCHES.items():
        counter.reset()
        res = find_margin(model, x, y, norm, init_eps=init, max_eps=upper, nb_iter=nb_iter, search_steps=10,
                          rand_init=rand_init, clip_min=0.0 if box else None, clip_max=1.0 if box else None,
                          generator=torch.Generator().manual_seed(0), **kw)
        adv = model(res.x_adv).argmax(1) != y
        ok = bool((adv | ~res.success).all()) and bool(
            (get_norm(norm).norm(res.x_adv - x)[res.success] <= res.eps[res.success] + 1e-5).all())
        m = correct & res.success & (truth < upper)
        ratio = res.eps[m] / truth[m]
        print(f"  {label:<28} {name:<26} {summarise(ratio)}  found {res.success[correct].float().mean():.3f}  "
              f"below-ref {(ratio < 1 - 1e-4).float().mean():.3f}  fwd/sample {counter.forward / len(x):5.1f}  "
              f"bwd/sample {counter.backward / len(x):5.1f}  verified {ok}")


def time_calls(model: nn.Module, x: Tensor, y: Tensor, norm: str, init: float, upper: float, reps: int) -> None:
    """Alternate whole find_margin calls (K = 10) of each search on the same batch; medians."""
    times: dict[str, list[float]] = {name: [] for name in SEARCHES}
    for _ in range(reps):
        for name, kw in SEARCHES.items():
            t0 = time.perf_counter()
            find_margin(model, x, y, norm, init_eps=init, max_eps=upper, nb_iter=10, search_steps=10, **kw)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bisection"])
    for name, ts in times.items():
        print(f"  {norm:<5} {name:<26} median {statistics.median(ts) * 1e3:7.1f} ms   / bisection "
              f"{statistics.median(ts) / base:.3f}   ({reps} alternated runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="smaller strong estimate (for a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("(a) multiclass linear models, d = 50, 10 classes, exact margins; K = 40, S = 10")
    for norm, init in (("linf", 0.05), ("l2", 0.15)):
        for rand_init in (False, True):
            model, x, y, exact = linear_problem(norm, seed=0)
            run_searches(model, x, y, exact, norm, init, float(2 * exact.max()), 40, box=False,
                         rand_init=rand_init, label=f"{norm} {'random start' if rand_init else 'no random start'}")

    x_train, y_train = fashion("train", 10000)
    x_test, y_test = fashion("test", args.points)
    torch.manual_seed(0)
    nets: dict[str, Callable[[], nn.Module]] = {
        "MLP 784-256-256-10": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                                                   nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)),
        "CNN 2 conv + 1 fc": lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                                  nn.Flatten(), nn.Linear(32 * 7 * 7, 10)),
    }
    steps, nb_iter, restarts = (8, 20, 1) if args.quick else (10, 50, 2)
    print(f"(b) Fashion-MNIST, {args.points} test points; strong estimate: {steps} bisection steps over the "
          f"radius x {restarts} restarts x (CE, CW) x {nb_iter}-step PGD; searches: K = 40, S = 10")
    trained = {}
    for name, make in nets.items():
        net = train(make(), x_train, y_train, epochs=2)
        trained[name] = net
        acc = (net(x_test).argmax(1) == y_test).float().mean()
        for norm, init, upper in (("linf", 0.02, 0.3), ("l2", 0.3, 4.0)):
            strong = strong_margin(net, x_test, y_test, norm, upper, steps, nb_iter, restarts)
            run_searches(net, x_test, y_test, strong, norm, init, upper, 40, box=True, rand_init=True,
                         label=f"{name} {norm} cold (acc {acc:.2f})")
            # Warm: init = a previous estimate, as MMA's remembered eps on a sample's next visit.
            warm = find_margin(net, x_test, y_test, norm, init_eps=init, max_eps=upper, nb_iter=40,
                               generator=torch.Generator().manual_seed(1)).eps.clamp(min=init)
            run_searches(net, x_test, y_test, strong, norm, warm, upper, 40, box=True, rand_init=True,
                         label=f"{name} {norm} warm")

    print("(c) wall time of one find_margin call, CNN, batch 128, K = 10")
    cnn = trained["CNN 2 conv + 1 fc"]
    for norm, init, upper in (("linf", 0.02, 0.3), ("l2", 0.3, 4.0)):
        time_calls(cnn, x_test[:128], y_test[:128], norm, init, upper, args.reps)


if __name__ == "__main__":
    main()
