"""How far bfloat16 autocast moves the MMA margin search's eps, and whether the search or the attack moves it.

From the same weights and the same random start (the start's draws made once, ``start_noise``), the per-sample
eps of the MMA training search (Ding et al., ICLR 2020; :func:`~mma_lightning.attacks.find_margin` with
``loss="slm"``, ``success="slm"``, K PGD steps of ``2.5 eps / K`` from ``init_eps``, then S = 10 bisection steps
over ``[0, 1.05 d_max]``; and the ``"refined"`` search) under CPU ``torch.autocast(dtype=torch.bfloat16)`` against
float32. Two sources of the difference are kept apart:

(i)  the search's own: PGD in float32 once, only the search's forwards in bfloat16 (same ray);
(ii) PGD and search both under autocast (MMA's ``bf16-mixed`` step): adds the change of the PGD direction.

Each in two variants: "before", the search's forwards in the autocast precision (``full_precision=False`` of
:func:`~mma_lightning.attacks.line_search.bisect_ray` and the refined stages), and "after", the default, where
they run in float32 (:func:`~mma_lightning.attacks.line_search.outside_autocast`). A last row, float32 with a
different random start, gives the scale of the attack's own randomness.

Reported over the samples whose eps is in ``(0, 1.05 d_max)`` in both runs: the median / p90 / max of
``|eps_bf16 - eps_fp32| / eps_fp32``, the share of samples that differ at all, and the difference in units of the
bisection's final bracket (``init / 2**(S-1)`` wide where the first trial, at ``init``, succeeds, else
``(upper - init) / 2**(S-1)``): the resolution the bisection claims, also printed relative to eps. Both runs'
outcomes lie on the same dyadic grid, so a difference of one bracket is a last-step flip; more than one means
the bfloat16 boundary moved by more than the search's resolution.

Cases: (a) LeNet5-Madry trained on Fashion-MNIST by ``mma-train experiment=quickstart`` (its
``checkpoints/last.ckpt``; the preset's d_max, min_eps, K, S are read from the checkpoint), the first ``--points``
test images; init eps "min_eps" for every point, then "stored": each point's float32 eps from the first
(MMA's steady state: a point starts at its remembered eps). (b) WRN-28-4 with per-image standardisation
(conf/model/wrn28_4.yaml), random weights, BatchNorm statistics of the data, logits scaled to a trained net's
size, on CIFAR-shaped synthetic images labelled by the model itself and pushed from the boundary so that their
margins spread over CIFAR10's (:func:`wrn_case`); CIFAR10's Linf preset (d_max 32/255, min_eps 0.005, K = 10);
init eps 1.2 x the push radius, standing in for a remembered eps (from min_eps, PGD's rays miss the boundary).

bfloat16 itself: "real" is CPU autocast; "emulated" (:func:`emulate_bf16`) computes the same roundings with
float32 kernels, because on a CPU without native bfloat16 a WRN-28-4 forward in bfloat16 takes minutes. On
LeNet5 the two give the same logits (and the same table); on WRN-28-4 the emulated logits' error has the size
of the real one but not its values (the script prints both).

``--cost``: wall time of one whole search (PGD + bisection) under CPU bfloat16 autocast, after / before, calls
alternated, median of ``--reps``, LeNet5 batch 50 K = 40 (``--wrn-cost``: WRN-28-4 batch 32 K = 10, hours on
such a CPU). A CPU without native bfloat16 runs float32 faster than bfloat16, so there the "after" search is
the faster one; on a GPU the search's S forwards run at float32 instead of bfloat16 speed.

Usage: ``python benchmarks/bf16_margins.py [--checkpoint logs/train/runs/<time>/checkpoints/last.ckpt]
[--points 300] [--lenet-modes real,emulated] [--wrn-points 64] [--cost] [--json out.json]`` (about 15 minutes
on an idle 2-core CPU at 200 + 32 points).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mma_lightning.attacks import find_margin, get_norm, pgd, soft_logit_margin
from mma_lightning.attacks.boundary import refine_on_boundary
from mma_lightning.attacks.context import model_mode
from mma_lightning.attacks.fmn import fmn_steps
from mma_lightning.attacks.line_search import bisect_ray, root_find_ray
from mma_lightning.attacks.losses import SUCCESS_MARGINS, SUCCESS_TESTS
from mma_lightning.attacks.norms import StartNoise, per_sample
from mma_lightning.attacks.pgd import fp16_gradient_scale, pgd_iterates
from mma_lightning.models import LeNet5Madry, PerImageStandardization, WideResNet

FASHION = Path("/usr/share/datasets/fashion-mnist")
UPPER_FACTOR = 1.05
STEP_SCALE = 2.5
ROOT_STEPS, REFINE_STEPS = 3, 6  # find_margin's defaults for search="refined"


def bf16(enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """CPU bfloat16 autocast (the CPU stand-in for Lightning's ``bf16-mixed``), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# --- bfloat16 autocast emulated in float32 --------------------------------------------------------------------
def to_bf16_values(t: Tensor) -> Tensor:
    """``t`` rounded to bfloat16 and kept in float32 (the gradient through it is rounded the same way)."""
    return t.to(torch.bfloat16).float()


class EmulatedBF16Conv2d(nn.Conv2d):
    """Under CPU autocast: what a bfloat16 convolution computes (inputs, weights, bias rounded to bfloat16,
    float32 accumulation, output rounded), in float32 kernels. Outside autocast: the float32 convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        bias = None if self.bias is None else to_bf16_values(self.bias)
        with torch.autocast("cpu", enabled=False):
            return to_bf16_values(self._conv_forward(to_bf16_values(x), to_bf16_values(self.weight), bias))


class EmulatedBF16Linear(nn.Linear):
    """:class:`EmulatedBF16Conv2d` for a linear layer."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        bias = None if self.bias is None else to_bf16_values(self.bias)
        with torch.autocast("cpu", enabled=False):
            return to_bf16_values(F.linear(to_bf16_values(x), to_bf16_values(self.weight), bias))


def _round_output(_m: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
    return to_bf16_values(out) if torch.is_autocast_enabled("cpu") and out.is_floating_point() else None


def emulate_bf16(model: nn.Module) -> nn.Module:
    """Make ``model`` under CPU bfloat16 autocast compute what real autocast does, in float32 kernels.

    On a CPU without native bfloat16 (no AVX512-BF16 / AMX) PyTorch's bfloat16 convolutions are 7-180x
    slower than float32 ones (a WRN-28-4 forward of 32 images: 185 s against 1 s on a 2-core AVX2 EPYC), too
    slow for a WRN search. Autocast runs convolutions and linear layers in bfloat16 (float32 accumulation) and
    every op after the first of them on bfloat16 tensors; here the convolutions and linear layers round their
    inputs, weights and outputs to bfloat16 values, and every other module after the first layer (BatchNorm,
    ReLU, pooling, a residual block's sum) rounds its output, all in float32 kernels. Outside autocast (the
    search's float32 forwards) nothing changes. ``main`` prints how close it comes to real autocast.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = EmulatedBF16Conv2d
        elif type(m) is nn.Linear:
            m.__class__ = EmulatedBF16Linear
        elif not isinstance(m, (PerImageStandardization, nn.Identity)) and m is not model:
            m.register_forward_hook(_round_output)
    return model


# --- the MMA search, split at the PGD point ----------------------------------------------------------------
class Setup:
    """One case's search parameters."""

    def __init__(self, max_eps: float, min_eps: float, nb_iter: int, search_steps: int) -> None:
        self.max_eps, self.min_eps, self.nb_iter, self.search_steps = max_eps, min_eps, nb_iter, search_steps
        self.upper = UPPER_FACTOR * max_eps


def pgd_point(model: nn.Module, x: Tensor, y: Tensor, init: Tensor, nb_iter: int, noise: StartNoise) -> Tensor:
    """AN-PGD's point as :func:`find_margin` computes it (eval mode, SLM objective, step 2.5 init / K)."""
    with torch.enable_grad(), model_mode(model, train=False):
        return pgd_iterates(model, x, y, get_norm("linf"), init, nb_iter, STEP_SCALE * init / nb_iter,
                            soft_logit_margin, True, 0.0, 1.0, start_noise=noise)


def search_from(model: nn.Module, x: Tensor, y: Tensor, x_pgd: Tensor, init: Tensor, setup: Setup,
                clean_logits: Tensor, search: str, full_precision: bool) -> Tensor:
    """The eps of :func:`find_margin` (``success="slm"``) from a given PGD point: its second stage, line for line
    (``main`` checks that it reproduces ``find_margin`` exactly), with the search's precision as a switch."""
    geometry, is_adv, margin_fn = get_norm("linf"), SUCCESS_TESTS["slm"], SUCCESS_MARGINS["slm"]
    upper = torch.full_like(init, setup.upper)
    already = is_adv(clean_logits, y)
    direction = (x_pgd - x) / per_sample(init, x)
    with torch.enable_grad():
        if search == "bisection":
            hi, found, _ = bisect_ray(model, x, y, direction, init, upper, setup.search_steps, is_adv, 0.0, 1.0,
                                      full_precision=full_precision)
        else:
            hi, found, x_best = root_find_ray(model, x, y, direction, init, upper, ROOT_STEPS, margin_fn, is_adv,
                                              margin_fn(clean_logits, y), 0.0, 1.0, full_precision=full_precision)
            scale = fp16_gradient_scale(x)
            start = torch.where(per_sample(found, x), x_best, x_pgd)
            x_best, found = refine_on_boundary(model, x, y, geometry, start, found, ~already, 1, margin_fn, is_adv,
                                               0.0, 1.0, scale, full_precision=full_precision)
            x_best, found = fmn_steps(model, x, y, geometry, x_best, found, ~already, REFINE_STEPS - 1, margin_fn,
                                      is_adv, 0.0, 1.0, scale, full_precision=full_precision)
            dist = geometry.norm(x_best - x)
            found = found & (dist <= upper * (1 + 1e-3))
            hi = torch.where(found, dist.clamp(max=upper), upper)
    return torch.where(already, torch.zeros_like(hi), torch.where(found, hi, upper))


def bracket_width(eps: Tensor, init: Tensor, setup: Setup) -> Tensor:
    """The bisection's final bracket: it starts at ``init`` and halves ``[0, init]`` (first trial adversarial)
    or ``[init, upper]`` (not) ``S - 1`` times; ``eps <= init`` iff the first trial succeeded."""
    first = torch.where(eps <= init, init, setup.upper - init)
    return first / 2 ** (setup.search_steps - 1)


def batched(fn: Callable[[slice], Tensor], n: int, batch: int) -> Tensor:
    return torch.cat([fn(slice(i, min(i + batch, n))) for i in range(0, n, batch)])


def run_case(name: str, model: nn.Module, x: Tensor, y: Tensor, setup: Setup, batch: int,
             inits: dict[str, Tensor | None], searches: list[str]) -> list[dict[str, Any]]:
    """Every comparison of one case; prints its table and returns its rows. ``inits``: named init eps, ``None``
    for "the float32 bisection's eps from the previous init" (a remembered eps, MMA's steady state)."""
    model.eval().requires_grad_(False)
    n = x.shape[0]
    noise = get_norm("linf").start_noise(x, torch.Generator().manual_seed(0))
    other_noise = get_norm("linf").start_noise(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits32 = batched(lambda s: model(x[s]), n, batch)
        with bf16():
            logits16 = batched(lambda s: model(x[s]).float(), n, batch)

    def pgd_all(init: Tensor, autocast: bool, nz: StartNoise) -> Tensor:
        with bf16(autocast):
            return batched(lambda s: pgd_point(model, x[s], y[s], init[s], setup.nb_iter, (nz[0][s],)), n, batch)

    def search_all(x_pgd: Tensor, init: Tensor, logits: Tensor, search: str, autocast: bool,
                   full_precision: bool) -> Tensor:
        with bf16(autocast):
            return batched(lambda s: search_from(model, x[s], y[s], x_pgd[s], init[s], setup, logits[s], search,
                                                 full_precision), n, batch)

    rows: list[dict[str, Any]] = []
    print(f"\n=== {name}: {n} points, d_max {setup.max_eps:.4g}, upper {setup.upper:.4g}, min_eps "
          f"{setup.min_eps:.4g}, K {setup.nb_iter}, S {setup.search_steps}", flush=True)
    previous: Tensor | None = None
    for k, (init_name, given) in enumerate(inits.items()):
        t0 = time.perf_counter()
        if given is None:
            assert previous is not None, "a remembered init needs an init before it"
            init = previous.clamp(setup.min_eps, setup.upper)
        else:
            init = given
        pgd32 = pgd_all(init, False, noise)
        pgd16 = pgd_all(init, True, noise)
        pgd32_other = pgd_all(init, False, other_noise)
        for search in searches:
            ref = search_all(pgd32, init, logits32, search, False, True)
            if search == "bisection":
                previous = ref
                if k == 0:
                    check_replica(model, x[:batch], y[:batch], init[:batch], setup, noise, logits32[:batch],
                                  logits16[:batch], ref[:batch])
            variants = {
                "(i) search bf16, before": search_all(pgd32, init, logits32, search, True, False),
                "(i) search bf16, after": search_all(pgd32, init, logits32, search, True, True),
                "(ii) PGD+search bf16, before": search_all(pgd16, init, logits16, search, True, False),
                "(ii) PGD+search bf16, after": search_all(pgd16, init, logits16, search, True, True),
                "fp32, other random start": search_all(pgd32_other, init, logits32, search, False, True),
            }
            width = bracket_width(ref, init, setup) if search == "bisection" else None
            for label, eps in variants.items():
                rows.append(compare(name, init_name, search, label, ref, eps, width, setup))
        print(f"  [init {init_name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print_table(rows)
    return rows


def check_replica(model: nn.Module, x: Tensor, y: Tensor, init: Tensor, setup: Setup, noise: StartNoise,
                  logits32: Tensor, logits16: Tensor, ref: Tensor) -> None:
    """``search_from`` after ``pgd_point`` is ``find_margin``, bit for bit, in float32 and under autocast."""
    kwargs: dict[str, Any] = dict(norm="linf", init_eps=init, max_eps=setup.upper, nb_iter=setup.nb_iter,
                                  search_steps=setup.search_steps, loss="slm", success="slm",
                                  start_noise=(noise[0][:x.shape[0]],))
    got32 = find_margin(model, x, y, clean_logits=logits32, **kwargs).eps
    with bf16():
        got16 = find_margin(model, x, y, clean_logits=logits16, **kwargs).eps
        x_pgd = pgd_point(model, x, y, init, setup.nb_iter, (noise[0][:x.shape[0]],))
        mine16 = search_from(model, x, y, x_pgd, init, setup, logits16, "bisection", True)
    assert torch.equal(got32, ref), "search_from no longer reproduces find_margin (float32)"
    assert torch.equal(got16, mine16), "search_from no longer reproduces find_margin (bf16 autocast)"


def quantiles(v: Tensor) -> tuple[float, float, float]:
    if v.numel() == 0:
        return (float("nan"),) * 3
    v = v.double()
    return float(v.median()), float(v.quantile(0.9)), float(v.max())


def compare(case: str, init: str, search: str, label: str, ref: Tensor, eps: Tensor, width: Tensor | None,
            setup: Setup) -> dict[str, Any]:
    keep = (ref > 0) & (ref < setup.upper) & (eps > 0) & (eps < setup.upper)
    diff = (eps - ref).abs()[keep]
    rel = diff / ref[keep]
    row: dict[str, Any] = {"case": case, "init": init, "search": search, "variant": label,
                           "n": int(keep.sum()), "differ": float((diff > 0).float().mean()) if keep.any() else 0.0}
    row["rel_median"], row["rel_p90"], row["rel_max"] = quantiles(rel)
    if width is not None:
        w = width[keep]
        row["claimed_res_median"], row["claimed_res_p90"], _ = quantiles(w / ref[keep])
        row["brackets_median"], row["brackets_p90"], row["brackets_max"] = quantiles(diff / w)
        row["over_one_bracket"] = float((diff > 1.001 * w).float().mean()) if keep.any() else 0.0
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"  {'init':5} {'search':9} {'variant':30} {'n':>4} {'differ':>6} | {'|d eps|/eps: median':>19} "
            f"{'p90':>7} {'max':>7} | {'in brackets: med':>16} {'p90':>5} {'max':>5} {'>1':>5} | claimed res med/p90")
    print(head)
    for r in rows:
        line = (f"  {r['init']:5} {r['search']:9} {r['variant']:30} {r['n']:4d} {r['differ']:6.1%} | "
                f"{r['rel_median']:19.3%} {r['rel_p90']:7.3%} {r['rel_max']:7.3%} |")
        if "brackets_median" in r:
            line += (f" {r['brackets_median']:16.2f} {r['brackets_p90']:5.2f} {r['brackets_max']:5.1f} "
                     f"{r['over_one_bracket']:5.1%} | {r['claimed_res_median']:.3%} / {r['claimed_res_p90']:.3%}")
        else:
            line += f" {'(no bracket)':>16} {'':5} {'':5} {'':5} |"
        print(line)


# --- the two cases ------------------------------------------------------------------------------------------
def read_idx(path: Path) -> Tensor:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def fashion_test(n: int) -> tuple[Tensor, Tensor]:
    x = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n].float().div(255).unsqueeze(1)
    y = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:n].long()
    return x, y


def newest_checkpoint() -> Path | None:
    found = sorted(Path("logs/train/runs").glob("*/checkpoints/last.ckpt"))
    return found[-1] if found else None


def load_lenet(path: Path) -> tuple[nn.Module, Setup]:
    """The backbone of an MMAModule checkpoint (``net.*`` keys) and the preset it was trained with."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    net = LeNet5Madry()
    net.load_state_dict({k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    hp = ckpt.get("hyper_parameters", {})
    setup = Setup(float(hp.get("max_eps", 0.2)), float(hp.get("min_eps", 0.02)), int(hp.get("nb_iter", 10)),
                  int(hp.get("search_steps", 10)))
    return net, setup


def synthetic_cifar(n: int, seed: int) -> Tensor:
    """CIFAR-shaped images in [0, 1]: smooth colour fields (8x8 noise upsampled) plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)


