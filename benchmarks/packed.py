"""Images per second of N packed MMA runs against one run, on the same model, batch and device, in one process.

One training step each, as Lightning runs it (the module's ``training_step``, ``backward()`` and an Adam step):
a single ``MMAModule`` for "one run" (a separate run's step), a :class:`~mma_lightning.packing.PackedModule` of
N such runs for "N packed" (its images per step are N batches). Each pack size is timed with both batchings
(``--batching``): ``loop`` (the runs' steps one after another in one step; ``batching="auto"``'s choice on
every device) and ``vmap`` (one batched step over the runs' stacked weights). The variants are timed in
alternation, ``--reps`` rounds after ``--warmup`` warm-up steps each, and the median step time of each is reported
with the images per second and their ratio to one run's (with the quartiles of the rounds' own ratios, each pack
against the one-run step timed next to it). ``x one run`` above 1 means the pack trains its N runs faster than
running them one after another (that ratio is what ``hydra/launcher=packed`` saves); N would be perfect scaling.

What a step runs (its setup) defaults to what a run on that device runs:

- on a GPU, the ``trainer=gpu`` preset: the captured step (``compile_step=True`` on every run's module; a pack
  captures its whole step, ``PackedModule.pack_step``: inductor with CUDA graphs), bf16 autocast around the step
  (as Lightning's ``bf16-mixed``; the backward and the optimiser step outside it), ``channels_last`` weights and
  batches, ``cudnn.benchmark`` and TF32 matmuls; plus one reference row, one run eager in fp32 and contiguous
  (the step's options of the preset off; ``--no-reference`` leaves it out), and an ``x eager fp32`` column (each
  row's images per second over the reference's);
- on the CPU, the eager fp32 step (contiguous), no reference row.

``--capture/--no-capture``, ``--compile-backend``, ``--precision`` and ``--channels-last/--no-channels-last``
change the setup (``--compile-backend eager|aot_eager|inductor`` captures the step with that backend: on the CPU
``eager`` traces the step as every backend does, without code generation; on a GPU only ``inductor`` records
CUDA graphs). A captured step's first call compiles it and checks it against eager (about three steps' work):
its ``first call s`` (``Captured.first_call_s``: compile and check) is reported apart, and the warm-up steps keep
it and the graphs' recording out of the medians. A captured variant that fell back to eager
(``Captured.state == "eager"``) is printed with the reason instead of a speed. ``perf-drop warns`` counts
torch's vmap fallback warnings ("There is a performance drop": an operator without a batching rule, such as
eval-mode BatchNorm in a vmapped attack's forward, looped inside ``vmap``) over the variant's first call, warm-up
and timed steps, and per timed step.

``--sweep N`` times the whole command instead: ``mma-train -m <--overrides> seed=0,...,N-1`` with Hydra's basic
launcher (the N runs one after another in one process: data, training, validations, test, checkpoints) against
``hydra/launcher=packed`` (one pack of N), alternated ``--reps`` times, wall-clock medians and their ratio.

Usage::

    python benchmarks/packed.py                      # a GPU if there is one: WRN-28-4, batch 128, K = 10, trainer=gpu
    python benchmarks/packed.py --no-capture --precision fp32 --no-channels-last   # the eager fp32 step on a GPU
    python benchmarks/packed.py --device cpu         # LeNet5-Madry, batch 50, K = 10 (the quickstart's step), eager
    python benchmarks/packed.py --device cpu --compile-backend eager --runs 1,2   # the captured step on the CPU
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from mma_lightning import MMAModule
from mma_lightning.capture import Captured
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
    search_steps: int = 10  # the margin search's bisection steps (the paper's 10)


MODELS = {
    "wrn": Model("WRN-28-4, CIFAR10 Linf MMA-32, K=10, batch 128", wrn28_4, (3, 32, 32), 128, 10, 32 / 255, 0.005),
    "lenet": Model("LeNet5-Madry, quickstart Linf, K=10, batch 50", LeNet5Madry, (1, 28, 28), 50, 10, 0.2, 0.05),
    "tiny": Model("a 2-layer MLP on 8x8, K=2, S=2, batch 16 (the test's)",
                  lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                  (1, 8, 8), 16, 2, 0.2, 0.05, search_steps=2),
}
NUM_SAMPLES = 1024  # the eps tables' size (the benchmark draws indices from it)
PERFORMANCE_DROP = "There is a performance drop"  # torch's vmap fallback warning (an op without a batching rule)


@dataclass
class Setup:
    """How a step runs: ``compile_step``'s value (``False``: eager), the autocast precision, ``channels_last``."""

    compile_step: bool | dict[str, Any]
    precision: str
    channels_last: bool

    def describe(self, device: torch.device) -> str:
        """``captured (inductor, CUDA graphs), bf16 autocast, channels_last`` and the like."""
        if self.compile_step is False:
            capture = "eager"
        else:
            backend = "inductor" if self.compile_step is True else self.compile_step.get("backend", "inductor")
            graphs = ", CUDA graphs" if device.type == "cuda" and self.compile_step is True else ""
            capture = f"captured ({backend}{graphs})"
        precision = "bf16 autocast" if self.precision == "bf16" else "fp32"
        return f"{capture}, {precision}, {'channels_last' if self.channels_last else 'contiguous'}"

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """The step's autocast (as Lightning's ``bf16-mixed`` wraps ``training_step``), or none for fp32."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()


REFERENCE = Setup(compile_step=False, precision="fp32", channels_last=False)
"""The reference row's setup: the eager fp32 step, contiguous (the step's options of ``trainer=gpu`` off)."""


@dataclass
class Variant:
    """One timed step: a run or a pack, its batching, its setup, and the captured function it trains through."""

    runs: int
    batching: str
    setup: Setup
    step: Callable[[], None]
    graph: Callable[[], Captured | None]
    reference: bool = False
    times: list[float] = field(default_factory=list)
    drop_counts: dict[str, int] = field(default_factory=lambda: {"first": 0, "warmup": 0, "timed": 0})
    first_step_s: float = 0.0

    @property
    def key(self) -> str:
        """The row's name."""
        if self.reference:
            return "one run, eager fp32"
        return "one run" if self.runs == 1 else f"{self.runs} packed, {self.batching}"


