"""Images per second of N packed MMA runs against one run, on the same model, batch and device, in one process.

One training step each (the method's step, ``backward()`` and an Adam step): a single ``MMAModule`` for "one
run" (a separate run's step), a :class:`~mma_lightning.packing.PackedModule` of N such runs for "N packed" (its
images per step are N batches). The variants are timed in alternation, ``--reps`` rounds after a warm-up step
each, and the median step time of each is reported with the images per second and their ratio to one run's
(with the quartiles of the rounds' own ratios, each pack against the one-run step timed next to it).
Each pack size is timed with both batchings (``--batching``): ``vmap`` (one batched step, the GPU's default)
and ``loop`` (the runs' steps one after another in one process, the CPU's default). ``x one run`` above 1
means the pack trains its N runs faster than running them one after another (that ratio is what
``hydra/launcher=packed`` saves); N would be perfect scaling (issue 17's GPU target: 4 packed runs >= 3x the
images per second of one run).

``--sweep N`` times the whole command instead: ``mma-train -m <--overrides> seed=0,...,N-1`` with Hydra's basic
launcher (the N runs one after another in one process: data, training, validations, test, checkpoints) against
``hydra/launcher=packed`` (one pack of N), alternated ``--reps`` times, wall-clock medians and their ratio.

Usage::

    python benchmarks/packed.py                      # a GPU if there is one: WRN-28-4, batch 128, K = 10
    python benchmarks/packed.py --device cpu         # LeNet5-Madry, batch 50, K = 10 (the quickstart's step)
    python benchmarks/packed.py --model wrn --runs 1,2,4,8 --reps 9 --json out.json
    python benchmarks/packed.py --sweep 4 --reps 2 --overrides "experiment=quickstart"   # end to end
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from mma_lightning import MMAModule
from mma_lightning.models import LeNet5Madry, wrn28_4
from mma_lightning.packing import PackedModule


@dataclass
class Model:
    """A benchmarked case: backbone, input shape, batch and the MMA settings of its paper preset."""

    name: str
    make_net: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch: int
    nb_iter: int
    max_eps: float
    min_eps: float


MODELS = {
    "wrn": Model("WRN-28-4, CIFAR10 Linf MMA-32, K=10, batch 128", wrn28_4, (3, 32, 32), 128, 10, 32 / 255, 0.005),
    "lenet": Model("LeNet5-Madry, quickstart Linf, K=10, batch 50", LeNet5Madry, (1, 28, 28), 50, 10, 0.2, 0.05),
    "tiny": Model("a 2-layer MLP on 8x8, K=2, batch 16 (the test's)",
                  lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                  (1, 8, 8), 16, 2, 0.2, 0.05),
}
NUM_SAMPLES = 1024  # the eps tables' size (the benchmark draws indices from it)


def mma_module(model: Model, seed: int) -> MMAModule:
    """One run's module, as ``mma-train`` builds it (Adam)."""
    pl.seed_everything(seed, verbose=False)
    return MMAModule(model.make_net(), max_eps=model.max_eps, min_eps=model.min_eps, nb_iter=model.nb_iter,
                     eval_eps=model.max_eps / 2, num_train_samples=NUM_SAMPLES,
                     optimizer=partial(torch.optim.Adam, lr=1e-3))


def batch(model: Model, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``(x, y, index)`` batch in the box."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(model.batch, *model.shape, generator=g)
    y = torch.randint(0, 10, (model.batch,), generator=g)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:model.batch]
    return x.to(device), y.to(device), index.to(device)


def single_step(model: Model, device: torch.device) -> Callable[[], None]:
    """One separate run's training step."""
    module = mma_module(model, 0).to(device)
    optimizer = module.configure_optimizers()
    x, y, index = batch(model, device, 0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_loss(x, y, index).backward()
        optimizer.step()

    return step


def packed_step(model: Model, device: torch.device, n: int, batching: str) -> Callable[[], None]:
    """One step of a pack of ``n`` runs (each with its own seed and batch)."""
    pack = PackedModule([mma_module(model, seed) for seed in range(n)], seeds=list(range(n)),
                        batching=batching).to(device)
    optimizer = pack.configure_optimizers()
    batches = [batch(model, device, seed) for seed in range(n)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        pack.training_step(batches, 0).backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Model, device: torch.device, runs: list[int], batchings: list[str], reps: int
            ) -> list[dict[str, Any]]:
    """Median step times of one run and of each pack size and batching, timed in alternation; images/s and the
    ratio to one run's images/s."""
    steps: dict[tuple[int, str], Callable[[], None]] = {(1, "-"): single_step(model, device)}
    for n in runs:
        for batching in batchings if n > 1 else []:
            steps[(n, batching)] = packed_step(model, device, n, batching)
    times: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    for step in steps.values():  # warm-up (allocator, first-batch checks)
        step()
    for _ in range(reps):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    one = statistics.median(times[(1, "-")])
    rows = []
    for (n, batching), samples in times.items():
        median = statistics.median(samples)
        # each round's own ratio (the pack against the one-run step timed next to it): their quartiles say how
        # much of the median ratio is the machine's noise
        ratios = sorted(n * t_one / t for t_one, t in zip(times[(1, "-")], samples))
        low, high = (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0], ratios[0]))
        rows.append({"runs": n, "batching": batching, "variant": "one run" if n == 1 else f"{n} packed, {batching}",
                     "step_ms": 1000 * median, "images_per_s": n * model.batch / median, "vs_one_run": n * one / median,
                     "round_ratio_q1": low, "round_ratio_q3": high, "reps": reps})
    return rows


