"""Cost of one MMA training step relative to one K-step PGD-AT step, on the same model and batch, in one run.

Both steps are the library's own (``MMAModule.training_loss`` and ``PGDATModule.training_loss`` built on the
same ``pgd``), each followed by ``backward()`` and an optimiser step. The model is first fitted to the batch
so that every sample is correctly classified (SLM < 0) and therefore attacked. Timings are interleaved and
the median is reported. The docs' cost model: MMA = K + 13 forwards and K + 2 backwards (S = 10), PGD-AT =
K + 1 of each; targets: ratio <= 1.15 at K = 40 and <= 1.35 at K = 10.

Usage: ``python benchmarks/step_time.py [--reps 7] [--device cpu|cuda] [--only lenet|wrn]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from mma_lightning import MMAModule, PGDATModule
from mma_lightning.attacks import soft_logit_margin
from mma_lightning.methods.base import AdversarialModule
from mma_lightning.models import LeNet5Madry, wrn28_4


def clock() -> float:
    """The timer of every measurement: wall time, or this process's CPU time with ``--cpu-time``."""
    return CLOCK()


CLOCK = time.perf_counter


@dataclass
class Case:
    name: str
    make_net: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch: int
    nb_iter: int
    max_eps: float
    min_eps: float
    pgd_eps: float


CASES = {
    "lenet": Case("LeNet5-Madry, Linf, K=40, batch 50", LeNet5Madry, (1, 28, 28), 50, 40, 0.45, 0.1, 0.3),
    "wrn": Case("WRN-28-4, Linf, K=10, batch 32", wrn28_4, (3, 32, 32), 32, 10, 32 / 255, 0.005, 8 / 255),
}


def fit_to_batch(net: nn.Module, x: Tensor, y: Tensor, max_steps: int = 500) -> int:
    """Train ``net`` on the one batch until every sample has SLM < 0 (is "correct" for MMA)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for step in range(max_steps):
        net.eval()
        with torch.no_grad():
            if bool((soft_logit_margin(net(x), y) < -1.0).all()):
                return step
        net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    raise RuntimeError(f"could not fit the batch in {max_steps} steps")


class PassCounter:
    """Counts forwards (with / without autograd) and backwards through the backbone via module hooks."""

    def __init__(self, net: nn.Module) -> None:
        self.fwd_grad = self.fwd_nograd = self.bwd = 0
        self._handles = [net.register_forward_hook(self._on_forward),
                         net.register_full_backward_hook(self._on_backward)]

    def _on_forward(self, *_: object) -> None:
        if torch.is_grad_enabled():
            self.fwd_grad += 1
        else:
            self.fwd_nograd += 1

    def _on_backward(self, *_: object) -> None:
        self.bwd += 1

    def reset(self) -> None:
        self.fwd_grad = self.fwd_nograd = self.bwd = 0

    def remove(self) -> None:
        """Take the hooks off the module (they cost time in a timed step)."""
        for handle in self._handles:
            handle.remove()


def make_step(module: AdversarialModule, x: Tensor, y: Tensor, index: Tensor) -> Callable[[], None]:
    """One training step: the method's loss, backward, optimiser step (lr 0: the weights stay fixed)."""
    opt = torch.optim.SGD(module.net.parameters(), lr=0.0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module.training_loss(x, y, index).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def unit_costs(net: nn.Module, x: Tensor, y: Tensor, reps: int) -> dict[str, float]:
    """Median seconds of the three kinds of pass a step is made of, on the same model and batch."""
    ce = nn.functional.cross_entropy

    def no_grad_forward() -> None:
        with torch.no_grad():
            net(x)

    def attack_pass() -> None:  # forward + input-gradient backward (what one PGD step costs)
        delta = torch.zeros_like(x, requires_grad=True)
        torch.autograd.grad(ce(net(x + delta), y), delta)

    def training_pass() -> None:  # forward + full backward (parameter gradients)
        ce(net(x), y).backward()
        net.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("no_grad_forward", no_grad_forward), ("attack_pass", attack_pass),
                     ("training_pass", training_pass)):
        fn()
        samples = []
        for _ in range(reps):
            t0 = clock()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            samples.append(clock() - t0)
        out[name] = statistics.median(samples)
    return out


SEARCH_BUDGETS = {  # --search: the MMA margin search (find_margin's search and budget)
    "bisection": {"search": "bisection"},
    "refined": {"search": "refined"},
    "cheap": {"search": "refined", "root_steps": 5, "refine_steps": 0},  # the root-finder alone
}