def mma_module(model: Model, seed: int, setup: Setup = REFERENCE) -> MMAModule:
    """One run's module, as ``mma-train`` builds it (Adam), with ``setup``'s ``compile_step`` and
    ``channels_last``."""
    pl.seed_everything(seed, verbose=False)
    return MMAModule(model.make_net(), max_eps=model.max_eps, min_eps=model.min_eps, nb_iter=model.nb_iter,
                     search_steps=model.search_steps, eval_eps=model.max_eps / 2, num_train_samples=NUM_SAMPLES,
                     optimizer=partial(torch.optim.Adam, lr=1e-3), compile_step=setup.compile_step,
                     channels_last=setup.channels_last)


def batch(model: Model, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``(x, y, index)`` batch in the box (contiguous, as a loader gives it: the step converts it to its
    module's memory format)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(model.batch, *model.shape, generator=g)
    y = torch.randint(0, 10, (model.batch,), generator=g)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:model.batch]
    return x.to(device), y.to(device), index.to(device)


def single_step(model: Model, device: torch.device, setup: Setup = REFERENCE, reference: bool = False) -> Variant:
    """One separate run's training step (its ``training_step`` under ``setup``'s autocast, backward, Adam)."""
    module = mma_module(model, 0, setup).to(device)
    optimizer = module.configure_optimizers()
    data = batch(model, device, 0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast(device):
            loss = module.training_step(data, 0)
        loss.backward()
        optimizer.step()

    return Variant(1, "-", setup, step, lambda: module.captures.get("train"), reference=reference)


def packed_step(model: Model, device: torch.device, n: int, batching: str, setup: Setup = REFERENCE) -> Variant:
    """One step of a pack of ``n`` runs (each with its own seed and batch), under ``setup``."""
    pack = PackedModule([mma_module(model, seed, setup) for seed in range(n)], seeds=list(range(n)),
                        batching=batching).to(device)
    optimizer = pack.configure_optimizers()
    batches = [batch(model, device, seed) for seed in range(n)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast(device):
            loss = pack.training_step(batches, 0)
        loss.backward()
        optimizer.step()

    def graph() -> Captured | None:
        return None if pack._graphs is None else pack._graphs[pack.batching_on(device)]

    return Variant(n, batching, setup, step, graph)


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def drop_warnings(variant: Variant, phase: str) -> Iterator[None]:
    """Count torch's vmap fallback warnings ("There is a performance drop") raised inside, into
    ``variant.drop_counts[phase]``; every other warning is ignored (``self.log`` outside a Trainer, ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", message=f".*{PERFORMANCE_DROP}")
        yield
    variant.drop_counts[phase] += sum(PERFORMANCE_DROP in str(w.message) for w in caught)


def timed(variant: Variant, device: torch.device, phase: str) -> float:
    """Run ``variant``'s step once (counting its warnings under ``phase``): its wall time, device included."""
    with drop_warnings(variant, phase):
        synchronize(device)
        start = time.perf_counter()
        variant.step()
        synchronize(device)
        return time.perf_counter() - start


def measure(model: Model, device: torch.device, runs: list[int], batchings: list[str], reps: int,
            setup: Setup = REFERENCE, reference: bool = False, warmup: int = 3) -> list[dict[str, Any]]:
    """Median step times of one run and of each pack size and batching under ``setup`` (and of one eager fp32
    run with ``reference``), timed in alternation after ``warmup`` steps each (the first compiles a captured
    step); images/s, the ratio to one run's images/s and to the reference's, each captured function's state and
    first call, and the vmap fallback warnings."""
    variants = [single_step(model, device, setup)]
    for n in runs:
        variants += [packed_step(model, device, n, batching, setup) for batching in (batchings if n > 1 else [])]
    if reference:
        variants.append(single_step(model, device, REFERENCE, reference=True))
    for variant in variants:  # the first call (compile and check when captured), then the warm-up
        variant.first_step_s = timed(variant, device, "first")
        for _ in range(warmup - 1):
            timed(variant, device, "warmup")
    for _ in range(reps):
        for variant in variants:
            variant.times.append(timed(variant, device, "timed"))
    one, ref = variants[0], variants[-1] if reference else None
    rows = []
    for variant in variants:
        n, median = variant.runs, statistics.median(variant.times)
        # each round's own ratio (the pack against the one-run step timed next to it): their quartiles say how
        # much of the median ratio is the machine's noise
        ratios = sorted(n * t_one / t for t_one, t in zip(one.times, variant.times))
        low, high = (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0], ratios[0]))
        graph = variant.graph()
        rows.append({
            "runs": n, "batching": variant.batching, "variant": variant.key, "reference": variant.reference,
            "setup": variant.setup.describe(device), "precision": variant.setup.precision,
            "channels_last": variant.setup.channels_last, "compile_step": variant.setup.compile_step,
            "state": "off" if graph is None else graph.state,
            "first_call_s": None if graph is None else graph.first_call_s,
            "fallback_reason": None if graph is None else graph.fallback_reason,
            "first_step_s": variant.first_step_s,
            "step_ms": 1000 * median, "images_per_s": n * model.batch / median,
            "vs_one_run": n * statistics.median(one.times) / median,
            "vs_reference": None if ref is None else n * statistics.median(ref.times) / median,
            "round_ratio_q1": low, "round_ratio_q3": high, "reps": reps, "warmup": warmup,
            "perf_drop_warnings": sum(variant.drop_counts.values()),
            "perf_drop_warnings_first_call": variant.drop_counts["first"],
            "perf_drop_warnings_per_step": variant.drop_counts["timed"] / reps})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as printed: speed, ratios, first call and warnings; a variant that fell back to eager prints
    that with the reason instead of a speed."""
    reference = any(r["reference"] for r in rows)
    lines = [f"{'variant':>19} {'step ms':>9} {'images/s':>9} {'x one run':>10} {'rounds q1-q3':>13}"
             + (f" {'x eager fp32':>12}" if reference else "") + f" {'first call s':>12} {'perf-drop warns':>18}"]
    for r in rows:
        warns = f"{r['perf_drop_warnings']} ({r['perf_drop_warnings_per_step']:g}/step)"
        first = "-" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        if r["state"] == "eager":
            lines.append(f"{r['variant']:>19} fell back to eager (first step {r['first_step_s']:.1f} s): "
                         f"{r['fallback_reason']}; perf-drop warns {warns}")
            continue
        lines.append(f"{r['variant']:>19} {r['step_ms']:9.1f} {r['images_per_s']:9.1f} {r['vs_one_run']:10.2f} "
                     f"{r['round_ratio_q1']:6.2f}-{r['round_ratio_q3']:<6.2f}"
                     + (f" {r['vs_reference']:12.2f}" if reference else "") + f" {first:>12} {warns:>18}")
    return lines


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


def setup_from(args: argparse.Namespace, device: torch.device, parser: argparse.ArgumentParser) -> Setup:
    """The step's setup from the options, defaulting to ``trainer=gpu``'s on CUDA and eager fp32 elsewhere."""
    cuda = device.type == "cuda"
    capture = args.capture if args.capture is not None else (cuda or args.compile_backend is not None)
    if not capture and args.compile_backend is not None:
        parser.error("--compile-backend captures the step: it cannot go with --no-capture")
    backend = args.compile_backend or "inductor"
    if not capture:
        compile_step: bool | dict[str, Any] = False
    elif backend == "inductor":
        compile_step = True  # inductor, with CUDA graphs on a GPU (compile_step=true)
    else:  # another backend generates no CUDA graphs: no reduce-overhead mode
        compile_step = {"backend": backend, "mode": None} if cuda else {"backend": backend}
    precision = args.precision or ("bf16" if cuda else "fp32")
    channels_last = args.channels_last if args.channels_last is not None else cuda
    return Setup(compile_step, precision, channels_last)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, measure, print the table; returns the report (also written with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: wrn on a GPU, lenet on the CPU")
    parser.add_argument("--runs", default="1,2,4,8", help="pack sizes, comma-separated (1: one run)")
    parser.add_argument("--batching", choices=["vmap", "loop", "both"], default="both",
                        help="the packs' batching (PackedModule(batching=...)); both: each pack size twice")
    parser.add_argument("--capture", action=argparse.BooleanOptionalAction, default=None,
                        help="the captured step (compile_step); default: on a GPU, or with --compile-backend")
    parser.add_argument("--compile-backend", choices=["eager", "aot_eager", "inductor"], default=None,
                        help="the captured step's torch.compile backend (implies --capture); default inductor "
                        "(with CUDA graphs on a GPU)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="bf16: the step under bf16 autocast (bf16-mixed); default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last weights and batches; default: on a GPU")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one run eager in fp32, contiguous (when the setup is another)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps of each variant before the timed ones (the first compiles a captured "
                        "step and checks it; the next record its CUDA graphs)")
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
        if args.reps < 1 or args.warmup < 1 or runs[0] < 1:
            parser.error("--reps, --warmup and every pack size must be >= 1")
        setup = setup_from(args, device, parser)
        if device.type == "cuda":  # as trainer=gpu (benchmark: true) and mma-train (float32_matmul_precision)
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        batchings = ["loop", "vmap"] if args.batching == "both" else [args.batching]
        rows = measure(model, device, runs, batchings, args.reps, setup,
                       reference=args.reference and setup != REFERENCE, warmup=args.warmup)
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({torch.get_num_threads()} threads)")
        report = {"model": model.name, "device": name, "torch": torch.__version__, "setup": setup.describe(device),
                  "warmup": args.warmup, "rows": rows}
        title = (f"{model.name} on {name}: {setup.describe(device)}; median of {args.reps} alternated steps "
                 f"after {args.warmup} warm-up steps each")
        lines = [title, *table(rows)]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
