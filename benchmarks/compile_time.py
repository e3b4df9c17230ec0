"""Compile time, graph count and step time of the captured MMA training step, for its two designs.

``MMAModule(compile_step={"graphs": ...})`` captures the training step (clean forward, AN-PGD with K steps, the
margin search with S bisection steps, the loss) in one of two ways (:mod:`mma_lightning.capture`):

- ``"step"``: the whole step as ONE graph (``torch.compile(fullgraph=True, dynamic=False)``), the attack loops
  unrolled, so the graph grows with K and S;
- ``"passes"``: the step runs eagerly in Python and the network is a :class:`~mma_lightning.capture.CapturedModel`:
  one compiled graph per kind of network pass (train-mode forward with parameter gradients, eval-mode forward
  with the input gradient, eval-mode forward without gradient, ...), replayed in the loops, whatever K and S.

For each (K, S) (``S = K``) and each design, on one random CIFAR-shaped batch of a model fitted to it (so that
every sample is correctly classified and attacked), this measures:

- ``graphs``: the graphs dynamo compiled during the first call (``counters["stats"]["unique_graphs"]``) and
  ``ops``: the operations it traced into them (``counters["stats"]["calls_captured"]``, the graphs' size);
- ``first s``: the wall time of the first step (``training_loss`` + ``backward``). With ``compile_step`` it holds
  the compile AND the first-call check against eager (the step run three times: captured, eager, captured
  again); ``compile s`` is the compile alone, dynamo's own timers (``torch._dynamo.utils.compile_times``: tracing,
  AOTAutograd, the backend's forward compile, and the backward compile, which runs lazily at the first
  backward); ``trace s`` is dynamo's bytecode tracing within it;
- ``steady ms``: the median wall time of a later step (loss + backward), the designs and the eager baseline
  (``compile_step=False``) alternated step by step (``--reps`` steps each, after one warm step); steps that
  recompiled anything are counted (``recompiled``: should be 0);
- ``state``: ``captured``, or ``eager`` where the step fell back (the reason is printed below the table). Where
  the first call's check against eager failed (at a small batch one sample's margin search settling on the other
  side of a tie is enough), the benchmark puts the compiled step back for its steady state and says ``forced``;
- the on-disk caches: FX graph cache and AOTAutograd cache hits / misses / bypasses during the first call,
  and the reason dynamo's AOTAutograd cache gave for a bypass (logged by torch).

Compile caches: every (design, model, K, S, batch, backend) compiles into its own subfolder of ``--cache-dir``
(default ``$TORCHINDUCTOR_CACHE_DIR`` or ``/tmp/torchinductor_<user>``), with inductor's in-memory caches cleared,
so that a first run measures a cold compile of each configuration (the passes of "passes" are the same graphs
at every K and would otherwise hit the cache of the previous K). Running the script a second time with the same
``--cache-dir`` (a new process) measures the warm start a rerun of the same configuration gets; ``--shared-cache``
compiles everything into ``--cache-dir`` itself instead (what a user's runs share). Before the first
configuration one small function is compiled (``--no-warmup`` to skip), so that the process's one-time start-up
of the compiler is in no row. torch runs on one thread (``--threads``): on a shared, loaded CPU more threads
spin-wait, and a step's time then says more about the other processes than about the step.

``--no-inference-mode-in-graph`` runs an experiment: the attacks' ``torch.inference_mode(False)`` block
(:func:`~mma_lightning.attacks.context.grad_enabled_outside_inference`) is replaced, for this process only, by a
version that leaves inference mode only when not compiling, so a traced step holds no ``_enter_inference_mode``
call (which AOTAutograd's cache refuses to cache: a rerun then re-traces the whole step).

Usage: ``python benchmarks/compile_time.py [--model wrn10_1|wrn28_4] [--ks 1,2,5,10] [--designs step,passes]
[--backend inductor] [--batch 8] [--reps 5] [--cache-dir DIR] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import compilation_time_metrics, counters

from mma_lightning import MMAModule
from mma_lightning.attacks import soft_logit_margin
from mma_lightning.models import WideResNet, wrn28_4

DESIGNS = ("step", "passes")
BASELINE = "eager"
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (factory, input shape, classes); both with per-image standardisation inside (conf/model/wrn28_4.yaml)
    "wrn10_1": (lambda: WideResNet(10, 1, num_classes=10, in_channels=3, standardize=True), (3, 32, 32), 10),
    "wrn28_4": (lambda: wrn28_4(num_classes=10, in_channels=3), (3, 32, 32), 10),
}
MAX_EPS, MIN_EPS = 32 / 255, 0.005  # CIFAR10's Linf MMA preset
CACHE_LOGGER = "torch._functorch._aot_autograd.autograd_cache"


@dataclass
class Row:
    """One design at one configuration (see the module docstring for the measures)."""

    design: str
    model: str
    nb_iter: int
    search_steps: int
    batch: int
    backend: str
    fitted: float = float("nan")
    graphs: int = 0
    ops: int = 0
    first_s: float = float("nan")
    compile_s: float = float("nan")
    trace_s: float = float("nan")
    check_s: float | None = None
    steady_ms: float = float("nan")
    steady_runs: int = 0
    steady_all_ms: list[float] = field(default_factory=list)
    recompiled: int = 0
    state: str = ""
    fallback_reason: str | None = None
    cache: dict[str, int] = field(default_factory=dict)
    cache_bypass: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cache_dir: str | None = None


# --- the experiment of --no-inference-mode-in-graph ------------------------------------------------------------
@contextlib.contextmanager
def _grad_enabled_leaving_inference_only_eagerly() -> Iterator[None]:
    """``grad_enabled_outside_inference`` without ``inference_mode(False)`` under ``torch.compile`` (dynamo folds
    ``is_compiling()`` to ``True``; it refuses to trace ``torch.is_inference_mode_enabled``), so a traced step
    holds no ``_enter_inference_mode`` node. A captured function is always called outside inference mode
    (:mod:`mma_lightning.methods.base` clones the evaluation's inputs under ``inference_mode(False)``)."""
    mode = contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False)
    with mode, torch.enable_grad():
        yield