def run_case(case: Case, reps: int, device: torch.device, search: str = "bisection", compile: bool = False) -> float:
    torch.manual_seed(0)
    net = case.make_net().to(device)
    x = torch.rand(case.batch, *case.shape, device=device)
    y = torch.arange(case.batch, device=device) % 10
    index = torch.arange(case.batch, device=device)
    fit_steps = fit_to_batch(net, x, y)
    net.train()
    mma = MMAModule(net, norm="linf", max_eps=case.max_eps, min_eps=case.min_eps, nb_iter=case.nb_iter,
                    num_train_samples=case.batch, **SEARCH_BUDGETS[search]).to(device)
    pgd_at = PGDATModule(net, norm="linf", eps=case.pgd_eps, nb_iter=case.nb_iter).to(device)
    # OMMA (clean_loss_coeff=0): no graph through the clean forward, so one training backward fewer than MMA.
    omma = MMAModule(net, norm="linf", max_eps=case.max_eps, min_eps=case.min_eps, nb_iter=case.nb_iter,
                     num_train_samples=case.batch, clean_loss_coeff=0.0, **SEARCH_BUDGETS[search]).to(device)
    backbone_copy = copy.deepcopy(net) if compile else None  # before the counter's hooks go on ``net``
    counter = PassCounter(net)
    steps = {"mma": make_step(mma, x, y, index), "pgd_at": make_step(pgd_at, x, y, index),
             "omma": make_step(omma, x, y, index)}
    if compile:  # the same MMA step on a compiled copy of the backbone (torch.compile, inductor)
        compiled = MMAModule(backbone_copy, norm="linf", max_eps=case.max_eps, min_eps=case.min_eps,
                             nb_iter=case.nb_iter, num_train_samples=case.batch, compile=True,
                             **SEARCH_BUDGETS[search]).to(device)
        steps["mma_compiled"] = make_step(compiled, x, y, index)
    passes = {}
    for name, step in steps.items():  # warm-up (compiles), and one counted step each
        step()
        step()
        counter.reset()
        step()
        passes[name] = (counter.fwd_grad, counter.fwd_nograd, counter.bwd)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["mma"] / med["pgd_at"]
    print(f"\n{case.name}, MMA search {search!r}, on {device} (fitted in {fit_steps} steps; every sample correct: "
          f"{bool((soft_logit_margin(net.eval()(x), y) < 0).all())})")
    for name in steps:
        fg, fn, b = passes[name]
        counted = (f"   forwards {fg + fn:3d} ({fg} with autograd, {fn} without)   backwards {b:3d}"
                   if name != "mma_compiled" else "   (hooks are on the eager backbone only)")
        print(f"  {name:12s} median {med[name] * 1e3:9.1f} ms{counted}")
    print(f"  ratio MMA / PGD-AT = {ratio:.3f}   OMMA / MMA = {med['omma'] / med['mma']:.3f}"
          + (f"   compiled MMA / eager MMA = {med['mma_compiled'] / med['mma']:.3f}" if compile else ""))
    # The floor the pass counts allow with these measured unit costs: MMA = 2 training passes (clean, mixed)
    # + K attack passes + S (=10) no-grad search forwards; PGD-AT = K attack passes + 1 training pass.
    unit = unit_costs(net.train(), x, y, reps)
    k = case.nb_iter
    fg, fn, _ = passes["mma"]  # MMA's attack passes beyond PGD's K (the refined search's boundary steps)
    extra_attack = fg - 2 - k
    floor = (2 * unit["training_pass"] + (k + extra_attack) * unit["attack_pass"]
             + fn * unit["no_grad_forward"]) / (k * unit["attack_pass"] + unit["training_pass"])
    print("  unit costs (ms): " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in unit.items()))
    print(f"  floor from the pass counts and unit costs = {floor:.3f} (measured / floor = {ratio / floor:.3f})")
    backward = unit["training_pass"] - unit["no_grad_forward"]
    print(f"  MMA - OMMA = {(med['mma'] - med['omma']) * 1e3:.1f} ms; one training backward ~ training_pass - "
          f"no_grad_forward = {backward * 1e3:.1f} ms")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(CASES), nargs="*", default=["lenet", "wrn"])
    parser.add_argument("--compile", action="store_true",
                        help="also time MMA on a torch.compile'd copy of the backbone (compiling takes minutes)")
    parser.add_argument("--search", choices=sorted(SEARCH_BUDGETS), default="bisection",
                        help="MMA's margin search: the reference's bisection, refined, or cheap (root-finder only)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU time on one thread: steadier on a shared, busy CPU")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    ratios = {name: run_case(CASES[name], args.reps, torch.device(args.device), args.search, args.compile)
              for name in args.only}
    targets = {"lenet": 1.15, "wrn": 1.35}
    print("\nsummary: " + ", ".join(f"{n}: {r:.3f} (target <= {targets[n]})" for n, r in ratios.items()))


if __name__ == "__main__":
    main()