def sweep(runs: int, overrides: list[str], reps: int, workdir: Path) -> list[dict[str, Any]]:
    """Wall-clock seconds of ``mma-train -m <overrides> seed=0,...,runs-1`` with the basic launcher and with the
    packed one (``pack_size=runs``), alternated ``reps`` times; the packed command must say it packed them all."""
    seeds = "seed=" + ",".join(str(i) for i in range(runs))
    launchers = {"one after another": ["hydra/launcher=basic"],
                 "packed": ["hydra/launcher=packed", f"hydra.launcher.pack_size={runs}"]}
    times: dict[str, list[float]] = {name: [] for name in launchers}
    for rep in range(reps):
        for name, launcher in launchers.items():
            out = workdir / f"{name.replace(' ', '-')}-{rep}"
            command = [str(Path(sys.executable).parent / "mma-train"), "-m", *overrides, seeds, *launcher,
                       f"hydra.sweep.dir={out}"]  # the installed command (the launcher packs mma-train's runs)
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
            said = proc.stdout + proc.stderr  # Hydra's log goes to stdout
            if name == "packed" and "packed #0, " + ", ".join(f"#{i}" for i in range(1, runs)) not in said:
                raise RuntimeError(f"the packed command did not pack its {runs} runs:\n{said[-3000:]}")
    basic = statistics.median(times["one after another"])
    return [{"variant": name, "runs": runs, "seconds": statistics.median(t), "all_seconds": t,
             "vs_one_after_another": basic / statistics.median(t), "reps": reps} for name, t in times.items()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, measure, print the table; returns the report (also written with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: wrn on a GPU, lenet on the CPU")
    parser.add_argument("--runs", default="1,2,4,8", help="pack sizes, comma-separated (1: one run)")
    parser.add_argument("--batching", choices=["vmap", "loop", "both"], default="both",
                        help="the packs' batching (PackedModule(batching=...)); both: each pack size twice")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sweep", type=int, default=None, metavar="N",
                        help="time the command end to end: a sweep of N seeds, basic launcher against packed")
    parser.add_argument("--overrides", default="experiment=quickstart",
                        help="the swept command's overrides (with --sweep), one string")
    parser.add_argument("--workdir", type=Path, default=None, help="the sweeps' directories (with --sweep; "
                        "default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    if args.sweep is not None:
        if args.sweep < 2 or args.reps < 1:
            parser.error(f"--sweep must be >= 2 and --reps >= 1, got --sweep {args.sweep} --reps {args.reps}")
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(args.sweep, shlex.split(args.overrides), args.reps, args.workdir or Path(tmp))
        report = {"command": f"mma-train -m {args.overrides}", "device": "the command's own", "rows": rows}
        lines = [f"mma-train -m {args.overrides} seed=0..{args.sweep - 1}: median of {args.reps} alternated sweeps"]
        lines += [f"{r['variant']:>18} {r['seconds']:9.1f} s {r['vs_one_after_another']:6.2f}x  "
                  f"(each: {', '.join(f'{t:.1f}' for t in r['all_seconds'])})" for r in rows]
    else:
        device = torch.device(args.device)
        model = MODELS[args.model or ("wrn" if device.type == "cuda" else "lenet")]
        runs = sorted({1, *(int(n) for n in args.runs.split(","))})
        if args.reps < 1 or runs[0] < 1:
            parser.error("--reps and every pack size must be >= 1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            batchings = ["loop", "vmap"] if args.batching == "both" else [args.batching]
            rows = measure(model, device, runs, batchings, args.reps)
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({torch.get_num_threads()} threads)")
        report = {"model": model.name, "device": name, "torch": torch.__version__, "rows": rows}
        lines = [f"{model.name} on {name}, median of {args.reps} alternated steps",
                 f"{'variant':>18} {'step ms':>9} {'images/s':>9} {'x one run':>10} {'rounds q1-q3':>13}"]
        lines += [f"{r['variant']:>18} {r['step_ms']:9.1f} {r['images_per_s']:9.1f} {r['vs_one_run']:10.2f} "
                  f"{r['round_ratio_q1']:6.2f}-{r['round_ratio_q3']:.2f}" for r in rows]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