def patch_inference_mode() -> None:
    """Replace the attacks' ``grad_enabled_outside_inference`` (this process only) by the version above."""
    from mma_lightning.attacks import context, margin, pgd
    for module in (context, margin, pgd):
        module.grad_enabled_outside_inference = _grad_enabled_leaving_inference_only_eagerly  # type: ignore[attr-defined]


# --- the measures ---------------------------------------------------------------------------------------------
class _BypassReasons(logging.Handler):
    """Collects AOTAutograd's "Bypassing autograd cache due to: ..." messages (first line of each)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Bypassing autograd cache" in message:
            line = message.strip().splitlines()[0]
            self.reasons.append(re.sub(r" at 0x[0-9a-f]+", "", line))


@contextlib.contextmanager
def bypass_reasons() -> Iterator[list[str]]:
    """The AOTAutograd cache's bypass reasons logged inside the block."""
    handler = _BypassReasons()
    logger = logging.getLogger(CACHE_LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the messages here, not on torch's own log handlers
    logger.addHandler(handler)
    try:
        yield handler.reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _counts() -> dict[str, int]:
    """The dynamo counters this benchmark reads, as flat ``group.name`` numbers."""
    out = {f"stats.{k}": v for k, v in counters["stats"].items()}
    out.update({f"aot_autograd.{k}": v for k, v in counters["aot_autograd"].items() if "cache" in k})
    out.update({f"inductor.{k}": v for k, v in counters["inductor"].items() if "cache" in k})
    return out


def _metrics() -> dict[str, int]:
    """How many times each of dynamo's compile timers has run so far."""
    return {k: len(v) for k, v in compilation_time_metrics.items()}


def _new_seconds(before: dict[str, int], key: str) -> float:
    """Seconds the timer ``key`` recorded since ``before`` (:func:`_metrics`)."""
    return float(sum(compilation_time_metrics.get(key, [])[before.get(key, 0):]))


def compile_seconds(before: dict[str, int]) -> tuple[float, float]:
    """Compile time since ``before``: dynamo's frame compiles (tracing, AOTAutograd, the forward's backend compile)
    plus the lazy backward compiles; and the bytecode tracing within it."""
    total = _new_seconds(before, "_compile.compile_inner")
    for key in compilation_time_metrics:
        if key.startswith("compile_fx.") and key.endswith("bw_compiler"):
            total += _new_seconds(before, key)
    return total, _new_seconds(before, "bytecode_tracing")


def fit_to_batch(net: nn.Module, x: Tensor, y: Tensor, max_steps: int = 300) -> float:
    """Train ``net`` on the one batch until every sample has SLM < 0 in train and eval mode (so every sample is
    attacked, as in a trained model); the fraction of such samples at the end."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    fraction = 0.0
    for _ in range(max_steps):
        with torch.no_grad():
            net.eval()
            ok = soft_logit_margin(net(x), y) < -1.0
            net.train()
            ok &= soft_logit_margin(net(x), y) < -1.0
        fraction = float(ok.float().mean())
        if fraction == 1.0:
            break
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.train()
    return fraction


def make_module(net: nn.Module, design: str, nb_iter: int, search_steps: int, backend: str,
                batch: int) -> MMAModule:
    """An MMA module (CIFAR10's Linf preset) on ``net`` for ``design`` (``"step"``, ``"passes"`` or ``"eager"``),
    in train mode, its eps table sized for one batch."""
    compile_step: bool | dict[str, Any] = False
    if design != BASELINE:
        compile_step = {"graphs": design} if backend == "inductor" else {"graphs": design, "backend": backend}
    module = MMAModule(net, norm="linf", max_eps=MAX_EPS, min_eps=MIN_EPS, nb_iter=nb_iter,
                       search_steps=search_steps, compile_step=compile_step)
    module.eps_store.resize(batch)
    module.train()
    return module


def _keep_compiled_on_fallback(capture: Any) -> None:
    """Keep the compiled function of ``capture`` (a :class:`~mma_lightning.capture.Captured`) when its first call
    falls back to eager (the fallback drops it), for :func:`_replay_despite_check`."""
    fall_back = capture._fall_back

    def keep(reason: str) -> None:
        capture._benchmark_kept = capture._compiled
        fall_back(reason)

    capture._fall_back = keep


def _replay_despite_check(capture: Any) -> bool:
    """After a first call whose captured result differed from the eager one (the run goes on eagerly), put the
    compiled function back, so that the steady state still times the compiled step (state ``"forced"``; a
    compiler error is left as it is). Whether the fallback was right is the row's ``fallback_reason``."""
    kept = getattr(capture, "_benchmark_kept", None)
    reason = capture.fallback_reason or ""
    if capture.state != "eager" or kept is None or "differs from the eager one" not in reason:
        return False
    capture._compiled, capture.state = kept, "captured"
    return True


def make_step(module: MMAModule, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One training step outside a Trainer: the loss, its backward, the gradients dropped (weights unchanged)."""
    index = torch.arange(x.shape[0])

    def step() -> None:
        module.training_loss(x, y, index).backward()
        for p in module.net.parameters():
            p.grad = None

    return step


@contextlib.contextmanager
def cache_folder(path: Path | None) -> Iterator[None]:
    """Inductor's caches in ``path`` (in-memory caches cleared on entry and exit); nothing changed for ``None``."""
    if path is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    path.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(path)):
        yield


def warm_up(backend: str) -> None:
    """Compile and run one small conv step (forward and backward), so that the compiler's one-time start-up of
    the process (imports, the system's keys) falls in no row; then forget it."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    compiled = torch.compile(net, backend=backend, fullgraph=True, dynamic=False)
    compiled(torch.rand(2, 3, 8, 8)).sum().backward()
    torch._dynamo.reset()


def measure_config(make_net: Callable[[], nn.Module], shape: Sequence[int], num_classes: int, model: str,
                   nb_iter: int, search_steps: int, designs: Sequence[str], backend: str = "inductor",
                   batch: int = 8, reps: int = 5, cache_root: Path | None = None, fit_steps: int = 300,
                   seed: int = 0) -> list[Row]:
    """The rows of ``designs`` (plus the eager baseline, first) at one (model, K, S): each design's first step in
    turn (its own cache subfolder of ``cache_root`` unless ``cache_root`` is ``None``), then ``reps`` steps of each,
    alternated (the order rotated every round)."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    base = make_net()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, *shape, generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    fitted = fit_to_batch(base, x, y, fit_steps)

    names = [BASELINE, *[d for d in designs if d != BASELINE]]
    rows: dict[str, Row] = {}
    steps: dict[str, Callable[[], None]] = {}
    modules: dict[str, MMAModule] = {}
    for name in names:
        row = Row(name, model, nb_iter, search_steps, batch, backend if name != BASELINE else "-", fitted)
        module = make_module(copy.deepcopy(base), name, nb_iter, search_steps, backend, batch)
        step = make_step(module, x, y)
        folder = None
        if cache_root is not None and name != BASELINE:
            folder = cache_root / f"{name}-{model}-K{nb_iter}-S{search_steps}-b{batch}-{backend}"
            row.cache_dir = str(folder)
        capture = module.captures.get("train")
        if capture is not None:
            _keep_compiled_on_fallback(capture)
        row.load_before = os.getloadavg()
        counts, metrics = _counts(), _metrics()
        with cache_folder(folder), bypass_reasons() as reasons, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            step()
            row.first_s = time.perf_counter() - start
        row.load_after = os.getloadavg()
        delta = Counter(_counts())
        delta.subtract(counts)
        row.graphs = delta.pop("stats.unique_graphs", 0)
        row.ops = delta.pop("stats.calls_captured", 0)
        row.cache = {k: v for k, v in delta.items() if v}
        row.cache_bypass = sorted(set(reasons))
        row.compile_s, row.trace_s = compile_seconds(metrics)
        if capture is None:
            row.state, row.compile_s, row.trace_s = "eager", 0.0, 0.0
        else:
            row.state, row.fallback_reason = capture.state, capture.fallback_reason
            if _replay_despite_check(capture):
                row.state = "forced"
        rows[name], steps[name], modules[name] = row, step, module

    for name in names:  # one warm step each
        steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            rows[name].recompiled += counters["stats"]["unique_graphs"] - graphs
    for name, row in rows.items():
        row.steady_all_ms = [1000 * t for t in times[name]]
        row.steady_ms = statistics.median(row.steady_all_ms) if times[name] else float("nan")
        row.steady_runs = len(times[name])
        eager_ms = rows[BASELINE].steady_ms
        if name != BASELINE and row.state in ("captured", "forced") and math.isfinite(eager_ms):
            # the first call ran the step captured twice and eagerly once besides compiling
            row.check_s = 2 * row.steady_ms / 1000 + eager_ms / 1000
    return list(rows.values())


def format_table(rows: Sequence[Row]) -> str:
    """The rows as one text table."""
    header = ("design", "model", "K", "S", "batch", "graphs", "ops", "first s", "compile s", "trace s",
              "steady ms", "n", "recomp", "state", "load (1 min) before/after")
    lines = [header]
    for r in rows:
        lines.append((r.design, r.model, str(r.nb_iter), str(r.search_steps), str(r.batch), str(r.graphs),
                      str(r.ops), f"{r.first_s:.2f}", f"{r.compile_s:.1f}", f"{r.trace_s:.1f}",
                      f"{r.steady_ms:.1f}", str(r.steady_runs), str(r.recompiled), r.state,
                      f"{r.load_before[0]:.1f}/{r.load_after[0]:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for r in rows:
        if r.cache or r.cache_bypass or r.fallback_reason:
            parts = [f"{k}={v}" for k, v in sorted(r.cache.items())]
            parts += [f"AOTAutograd cache bypassed: {reason}" for reason in r.cache_bypass]
            if r.fallback_reason:
                parts.append(f"fell back to eager: {r.fallback_reason}")
            notes.append(f"{r.design} {r.model} K={r.nb_iter} S={r.search_steps}: " + "; ".join(parts))
    return "\n".join(text + ([""] + notes if notes else []))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="wrn10_1")
    parser.add_argument("--ks", default="1,2,5,10", help="comma-separated K values (S = K)")
    parser.add_argument("--ss", default=None, help="comma-separated S values, one per K (default: S = K)")
    parser.add_argument("--designs", default="step,passes", help=f"comma-separated, of {list(DESIGNS)}")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="alternated steady-state steps per design")
    parser.add_argument("--fit-steps", type=int, default=300, help="at most this many steps fitting the batch")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="inductor's cache root (default $TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_<user>)")
    parser.add_argument("--shared-cache", action="store_true",
                        help="compile every configuration into --cache-dir itself, not a subfolder each")
    parser.add_argument("--no-warmup", action="store_true", help="do not compile a small function first")
    parser.add_argument("--no-inference-mode-in-graph", action="store_true",
                        help="experiment: keep inference_mode(False) out of the traced step (see the docstring)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared, loaded CPU more threads spin-wait; "
                             "0 keeps torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    for design in args.designs.split(","):
        if design not in DESIGNS:
            parser.error(f"--designs: {design!r} is not one of {list(DESIGNS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_inference_mode_in_graph:
        patch_inference_mode()
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    if args.cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir.resolve())
    root = Path(cache_dir())
    make_net, shape, num_classes = MODELS[args.model]
    ks = [int(k) for k in args.ks.split(",")]
    ss = [int(s) for s in args.ss.split(",")] if args.ss else ks
    if len(ss) != len(ks):
        raise SystemExit("--ss needs one value per --ks value")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cache_dir": str(root), "argv": list(argv) if argv is not None else sys.argv[1:], "load_start": os.getloadavg()}
    print(", ".join(f"{k} {v}" for k, v in meta.items() if v is not None), flush=True)
    if not args.no_warmup:
        with cache_folder(None if args.shared_cache else root / "warmup"):
            warm_up(args.backend)
    rows: list[Row] = []
    for k, s in zip(ks, ss):
        rows += measure_config(make_net, shape, num_classes, args.model, k, s, args.designs.split(","),
                               args.backend, args.batch, args.reps,
                               None if args.shared_cache else root, args.fit_steps)
        print(format_table(rows[-len(args.designs.split(",")) - 1:]), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print("\n" + format_table(rows))
    return rows


if __name__ == "__main__":
    main()