LOGIT_SCALE = 30.0
"""Factor on the random WRN's last layer: logits of a trained net's size (std ~8), so SLM < 0 on clean points."""
PUSH = (0.005, 0.06)
"""Range of the anti-adversarial push radii: the margins then spread over CIFAR10's (MMA-32: d_max 0.125)."""


def wrn_case(n: int) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """WRN-28-4 with random weights, BatchNorm statistics of the data, logits scaled by ``LOGIT_SCALE``, and
    ``n`` synthetic images labelled by its own float32 predictions, then pushed away from the boundary: PGD
    *descending* their soft logit margin (10 steps, Linf radius ``r_i`` spread over ``PUSH``), so each point's
    margin is about ``r_i`` (a random network's margins are ~0.001, far below a trained one's).
    Returns ``(net, x, y, r)``."""
    torch.manual_seed(0)
    net = WideResNet(depth=28, widen_factor=4, num_classes=10, in_channels=3, standardize=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for seed in range(2):
            net(synthetic_cifar(64, 100 + seed))
        net.fc.weight.mul_(LOGIT_SCALE)
        net.fc.bias.mul_(LOGIT_SCALE)
    net.eval()
    x = synthetic_cifar(n, 0)
    with torch.no_grad():
        y = net(x).argmax(1)
    r = PUSH[0] + (PUSH[1] - PUSH[0]) * torch.rand(n, generator=torch.Generator().manual_seed(2))
    x = batched(lambda s: pgd(net, x[s], y[s], "linf", eps=r[s], nb_iter=10, rand_init=False,
                              loss=lambda z, t: -soft_logit_margin(z, t)), n, 32)
    return net, x, y, r


def emulation_fidelity(name: str, model: nn.Module, emulated: nn.Module, x: Tensor, real_batch: int) -> None:
    """How close the emulated bfloat16 forward comes to real CPU autocast (channels_last: the faster kernel)."""
    x = x[:real_batch]
    with torch.no_grad():
        z32 = model(x)
        with bf16():
            fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
            real = fast(x.contiguous(memory_format=torch.channels_last)).float()
            emu = emulated(x).float()
    err = {k: float((v - z32).abs().mean()) for k, v in (("real", real), ("emulated", emu))}
    print(f"  {name}: mean |logit - fp32 logit| real bf16 {err['real']:.2e}, emulated {err['emulated']:.2e}; "
          f"real vs emulated {float((real - emu).abs().mean()):.2e} ({float((real == emu).float().mean()):.0%} "
          f"equal), logits' mean |z| {float(z32.abs().mean()):.2f}", flush=True)


# --- cost ---------------------------------------------------------------------------------------------------
def time_search(model: nn.Module, x: Tensor, y: Tensor, setup: Setup, reps: int) -> dict[str, float]:
    """One search (PGD + bisection) under CPU bf16 autocast, search forwards in float32 (after) or bf16 (before);
    the two alternated, median of ``reps``."""
    model.eval().requires_grad_(False)
    init = torch.full((x.shape[0],), setup.min_eps)
    noise = get_norm("linf").start_noise(x, torch.Generator().manual_seed(0))
    with torch.no_grad(), bf16():
        logits = model(x)
    times: dict[str, list[float]] = {"after": [], "before": []}

    def one(full_precision: bool) -> float:
        t0 = time.perf_counter()
        with bf16():
            x_pgd = pgd_point(model, x, y, init, setup.nb_iter, noise)
            search_from(model, x, y, x_pgd, init, setup, logits, "bisection", full_precision)
        return time.perf_counter() - t0

    one(True), one(False)  # warm-up
    for _ in range(reps):
        times["after"].append(one(True))
        times["before"].append(one(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"after_s": med["after"], "before_s": med["before"], "ratio": med["after"] / med["before"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="MMAModule checkpoint of LeNet5-Madry (default: the newest logs/train/runs/*/"
                             "checkpoints/last.ckpt under the current directory)")
    parser.add_argument("--points", type=int, default=300, help="Fashion-MNIST test images (case a); 0: skip")
    parser.add_argument("--lenet-modes", default="real,emulated",
                        help="bfloat16 of case (a): real CPU autocast and/or the float32 emulation")
    parser.add_argument("--wrn-points", type=int, default=64, help="synthetic CIFAR images (case b); 0: skip")
    parser.add_argument("--wrn-modes", default="emulated")
    parser.add_argument("--searches", default="bisection,refined")
    parser.add_argument("--cost", action="store_true", help="time LeNet5's search with / without the fix")
    parser.add_argument("--wrn-cost", action="store_true", help="the same for WRN-28-4 (slow: real bf16)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    searches = args.searches.split(",")
    out: dict[str, Any] = {"rows": [], "cost": {}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))

    if args.points:
        path = args.checkpoint or newest_checkpoint()
        if path is None:
            raise SystemExit("no checkpoint: run `mma-train experiment=quickstart` here first, or pass --checkpoint")
        lenet, setup = load_lenet(path)
        lenet.eval().requires_grad_(False)
        x, y = fashion_test(args.points)
        print(f"LeNet5-Madry from {path}")
        emulated = emulate_bf16(copy.deepcopy(lenet))
        emulation_fidelity("LeNet5", lenet, emulated, x, 200)
        inits: dict[str, Tensor | None] = {"min_eps": torch.full((x.shape[0],), setup.min_eps), "stored": None}
        for mode in args.lenet_modes.split(","):
            out["rows"] += run_case(f"LeNet5 ({mode} bf16)", lenet if mode == "real" else emulated, x, y, setup,
                                    200, inits, searches)
            save()
        if args.cost:
            cost_setup = Setup(setup.max_eps, setup.min_eps, 40, setup.search_steps)
            out["cost"]["lenet5_b50_k40"] = c = time_search(lenet, x[:50], y[:50], cost_setup, args.reps)
            print(f"\ncost LeNet5 batch 50 K 40 (real CPU bf16): after {c['after_s']:.3f} s, before "
                  f"{c['before_s']:.3f} s, ratio {c['ratio']:.3f}", flush=True)
            save()

    if args.wrn_points:
        wrn, xw, yw, r = wrn_case(args.wrn_points)
        wrn.requires_grad_(False)
        wrn_setup = Setup(32 / 255, 0.005, 10, 10)
        emulated = emulate_bf16(copy.deepcopy(wrn))
        emulation_fidelity("WRN-28-4", wrn, emulated, xw, 4)
        # the remembered eps of MMA's steady state, stood in for by 1.2 x the push radius (min_eps fails:
        # PGD at 0.005 gives rays that miss the boundary for most points)
        wrn_inits: dict[str, Tensor | None] = {"1.2 r": (1.2 * r).clamp(wrn_setup.min_eps, wrn_setup.upper)}
        for mode in args.wrn_modes.split(","):
            out["rows"] += run_case(f"WRN-28-4 ({mode} bf16)", wrn if mode == "real" else emulated, xw, yw,
                                    wrn_setup, 32, wrn_inits, searches)
            save()
        if args.wrn_cost:
            out["cost"]["wrn28_4_b32_k10"] = c = time_search(wrn, xw[:32], yw[:32], wrn_setup, args.reps)
            print(f"\ncost WRN-28-4 batch 32 K 10 (real CPU bf16): after {c['after_s']:.2f} s, before "
                  f"{c['before_s']:.2f} s, ratio {c['ratio']:.3f}", flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
