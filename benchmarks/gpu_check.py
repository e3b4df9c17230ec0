"""Adversarial training and evaluation speed on one CUDA GPU: every section's figures, kept as they come.

Usage: ``python benchmarks/gpu_check.py [--json gpu_check.json]`` on a machine with one CUDA GPU, or
``python benchmarks/gpu_check.py --device cpu`` for every section at a reduced size (the test suite runs that mode;
its figures mean nothing, it proves the script works).

Nothing that finished is lost. Each section runs apart: an exception in one is recorded in the report (section,
type, message, the traceback's tail) and printed, and the next section runs; the exit status is 1 when a section
failed. The JSON report (``--json``, default ``gpu_check.json`` in the working directory) is rewritten atomically
before and after every section (and after every part of the long ones), so a run that is killed keeps what finished
and names the section it was in. The data the sections ``train`` and ``real`` need (``--data-dir``, ``--npz``) is
checked before anything runs: a missing file skips those sections, with the reason, and the others run. A section
that would end past the time budget (``--budget-min``; its estimate counts about 90 s of compilation per new
captured training-step graph on CUDA) is skipped and named (``--only`` runs it in a second run). Each section
starts from a clean dynamo state (``torch._dynamo.reset()``); none builds more than 8 graphs of one function.

Sections, in order of importance:

1. ``sync``: Lightning fits of MMA (eager, then the captured step) whose ``training_step`` runs, after warm-up,
   under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises. CUDA only.
2. ``passes``: one WRN-28-4 pass (forward without autograd; forward + backward to the input, what an attack step
   costs), batch 128, fp32 / bf16, eager and captured (the backbone compiled with CUDA graphs, frozen weights).
3. ``steps``: the training step of each method (MMA, PGD-AT, OMMA, TRADES, PGDLS, standard) at batch 128, eager
   and captured (``compile_step``), in the GPU defaults of ``trainer=gpu`` (bf16 autocast, channels_last): median
   of alternated steps, images per second, peak memory, the first call's seconds (compile and warm-up), MMA /
   PGD-AT.
4. ``projection``: the paper's 50k-step CIFAR10 MMA-32 run at the fastest MMA step, and the fraction of the card's
   bf16 peak it uses (FLOPs from the pass counts: 1.69 GFLOP per WRN-28-4 forward and 32x32 image).
5. ``batch``: the captured MMA step at batch 512 and 1024 (images per second; target >= 6,000 at 512).
6. ``train``: ``mma-train experiment=cifar10_linf_mma32 trainer=gpu`` (its config composed with Hydra's compose
   API and run by the same ``train`` function) for 300 steps on Fashion-MNIST (``--data-dir``), its steps per
   second next to the isolated captured step on the same shapes: what the command line costs on top.
7. ``eval``: ``evaluate_model`` with ``evaluation=fast``'s settings (mma-eval's evaluator) on CIFAR10-shaped points
   with WRN-28-4, batch size picked for the device, captured passes: images per second and the projected time of
   10,000 points (target <= 60 s). The labels are the model's own predictions, so every point is attacked.
8. ``real``: a 200-step MMA run of LeNet5-Madry on Fashion-MNIST (``--npz``, written from ``--data-dir``'s IDX
   files when missing), final ``train/avg_eps`` and ``val/robust_acc``.
9. ``tuning``: the captured MMA step at batch 512 with ``cudnn.benchmark`` off (everything above runs with it on, as
   ``trainer=gpu``) and with inductor's autotuning (``compile_step={mode: max-autotune}``): at batch 512 the step is
   kernel-bound, so the kernels' choice is what is left.

What a row reports:

- ``first_call_s``: the wall time of a variant's first call (for a captured step: compiling its graphs, the
  library's first-call check against eager, and the first run); ``warmup_s`` the warm-up calls' total; a section's
  ``compile_s``: dynamo's and inductor's compile time in it (``torch._dynamo.utils.compilation_time_metrics``).
- A captured step that fell back to eager (``module.captures[stage].state == "eager"``) is reported as
  ``fell back to eager: <reason>`` with its time under ``eager_ms``, never as a captured speed, and fails its section.
- CUDA graphs: on CUDA every captured variant runs with ``torch._inductor.config.triton.cudagraph_or_error`` set
  (where the installed torch has it), so a graph that would silently run without CUDA graphs raises and is
  recorded (the library's captured step turns that into a fallback, reported as above); every row and section
  also reports inductor's ``cudagraph_skips`` counter, and where that setting is missing a skip fails the section.
- Memory, per measurement (the peak counters are reset before each): ``peak_gib``
  (``torch.cuda.max_memory_allocated``) and ``peak_reserved_gib`` (``max_memory_reserved``). A CUDA-graph replay
  allocates nothing (its tensors live in the graph's private pool, taken when it was recorded), so it does not move
  ``max_memory_allocated``: for captured variants the reserved figure is the one to read.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from mma_lightning import MMAModule, PGDATModule, PGDLSModule, StandardModule, TRADESModule
from mma_lightning.attacks.checks import host_checks
from mma_lightning.capture import CapturedModel
from mma_lightning.data import TensorDataModule
from mma_lightning.data.vision import IDX_FILES, find_idx_file, read_idx
from mma_lightning.evaluation import eps_grid, evaluate_model
from mma_lightning.evaluation.atomic import write_atomically
from mma_lightning.evaluation.batches import device_batch_size
from mma_lightning.methods.base import AdversarialModule
from mma_lightning.models import LeNet5Madry
from mma_lightning.models.wideresnet import WideResNet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_time import PassCounter  # the sibling benchmark's hook counter

NPZ = HERE / "fashion_mnist.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
WRN28_4_GFLOP_PER_IMAGE = 1.69  # forward of WRN-28-4 on one 32x32 image
PAPER_STEPS = 50_000  # CIFAR10 MMA-32 (Ding et al. 2020): 50k steps of batch 128
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SECTIONS = ("sync", "passes", "steps", "projection", "batch", "train", "eval", "real", "tuning")
DATA_SECTIONS = ("train", "real")  # the sections that read Fashion-MNIST (--data-dir, --npz)
METHODS = ("mma", "pgd_at", "omma", "trades", "pgdls", "standard")
TARGETS = {"paper_run_minutes": 45.0, "batch512_img_per_s": 6000.0, "eval_fast_10k_seconds": 60.0}
# Compile time the budget counts for each new graph: a captured training step (the WRN-28-4 MMA step unrolls ~34
# passes; on a GPU host inductor can take minutes over it) and one model pass (the evaluation's, section 2's).
STEP_GRAPH_S = {"cuda": 90.0, "cpu": 15.0}
PASS_GRAPH_S = {"cuda": 30.0, "cpu": 3.0}
GRAPHS_PER_FUNCTION = 8  # dynamo's recompile_limit: the 9th graph of one function in one process fails
TRACEBACK_LINES = 12  # the tail of a failure's traceback kept in the report


@dataclass
class Size:
    """The sizes of one mode: full (a GPU) or reduced (``--device cpu``: the smallest that runs every path)."""

    depth: int
    width: int
    batch: int
    big_batches: tuple[int, ...]
    nb_iter: int
    search_steps: int
    reps: int
    train_steps: int
    train_images: int
    eval_points: int
    real_steps: int
    real_batch: int
    real_nb_iter: int
    real_train: int
    real_val: int


FULL = Size(depth=28, width=4, batch=128, big_batches=(512, 1024), nb_iter=10, search_steps=10, reps=10,
            train_steps=300, train_images=20_000, eval_points=2_000, real_steps=200, real_batch=50, real_nb_iter=10,
            real_train=20_000, real_val=1_000)
REDUCED = Size(depth=10, width=1, batch=4, big_batches=(8,), nb_iter=1, search_steps=1, reps=1, train_steps=3,
               train_images=32, eval_points=8, real_steps=2, real_batch=8, real_nb_iter=1, real_train=32, real_val=8)


class Budget:
    """The wall-clock budget of the whole check: sections that would start past it are skipped."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.perf_counter() + 60 * minutes
        self.skipped: list[str] = []
        self.reasons: dict[str, str] = {}

    def allows(self, section: str, needs_s: float) -> bool:
        if time.perf_counter() + needs_s <= self.deadline:
            return True
        reason = (f"about {needs_s:.0f} s needed, {max(0.0, self.deadline - time.perf_counter()):.0f} s of the "
                  f"budget left (--only {section.split(':')[0]})")
        self.skip(section, reason)
        return False

    def skip(self, section: str, reason: str) -> None:
        """Name ``section`` as skipped, for ``reason``."""
        self.skipped.append(section)
        self.reasons[section] = reason
        print(f"\n[{section}] skipped: {reason}", flush=True)


class Skip(Exception):
    """A section that does not run here (no CUDA, no budget, nothing to build on): skipped, not failed."""


# --- the report ----------------------------------------------------------------------------------------------------
def write_json(report: dict[str, Any], path: Path) -> None:
    """``report`` as JSON at ``path``, atomically (a temporary file in the same folder, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(report, indent=2, default=str).encode())


def describe_error(where: str, error: BaseException) -> dict[str, Any]:
    """What the report keeps of a failure: where, the exception's type and message, the traceback's tail."""
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip().splitlines()
    return {"where": where, "type": type(error).__name__, "message": str(error)[:2000],
            "traceback": lines[-TRACEBACK_LINES:]}


@dataclass
class Run:
    """What the sections share: the settings, the budget, the report and where it is written."""

    args: argparse.Namespace
    device: torch.device
    size: Size
    reps: int
    backend: str
    budget: Budget
    report: dict[str, Any]
    json_path: Path | None
    section: str = ""
    cudagraph_mode: str = "n/a"
    wanted: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)

    @property
    def full(self) -> bool:
        return self.size is FULL

    def allows(self, label: str, run_s: float, step_graphs: int = 0, pass_graphs: int = 0) -> bool:
        """The budget's verdict on ``label``: ``run_s`` seconds of running plus the compile estimate of its new
        graphs (captured training steps, model passes)."""
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        return self.budget.allows(label, run_s + step_graphs * STEP_GRAPH_S[kind] + pass_graphs * PASS_GRAPH_S[kind])

    def save(self) -> None:
        """Rewrite the JSON report (atomically)."""
        if self.json_path is not None:
            write_json(self.report, self.json_path)

    def state(self) -> dict[str, Any]:
        """The current section's entry of ``report["sections"]``."""
        return self.report["sections"][self.section]

    def error(self, where: str, error: BaseException | dict[str, Any]) -> None:
        """Record a failure in the current section (which then fails) and print it; the section goes on."""
        entry = error if isinstance(error, dict) else describe_error(where, error)
        self.state()["errors"].append(entry)
        print(f"  [{self.section}] {entry['where']} failed: {entry['type']}: {entry['message'][:500]}", flush=True)

    @contextmanager
    def part(self, where: str) -> Iterator[None]:
        """A part of a section (one method's steps, one batch size): a failure is recorded and the section goes
        on with its next part; the report is written after it either way."""
        try:
            yield
        except Exception as error:  # noqa: BLE001  (recorded; the next part runs)
            self.error(where, error)
        finally:
            self.save()

    def check_rows(self, rows: list[dict[str, Any]]) -> None:
        """Record as the section's failures the rows that failed, fell back to eager, or skipped CUDA graphs."""
        for r in rows:
            where = "/".join(str(r[k]) for k in ("method", "precision", "variant", "batch") if k in r)
            if "error" in r:
                self.error(where, r["error"])
            elif r.get("capture_state") == "eager":
                self.error(where, {"where": where, "type": "FellBackToEager", "message": r["status"],
                                   "traceback": []})
            elif r.get("cudagraph_skips") and self.cudagraph_mode == "counter" \
                    and r.get("captured", r.get("variant") != "eager"):
                self.error(where, {"where": where, "type": "CudagraphSkipped", "message":
                                   f"inductor skipped CUDA graphs {r['cudagraph_skips']} time(s): not a "
                                   "CUDA-graph speed", "traceback": []})


def cudagraph_skips() -> int:
    """Inductor's count of the graphs it ran without CUDA graphs ("skipping cudagraphs due to ...")."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def compile_seconds() -> float:
    """Dynamo's (and, inside it, the backend's) compile time so far in this process."""
    from torch._dynamo.utils import compilation_time_metrics
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


@contextmanager
def cudagraphs_or_error(device: torch.device) -> Iterator[str]:
    """On CUDA, ``torch._inductor.config.triton.cudagraph_or_error`` on inside the block (a graph inductor would
    run without CUDA graphs raises instead); yields how skips are caught: ``"error"``, ``"counter"`` (a torch
    without that setting: inductor's ``cudagraph_skips`` counter, checked per row) or ``"n/a"`` (CPU)."""
    if device.type != "cuda":
        yield "n/a"
        return
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "cudagraph_or_error"):
        yield "counter"
        return
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        yield "error"


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peaks(device: torch.device) -> dict[str, float | None]:
    """Peak allocated and reserved GiB since the last :func:`memory_reset` (``None`` off CUDA)."""
    if device.type != "cuda":
        return {"peak_gib": None, "peak_reserved_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def capture_info(module: Any, stage: str = "train") -> dict[str, Any]:
    """``module.captures[stage]``'s state (``"pending"``, ``"captured"``, ``"eager"``), its first call's seconds
    and why it fell back; empty for a module without captured functions (or a library without ``captures``)."""
    captures = getattr(module, "captures", None)
    captured = captures.get(stage) if isinstance(captures, dict) else None
    if captured is None:
        return {}
    return {"capture_state": getattr(captured, "state", None),
            "capture_first_call_s": getattr(captured, "first_call_s", None),
            "fallback_reason": getattr(captured, "fallback_reason", None)}


def fell_back(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` of a captured variant that fell back to eager: its time moves to ``eager_ms`` and its status names
    the fallback, so that it is never read as a captured speed."""
    if row.get("capture_state") == "eager":
        row["status"] = f"fell back to eager: {row.get('fallback_reason') or 'no reason given'}"
        row["eager_ms"], row["ms"], row["img_per_s"] = row.get("ms"), None, None
    return row


# --- the models and modules --------------------------------------------------------------------------------------
def wrn(size: Size, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return WideResNet(depth=size.depth, widen_factor=size.width, in_channels=in_channels)


def method_module(name: str, net: nn.Module, size: Size, num_samples: int, **options: Any) -> AdversarialModule:
    """The CIFAR10 presets' settings (Linf, K = 10): MMA-32 / OMMA-32, PGD-8, PGDLS-8, TRADES 8/255, standard."""
    common = dict(norm="linf", eval_eps=8 / 255, **options)
    mma = dict(max_eps=32 / 255, min_eps=0.005, nb_iter=size.nb_iter, search_steps=size.search_steps,
               num_train_samples=num_samples)
    if name == "mma":
        return MMAModule(net, **mma, **common)
    if name == "omma":
        return MMAModule(net, clean_loss_coeff=0.0, **mma, **common)
    if name == "pgd_at":
        return PGDATModule(net, eps=8 / 255, nb_iter=size.nb_iter, **common)
    if name == "pgdls":
        return PGDLSModule(net, eps=8 / 255, nb_iter=size.nb_iter, ramp_steps=1000, **common)
    if name == "trades":
        return TRADESModule(net, eps=8 / 255, nb_iter=size.nb_iter, **common)
    return StandardModule(net, **common)


def capture_option(device: torch.device, backend: str) -> bool | dict[str, Any]:
    """``compile_step``'s value: the default (CUDA graphs) on a GPU; the given backend on the CPU."""
    return True if device.type == "cuda" else {"backend": backend}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(module: AdversarialModule, x: Tensor, y: Tensor, index: Tensor, bf16: bool) -> Callable[[], None]:
    """One training step as Lightning runs it: the method's loss (under bf16 autocast if asked; value checks on
    the first call only, as in a Trainer), backward, SGD step."""
    opt = torch.optim.SGD(module.net.parameters(), lr=1e-4, momentum=0.9)
    device = x.device
    x = module.as_input(x)
    calls = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext(), \
                host_checks(calls[0] == 0):
            loss = module.training_loss(x, y, index)
        loss.backward()
        opt.step()
        calls[0] += 1

    return step


def time_alternated(steps: dict[str, Callable[[], None]], device: torch.device, reps: int,
                    warmup: int | None = None) -> dict[str, dict[str, Any]]:
    """Warm each step up (the first call compiles; CUDA graphs are recorded in the first calls), then time them
    alternately: median ms, peak GiB (allocated, reserved; counters reset before each timed call). A step that
    raises is recorded (``error``) and left out; the others are timed."""
    warmup = warmup if warmup is not None else (3 if device.type == "cuda" else 1)
    out: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        row: dict[str, Any] = out.setdefault(name, {})
        skips = cudagraph_skips()
        try:
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            for _ in range(warmup - 1):
                step()
            synchronize(device)
            row["warmup_s"] = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001  (recorded in the row; the other steps are timed)
            row["error"] = describe_error(f"{name} (first calls)", error)
        row["cudagraph_skips"] = cudagraph_skips() - skips
    live = {name: step for name, step in steps.items() if "error" not in out[name]}
    times: dict[str, list[float]] = {name: [] for name in live}
    peaks: dict[str, dict[str, float]] = {name: {} for name in live}
    for _ in range(reps):
        for name, step in list(live.items()):
            memory_reset(device)
            synchronize(device)
            t0 = time.perf_counter()
            try:
                step()
                synchronize(device)
            except Exception as error:  # noqa: BLE001
                out[name]["error"] = describe_error(f"{name} (timed calls)", error)
                del live[name]
                continue
            times[name].append(time.perf_counter() - t0)
            for key, value in memory_peaks(device).items():
                if value is not None:
                    peaks[name][key] = max(peaks[name].get(key, 0.0), value)
    for name in steps:
        t = times.get(name)
        out[name]["ms"] = statistics.median(t) * 1e3 if t and "error" not in out[name] else None
        out[name]["peak_gib"] = peaks.get(name, {}).get("peak_gib")
        out[name]["peak_reserved_gib"] = peaks.get(name, {}).get("peak_reserved_gib")
    return out


def batch_for(size: Size, batch: int, device: torch.device, shape: tuple[int, ...] = (3, 32, 32)
              ) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y, torch.arange(batch, device=device)


# --- 1. no host sync ------------------------------------------------------------------------------------------------
def sync_check(device: torch.device, size: Size, backend: str) -> dict[str, Any]:
    """Fit MMA a few steps, eager and captured; after warm-up ``training_step`` runs under sync debug "error"."""
    if device.type != "cuda":
        return {"ran": False, "why": "sync debug mode is CUDA-only; tests/test_sync.py checks the CPU proxy"}
    out: dict[str, Any] = {"ran": True}
    for variant, option in (("eager", False), ("captured", capture_option(device, backend))):
        warmup = 1 if option is False else 3  # the captured step records its CUDA graphs in its first calls
        module = method_module("mma", wrn(size), size, num_samples=4 * size.batch, compile_step=option,
                               channels_last=True)
        original = module.training_step
        calls: list[int] = []

        @functools.wraps(original)
        def guarded(*args: Any, original: Callable[..., Any] = original, calls: list[int] = calls,
                    warmup: int = warmup, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) <= warmup:
                return original(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        module.training_step = guarded  # type: ignore[method-assign]
        x = torch.rand(4 * size.batch, 3, 32, 32)
        y = torch.randint(0, 10, (4 * size.batch,))
        trainer = quiet_trainer(device, max_steps=warmup + 3, precision="bf16-mixed", limit_val_batches=0)
        t0 = time.perf_counter()
        trainer.fit(module, TensorDataModule(x, y, batch_size=size.batch))
        out[variant] = fell_back({"variant": variant, "guarded_steps": len(calls) - warmup, "raised": False,
                                  "fit_s": time.perf_counter() - t0, **capture_info(module)})
    return out


# --- 2. one pass ----------------------------------------------------------------------------------------------------
def pass_table(device: torch.device, size: Size, reps: int, backend: str) -> list[dict[str, Any]]:
    """One WRN pass at batch 128: forward without autograd, forward + backward to the input; eager / captured."""
    rows = []
    x, y, _ = batch_for(size, size.batch, device)
    x = x.contiguous(memory_format=torch.channels_last)
    for precision, captured in (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)):
        net = wrn(size).to(device).to(memory_format=torch.channels_last).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        model: nn.Module = CapturedModel(net, capture_option(device, backend)) if captured else net
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

        def forward(model: nn.Module = model, autocast: Callable[[], Any] = autocast) -> None:
            with torch.no_grad(), autocast():
                model(x)

        def attack_pass(model: nn.Module = model, autocast: Callable[[], Any] = autocast) -> None:
            delta = torch.zeros_like(x, requires_grad=True)
            with autocast():
                loss = nn.functional.cross_entropy(model(x + delta).float(), y)
            torch.autograd.grad(loss, delta)

        timed = time_alternated({"forward": forward, "attack_pass": attack_pass}, device, reps)
        f, a = timed["forward"], timed["attack_pass"]
        row: dict[str, Any] = {
            "precision": precision, "captured": captured, "variant": "captured" if captured else "eager",
            "batch": size.batch, "forward_ms": f["ms"],
            "attack_pass_ms": a["ms"], "first_call_s": (f.get("first_call_s") or 0.0) + (a.get("first_call_s") or 0.0),
            "warmup_s": (f.get("warmup_s") or 0.0) + (a.get("warmup_s") or 0.0),
            "peak_gib": max((v for v in (f["peak_gib"], a["peak_gib"]) if v is not None), default=None),
            "peak_reserved_gib": max((v for v in (f["peak_reserved_gib"], a["peak_reserved_gib"]) if v is not None),
                                     default=None),
            "cudagraph_skips": f["cudagraph_skips"] + a["cudagraph_skips"]}
        errors = [t["error"] for t in (f, a) if "error" in t]
        if errors:
            row["error"] = errors[0]
        rows.append(row)
    return rows


# --- 3. / 5. training steps -----------------------------------------------------------------------------------------
def step_times(device: torch.device, size: Size, batch: int, methods: tuple[str, ...], variants: tuple[str, ...],
               reps: int, backend: str, shape: tuple[int, ...] = (3, 32, 32)) -> list[dict[str, Any]]:
    """Each method's step at ``batch`` in the GPU defaults (bf16 on CUDA, channels_last), eager and captured
    (``"autotuned"``: captured with inductor's ``max-autotune``). A variant that fails has a row with its
    ``error``; one that fell back to eager says so (:func:`fell_back`)."""
    x, y, index = batch_for(size, batch, device, shape)
    bf16 = device.type == "cuda"
    steps, modules = {}, {}
    for method in methods:
        for variant in variants:
            option: bool | dict[str, Any] = capture_option(device, backend) if variant != "eager" else False
            if variant == "autotuned":
                option = {"mode": "max-autotune"} if device.type == "cuda" else {"backend": backend}
            module = method_module(method, wrn(size, shape[0]), size, batch, compile_step=option,
                                   channels_last=True).to(device)
            module.net.train()
            modules[f"{method}/{variant}"] = module
            steps[f"{method}/{variant}"] = make_step(module, x, y, index, bf16)
    timed = time_alternated(steps, device, reps)
    rows = []
    for key, t in timed.items():
        method, variant = key.split("/")
        ms = t["ms"]
        row = {"method": method, "variant": variant, "batch": batch, "ms": ms,
               "img_per_s": batch / (ms / 1e3) if ms else None, "peak_gib": t["peak_gib"],
               "peak_reserved_gib": t["peak_reserved_gib"], "first_call_s": t.get("first_call_s"),
               "warmup_s": t.get("warmup_s"), "cudagraph_skips": t["cudagraph_skips"],
               **capture_info(modules[key])}
        if "error" in t:
            row["error"] = t["error"]
        rows.append(fell_back(row))
    return rows


def count_passes(device: torch.device, size: Size) -> dict[str, dict[str, int]]:
    """Forwards and backwards of one eager MMA and PGD-AT step (module hooks)."""
    x, y, index = batch_for(size, size.batch, device)
    out = {}
    for method in ("mma", "pgd_at"):
        module = method_module(method, wrn(size), size, size.batch).to(device)
        module.net.train()
        step = make_step(module, x, y, index, bf16=False)
        step()
        counter = PassCounter(module.net)
        step()
        out[method] = {"forwards": counter.fwd_grad + counter.fwd_nograd, "backwards": counter.bwd}
        counter.remove()
    return out


def step_flops(passes: dict[str, int], training_passes: int, batch: int) -> float:
    """FLOPs of one step from its pass counts: forwards + attack backwards (~1 forward) + training backwards
    (~2 forwards: input and weight gradients), at 1.69 GFLOP per image and forward (WRN-28-4)."""
    attack_backwards = passes["backwards"] - training_passes
    units = passes["forwards"] + attack_backwards + 2 * training_passes
    return units * batch * WRN28_4_GFLOP_PER_IMAGE * 1e9


def bf16_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# --- 6. the command line -----------------------------------------------------------------------------------------------
class StepClock(pl.Callback):
    """Wall time of training steps ``first`` to the last, validation and checkpoints excluded (synchronised
    at the window's ends only, so the timed steps keep their asynchrony); at the end of training, the module's
    captured functions' states."""

    latest: StepClock | None = None

    def __init__(self, first: int = 50) -> None:
        self.first = first
        self.start: float | None = None
        self.end: float | None = None
        self.steps_at_start = 0
        self.steps_at_end = 0
        self.paused = 0.0
        self._pause: float | None = None
        self.captures: dict[str, dict[str, Any]] = {}
        StepClock.latest = self

    def _now(self, module: pl.LightningModule) -> float:
        synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.start is None and trainer.global_step == self.first:
            self.start, self.steps_at_start = self._now(module), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, out: Any, batch: Any,
                           i: int) -> None:
        if self.start is not None and trainer.global_step >= trainer.max_steps:
            self.end, self.steps_at_end = self._now(module), trainer.global_step

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.start is not None and self.end is None:
            self._pause = self._now(module)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._pause is not None:
            self.paused += self._now(module) - self._pause
            self._pause = None

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.captures = {stage: info for stage in ("train", "eval") if (info := capture_info(module, stage))}

    def step_ms(self) -> float | None:
        if self.start is None or self.end is None or self.steps_at_end <= self.steps_at_start:
            return None
        return (self.end - self.start - self.paused) / (self.steps_at_end - self.steps_at_start) * 1e3


def command_line_run(device: torch.device, size: Size, data_dir: Path, out_dir: Path, backend: str) -> dict[str, Any]:
    """``mma-train experiment=cifar10_linf_mma32 data=fashion_mnist trainer=gpu`` for ``size.train_steps`` steps,
    composed and run as the command does, with a step clock; then the isolated captured step on the same shapes."""
    from hydra import compose, initialize_config_module

    from mma_lightning.cli.train import train

    overrides = [
        "experiment=cifar10_linf_mma32", "data=fashion_mnist", f"data.data_dir={data_dir}", "data.download=false",
        f"data.train_subset={size.train_images}", "data.val_size=1000", "test=false",
        f"trainer.max_steps={size.train_steps}", f"paths.output_dir={out_dir}",
        f"attack.nb_iter={size.nb_iter}", f"method.search_steps={size.search_steps}",
        f"model.depth={size.depth}", f"model.widen_factor={size.width}",
        "+callbacks.step_clock._target_=gpu_check.StepClock",
    ]
    if device.type == "cuda":
        overrides.append("trainer=gpu")
    else:
        overrides += ["trainer=cpu", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
                      "data.num_workers=0", "data.val_size=8", f"data.eval_batch_size={size.batch}",
                      f"data.batch_size={size.batch}", f"method.compile_step={{backend: {backend}}}",
                      f"attack.eval_nb_iter={size.nb_iter}", f"method.eval_search_steps={size.search_steps}",
                      "method.channels_last=true", "+callbacks.step_clock.first=1",
                      "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    StepClock.latest = None
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    clock = StepClock.latest
    cli_ms = clock.step_ms() if clock is not None else None
    batch = int(cfg.data.batch_size)
    isolated = step_times(device, size, batch, ("mma",), ("captured",), size.reps, backend, shape=(1, 28, 28))[0]
    iso_ms = isolated["ms"]
    return {"steps": size.train_steps, "wall_s": wall, "cli_step_ms": cli_ms, "isolated_step_ms": iso_ms,
            "cli_over_isolated": cli_ms / iso_ms if cli_ms and iso_ms else None, "batch": batch,
            "precision": str(cfg.trainer.precision), "compile_step": str(cfg.method.compile_step),
            "cli_captures": clock.captures if clock is not None else {}, "isolated": isolated}


# --- 7. evaluation --------------------------------------------------------------------------------------------------
def evaluation_speed(device: torch.device, size: Size, backend: str) -> dict[str, Any]:
    """``evaluation=fast`` (mma-eval's evaluator and settings) on CIFAR10-shaped points, WRN-28-4."""
    net = wrn(size).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(size.eval_points, 3, 32, 32, generator=g)
    batch = device_batch_size(net, x[0]) if device.type == "cuda" else 8
    with torch.no_grad():
        y = torch.cat([net(c.to(device)).argmax(1).cpu() for c in x.split(batch)])  # every point is attacked
    capture = True if device.type == "cuda" else {"backend": backend}
    compiled = compile_seconds()
    t0 = time.perf_counter()
    ev = evaluate_model(net, (x, y), "linf", eps_grid("cifar10_linf"), nb_iter=20 if size is FULL else 2, restarts=1,
                        margin_nb_iter=20 if size is FULL else 2, margin_search_steps=10 if size is FULL else 2,
                        probe_samples=min(100, size.eval_points), probe_radii=1, batch_size=batch, progress=False,
                        capture=capture)
    seconds = time.perf_counter() - t0
    return {"points": size.eval_points, "batch": batch, "seconds": seconds,
            "compile_s": max(0.0, compile_seconds() - compiled),
            "img_per_s": size.eval_points / seconds, "projected_10k_s": 10_000 * seconds / size.eval_points,
            "clean_acc": ev.pgd.clean_accuracy, "avg_robust_acc": ev.pgd.avg_robust_accuracy}


# --- 8. a real-data run ---------------------------------------------------------------------------------------------
FASHION_KEYS = ("x_train", "y_train", "x_test", "y_test")


def idx_folder(data_dir: Path) -> Path | None:
    """The folder of ``data_dir`` holding Fashion-MNIST's four IDX files (plain or ``.gz``): torchvision's layout
    ``<data_dir>/FashionMNIST/raw`` or ``data_dir`` itself, as ``data=fashion_mnist`` reads them; else ``None``."""
    candidates = (data_dir / "FashionMNIST" / "raw", data_dir)
    return next((d for d in candidates if all(find_idx_file(d, stem) for stem in IDX_FILES)), None)


def npz_problem(path: Path) -> str | None:
    """Why ``path`` is not a Fashion-MNIST ``.npz`` as :func:`fashion_mnist` writes it; ``None`` when it is."""
    if not path.is_file():
        return "is missing"
    try:
        with np.load(path) as data:
            missing = [k for k in FASHION_KEYS if k not in data.files]
    except Exception as error:  # noqa: BLE001  (a truncated or foreign file)
        return f"cannot be read ({type(error).__name__}: {error})"
    return f"lacks {', '.join(missing)}" if missing else None


def data_problems(wanted: set[str], data_dir: Path, npz: Path) -> dict[str, str]:
    """The one-line reason each wanted data section (``train``, ``real``) cannot run, naming the flag to fix."""
    problems: dict[str, str] = {}
    idx = idx_folder(data_dir)
    if "train" in wanted and idx is None:
        problems["train"] = (f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in --data-dir "
                             f"{data_dir} (nor in its FashionMNIST/raw)")
    npz_bad = npz_problem(npz) if "real" in wanted else None
    if npz_bad is not None and idx is None:
        problems["real"] = (f"--npz {npz} {npz_bad}, and --data-dir {data_dir} holds no Fashion-MNIST IDX files "
                            "to write it from")
    return problems


def fashion_mnist(path: Path = NPZ, data_dir: Path = DEBIAN_FASHION_MNIST) -> dict[str, np.ndarray]:
    """Fashion-MNIST as uint8 arrays from ``path``; written there from ``data_dir``'s IDX files when missing."""
    if npz_problem(path) is not None:
        folder = idx_folder(data_dir)
        if folder is None:
            raise FileNotFoundError(f"{path} {npz_problem(path)} and {data_dir} holds no Fashion-MNIST IDX files "
                                    "to write it from (apt-get install -y dataset-fashion-mnist, or --data-dir)")
        files = {key: find_idx_file(folder, stem) for key, stem in zip(FASHION_KEYS, IDX_FILES)}
        arrays = {k: read_idx(f).numpy() for k, f in files.items()}  # type: ignore[arg-type]
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][:FULL.real_train], arrays["y_train"][:FULL.real_train]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def real_data_run(device: torch.device, size: Size, precision: str, npz: Path = NPZ,
                  data_dir: Path = DEBIAN_FASHION_MNIST) -> dict[str, Any]:
    """``experiment=quickstart`` on the GPU: MMA (Linf, d_max 0.2, min eps 0.02, K = 10), LeNet5-Madry, Adam
    1e-3, batch 50, on Fashion-MNIST for ``size.real_steps`` steps, then a validation at eps 0.1."""
    data = fashion_mnist(npz, data_dir)
    x = torch.from_numpy(data["x_train"][: size.real_train]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(data["y_train"][: size.real_train]).long()
    xv = torch.from_numpy(data["x_test"][: size.real_val]).float().div(255).unsqueeze(1)
    yv = torch.from_numpy(data["y_test"][: size.real_val]).long()
    torch.manual_seed(0)
    module = MMAModule(LeNet5Madry(), norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=size.real_nb_iter,
                       eval_eps=0.1, eval_nb_iter=size.real_nb_iter,
                       optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    data_module = TensorDataModule(x, y, x_val=xv, y_val=yv, batch_size=size.real_batch)
    t0 = time.perf_counter()
    trainer = quiet_trainer(device, max_steps=size.real_steps, precision=precision, limit_val_batches=0)
    trainer.fit(module, data_module)
    train = {k: float(v) for k, v in trainer.callback_metrics.items()}
    quiet_trainer(device, max_steps=-1, precision=precision).validate(module, data_module, verbose=False)
    val = {k: float(v) for k, v in module.trainer.callback_metrics.items()}
    return {"steps": size.real_steps, "seconds": time.perf_counter() - t0,
            "train/avg_eps": train.get("train/avg_eps_step"), "train/acc": train.get("train/acc_step"),
            "val/robust_acc": val.get("val/robust_acc"), "val/acc": val.get("val/acc"),
            "val/avg_eps": val.get("val/avg_eps")}


def quiet_trainer(device: torch.device, max_steps: int, precision: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator=device.type, devices=1, max_steps=max_steps, precision=precision,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


# --- the sections ----------------------------------------------------------------------------------------------------
def cell(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec`` (e.g. ``"8.1f"``), or a dash as wide."""
    width = int(spec.split(".")[0] or 0) if spec[0].isdigit() else 0
    return format(value, spec) if value is not None else "-".rjust(width)


def print_steps(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':9s} {'variant':30s} {'batch':>5s} {'ms':>8s} {'img/s':>8s} {'GiB':>6s} {'rsv GiB':>7s} "
          f"{'1st call s':>10s}")
    for r in rows:
        head = f"  {r['method']:9s} {r['variant']:30s} {r['batch']:5d}"
        if "error" in r:
            print(f"{head} failed: {r['error']['type']}: {r['error']['message'][:200]}")
        elif r.get("status"):
            print(f"{head} {r['status']} (first call {cell(r.get('first_call_s'), '.1f')} s)")
        else:
            print(f"{head} {cell(r['ms'], '8.1f')} {cell(r['img_per_s'], '8.0f')} {cell(r['peak_gib'], '6.2f')} "
                  f"{cell(r['peak_reserved_gib'], '7.2f')} {cell(r.get('first_call_s'), '10.1f')}")


def graph_plan(size: Size, methods: tuple[str, ...] | list[str]) -> dict[str, int]:
    """The most graphs one function gets in each section (each section starts from ``torch._dynamo.reset()``):
    the captured training steps (one per method, batch size or compile mode), the backbone's passes (precision x
    autograd), the command line's step and the isolated one."""
    return {"sync": 1, "passes": 4, "steps": len(set(methods) | {"mma"}), "projection": 0,
            "batch": len(size.big_batches), "train": 2, "eval": 4, "real": 0, "tuning": 2}


def section_sync(run: Run) -> None:
    if run.device.type != "cuda":
        run.report["sync"] = sync_check(run.device, run.size, run.backend)
        raise Skip(run.report["sync"]["why"])
    if not run.allows("sync", 30 if run.full else 5, step_graphs=1):
        raise Skip(run.budget.reasons["sync"])
    run.report["sync"] = s = sync_check(run.device, run.size, run.backend)
    run.check_rows([s["eager"], s["captured"]])
    print("\n[1] sync: MMA training steps under set_sync_debug_mode('error'), no host synchronisation: "
          + ", ".join(f"{v} {s[v]['guarded_steps']} steps" + (f" ({s[v]['status']})" if s[v].get("status") else "")
                      for v in ("eager", "captured")))


def section_passes(run: Run) -> None:
    size, reps = run.size, run.reps
    if not run.allows("passes", 30 if run.full else 5, pass_graphs=4):
        raise Skip(run.budget.reasons["passes"])
    run.report["passes"] = rows = pass_table(run.device, size, reps, run.backend)
    run.check_rows(rows)
    print(f"\n[2] one WRN-{size.depth}-{size.width} pass, batch {size.batch}, channels_last (median of {reps})")
    print(f"  {'precision':9s} {'captured':8s} {'forward ms':>10s} {'fwd+input bwd ms':>16s} {'1st call s':>10s} "
          f"{'rsv GiB':>7s}")
    for r in rows:
        tail = f"  failed: {r['error']['type']}: {r['error']['message'][:200]}" if "error" in r else ""
        print(f"  {r['precision']:9s} {r['captured']!s:8s} {cell(r['forward_ms'], '10.2f')} "
              f"{cell(r['attack_pass_ms'], '16.2f')} {cell(r['first_call_s'], '10.1f')} "
              f"{cell(r['peak_reserved_gib'], '7.2f')}{tail}")


def section_steps(run: Run) -> None:
    size, reps, device = run.size, run.reps, run.device
    first = tuple(m for m in ("mma", "pgd_at") if m in run.args.methods or m == "mma")
    steps: list[dict[str, Any]] = []
    run.report["steps"] = steps
    if run.allows("steps", 60 if run.full else 5, step_graphs=len(first)):
        with run.part(f"steps:{'+'.join(first)}"):
            rows = step_times(device, size, size.batch, first, ("eager", "captured"), reps, run.backend)
            steps += rows
            run.check_rows(rows)
    others = tuple(m for m in run.args.methods if m not in first) if "steps" in run.wanted else ()
    for method in others:
        if run.allows(f"steps:{method}", 60 if run.full else 5, step_graphs=1):
            with run.part(f"steps:{method}"):
                rows = step_times(device, size, size.batch, (method,), ("eager", "captured"), reps, run.backend)
                steps += rows
                run.check_rows(rows)
    if not steps and not run.state()["errors"]:
        raise Skip(run.budget.reasons.get("steps", "no method fitted the budget"))
    print_steps(f"[3] training steps, WRN-{size.depth}-{size.width}, Linf, K={size.nb_iter}, "
                f"{'bf16' if device.type == 'cuda' else 'fp32'} + channels_last (median of {reps} alternated)", steps)
    by = {(r["method"], r["variant"]): r["ms"] for r in steps if r.get("ms")}
    for variant in ("eager", "captured"):
        if ("mma", variant) in by and ("pgd_at", variant) in by:
            print(f"  MMA / PGD-AT ({variant}): {by['mma', variant] / by['pgd_at', variant]:.3f}")
    if ("mma", "captured") in by and ("mma", "eager") in by:
        print(f"  captured / eager MMA step: {by['mma', 'captured'] / by['mma', 'eager']:.3f}")


def section_projection(run: Run) -> None:
    size, device = run.size, run.device
    mma_rows = [r for r in run.report.get("steps", []) if r["method"] == "mma" and r.get("ms")]
    if not mma_rows:
        raise Skip("no MMA step was timed (section steps failed or was skipped)")
    passes = count_passes(device, size)
    best = min(mma_rows, key=lambda r: r["ms"])
    flops = step_flops(passes["mma"], training_passes=2, batch=size.batch)
    achieved = flops / (best["ms"] / 1e3) / 1e12
    peak = bf16_peak_tflops(device, run.args.peak_tflops)
    run.report["projection"] = p = {
        "mma_passes": passes["mma"], "pgd_at_passes": passes["pgd_at"], "best_variant": best["variant"],
        "mma_step_ms": best["ms"], "projected_50k_minutes": PAPER_STEPS * best["ms"] / 1e3 / 60,
        "flop_per_step_wrn28_4": flops, "achieved_tflops": achieved, "bf16_peak_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
        "minutes_at_peak": PAPER_STEPS * flops / (peak * 1e12) / 60 if peak else None}
    print(f"\n[4] paper run (CIFAR10 MMA-32, {PAPER_STEPS} steps of batch {size.batch}) at the fastest MMA step "
          f"({p['best_variant']}, {p['mma_step_ms']:.1f} ms): {p['projected_50k_minutes']:.1f} min of training "
          f"steps (target <= {TARGETS['paper_run_minutes']:.0f} min through mma-train, section 6's factor)")
    print(f"  MMA step passes: {passes['mma']['forwards']} forwards, {passes['mma']['backwards']} backwards "
          f"(2 with weight gradients) -> {flops / 1e12:.2f} TFLOP per step")
    if peak:
        print(f"  {achieved:.1f} TFLOP/s = {p['fraction_of_peak']:.1%} of the {peak:.0f} TFLOP/s bf16 peak "
              f"(the run at peak: {p['minutes_at_peak']:.1f} min)")


def section_batch(run: Run) -> None:
    rows: list[dict[str, Any]] = []
    run.report["batch"] = rows
    for batch in run.size.big_batches:
        if run.allows(f"batch:{batch}", 60 if run.full else 5, step_graphs=1):
            with run.part(f"batch:{batch}"):
                new = step_times(run.device, run.size, batch, ("mma",), ("captured",), run.reps, run.backend)
                rows += new
                run.check_rows(new)
    if not rows and not run.state()["errors"]:
        raise Skip("no batch size fitted the budget")
    print_steps(f"[5] captured MMA step at large batches (target >= {TARGETS['batch512_img_per_s']:.0f} img/s "
                "at 512)", rows)


def section_train(run: Run) -> None:
    if not run.allows("train", 60 if run.full else 10, step_graphs=3):  # the step, the validation, the isolated step
        raise Skip(run.budget.reasons["train"])
    run.report["train"] = t = command_line_run(run.device, run.size, run.args.data_dir, run.args.out_dir, run.backend)
    run.check_rows([t["isolated"]])
    for stage, info in t["cli_captures"].items():
        if info.get("capture_state") == "eager":
            run.error(f"mma-train {stage} graph", {
                "where": f"mma-train {stage} graph", "type": "FellBackToEager", "traceback": [],
                "message": f"fell back to eager: {info.get('fallback_reason') or 'no reason given'}"})
    ratio = f"{t['cli_over_isolated']:.3f}" if t["cli_over_isolated"] else "-"
    print(f"\n[6] mma-train (cifar10_linf_mma32 recipe on Fashion-MNIST, {t['precision']}, compile_step "
          f"{t['compile_step']}), {t['steps']} steps in {t['wall_s']:.0f} s: a step {cell(t['cli_step_ms'], '.1f')} ms "
          f"against the isolated captured step {cell(t['isolated_step_ms'], '.1f')} ms -> {ratio} (target <= 1.10)")
    if "projection" in run.report and t["cli_over_isolated"]:
        minutes = run.report["projection"]["projected_50k_minutes"] * t["cli_over_isolated"]
        run.report["projection"]["projected_50k_minutes_cli"] = minutes
        print(f"  the paper run through mma-train: {minutes:.1f} min (target <= {TARGETS['paper_run_minutes']:.0f})")


def section_eval(run: Run) -> None:
    if not run.allows("eval", 90 if run.full else 10, pass_graphs=4):
        raise Skip(run.budget.reasons["eval"])
    run.report["eval"] = e = evaluation_speed(run.device, run.size, run.backend)
    print(f"\n[7] evaluate_model, evaluation=fast settings, {e['points']} CIFAR10-shaped points, batch {e['batch']}: "
          f"{e['seconds']:.1f} s ({e['compile_s']:.1f} s of it compiling), {e['img_per_s']:.0f} img/s -> 10,000 "
          f"points in {e['projected_10k_s']:.0f} s (target <= {TARGETS['eval_fast_10k_seconds']:.0f} s)")


def section_real(run: Run) -> None:
    size = run.size
    if not run.allows("real", 60 if run.full else 10):
        raise Skip(run.budget.reasons["real"])
    precision = "bf16-mixed" if run.device.type == "cuda" else "32-true"
    run.report["real"] = r = real_data_run(run.device, size, precision, run.args.npz, run.args.data_dir)
    print(f"\n[8] Fashion-MNIST, LeNet5-Madry, MMA (Linf, d_max 0.2), {r['steps']} steps of batch "
          f"{size.real_batch}, {precision}, {r['seconds']:.0f} s: train/avg_eps {cell(r['train/avg_eps'], '.4f')}, "
          f"val/robust_acc {cell(r['val/robust_acc'], '.4f')} (eps 0.1, {size.real_val} test images), "
          f"val/acc {cell(r['val/acc'], '.4f')}, val/avg_eps {cell(r['val/avg_eps'], '.4f')}")


def section_tuning(run: Run) -> None:
    rows: list[dict[str, Any]] = []
    run.report["tuning"] = rows
    batch = run.size.big_batches[0]
    if run.allows("tuning:cudnn", 30 if run.full else 5, step_graphs=1):
        with run.part("tuning:cudnn"):
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = False
            try:
                new = [dict(r, variant="captured, no cudnn.benchmark") for r in
                       step_times(run.device, run.size, batch, ("mma",), ("captured",), run.reps, run.backend)]
            finally:
                torch.backends.cudnn.benchmark = benchmark
            rows += new
            run.check_rows(new)
    if run.allows("tuning:autotune", 30 if run.full else 5, step_graphs=3):  # max-autotune: ~3x the compile time
        with run.part("tuning:autotune"):
            new = step_times(run.device, run.size, batch, ("mma",), ("autotuned",), run.reps, run.backend)
            rows += new
            run.check_rows(new)
    if not rows and not run.state()["errors"]:
        raise Skip("neither variant fitted the budget")
    print_steps(f"[9] the captured MMA step at batch {batch}: cudnn.benchmark off, inductor max-autotune "
                "(compare with [5])", rows)


# --- main -----------------------------------------------------------------------------------------------------------
def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def clean_slate(device: torch.device) -> None:
    """Before a section: dynamo's caches and CUDA-graph trees reset (no section inherits another's graphs or
    counts toward its recompile limit), garbage collected, the allocator's cache emptied."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_section(run: Run, name: str) -> None:
    """Section ``name``, whatever happens in it: its status, seconds, compile seconds, graphs, CUDA-graph skips,
    peak memory and failures are recorded, and the report is written before and after it."""
    state = run.report["sections"][name]
    run.section = name
    state.update(status="running", started_at_s=time.perf_counter() - run.started)
    run.save()
    t0 = time.perf_counter()
    skipped: str | None = None
    skips, compiled, graphs = cudagraph_skips(), 0.0, unique_graphs()
    try:
        clean_slate(run.device)  # (clears dynamo's compile times: they are read after it)
        memory_reset(run.device)
        compiled = compile_seconds()
        globals()[f"section_{name}"](run)
    except Skip as skip:
        skipped = str(skip)
        if not any(s == name or s.startswith(f"{name}:") for s in run.budget.skipped):
            run.budget.skip(name, skipped)
    except KeyboardInterrupt:
        state["status"] = "interrupted"
        raise
    except Exception as error:  # noqa: BLE001  (recorded; the next section runs)
        run.error(name, error)
    finally:
        state.update(seconds=time.perf_counter() - t0, compile_s=max(0.0, compile_seconds() - compiled),
                     graphs=unique_graphs() - graphs, cudagraph_skips=cudagraph_skips() - skips,
                     **memory_peaks(run.device))
        if run.cudagraph_mode == "counter" and state["cudagraph_skips"] and not any(
                e["type"] == "CudagraphSkipped" for e in state["errors"]):
            run.error(name, {"where": name, "type": "CudagraphSkipped", "traceback": [], "message":
                             f"inductor skipped CUDA graphs {state['cudagraph_skips']} time(s) in this section"})
        if state["status"] == "running":
            state["status"] = "failed" if state["errors"] else "skipped" if skipped is not None else "ok"
        if skipped is not None:
            state["reason"] = skipped
        run.save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: the full check; cpu: every section at a reduced size")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--budget-min", type=float, default=7.5, help="skip sections that would end past this")
    parser.add_argument("--compile-backend", default="inductor",
                        help='the CPU mode\'s torch.compile backend ("eager": tracing only, a fast check)')
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--npz", type=Path, default=NPZ, help="Fashion-MNIST arrays (written when missing)")
    parser.add_argument("--data-dir", type=Path, default=DEBIAN_FASHION_MNIST,
                        help="Fashion-MNIST IDX files (the device kit's .devicekit/fashion-mnist): the command-line "
                             "run reads them, --npz is written from them when missing")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_check_run"), help="the command-line run's directory")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"),
                        help="the JSON report, rewritten after every section (default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu for the reduced check)")
    size = FULL if device.type == "cuda" else REDUCED
    crowded = {s: n for s, n in graph_plan(size, args.methods).items() if n > GRAPHS_PER_FUNCTION}
    if crowded:
        raise SystemExit(f"sections building more than {GRAPHS_PER_FUNCTION} graphs of one function: {crowded}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    wanted = set(args.only)
    order = [s for s in SECTIONS if s in wanted or (s == "steps" and "projection" in wanted)]
    json_path = args.json.resolve()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "argv": list(sys.argv[1:] if argv is None else argv), "json": str(json_path),
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "status": "running",
        "size": asdict(size), "targets": TARGETS,
        "sections": {name: {"status": "pending", "errors": []} for name in order}}
    run = Run(args, device, size, args.reps or size.reps, args.compile_backend, Budget(args.budget_min), report,
              json_path, wanted=wanted)
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # StepClock's _target_
    print(f"gpu_check on {report['device']} (torch {torch.__version__}), "
          f"{'full' if size is FULL else 'reduced'} size: WRN-{size.depth}-{size.width}, batch {size.batch}, "
          f"K={size.nb_iter}, S={size.search_steps}; budget {args.budget_min} min; report: {json_path}", flush=True)
    problems = data_problems(wanted, args.data_dir, args.npz)
    for name, reason in problems.items():
        report["sections"][name].update(status="skipped", reason=reason)
        print(f"[{name}] will be skipped: {reason}", flush=True)
    ACTIVE.append(run)
    try:
        with cudagraphs_or_error(device) as mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.cudagraph_mode = report["cudagraph_check"] = mode
            run.save()
            for name in order:
                if name in problems:
                    run.budget.skipped.append(name)
                    run.budget.reasons[name] = problems[name]
                    continue
                run_section(run, name)
        report["status"] = "finished"
    except KeyboardInterrupt:
        report["status"] = "interrupted"
        raise
    finally:
        ACTIVE.remove(run)
        report["skipped"] = run.budget.skipped
        report["skip_reasons"] = run.budget.reasons
        report["failed"] = [n for n, s in report["sections"].items() if s["status"] in ("failed", "interrupted")]
        report["total_seconds"] = time.perf_counter() - run.started
        run.save()
        summary(report, json_path if run.json_path is not None else None)
    return report


def summary(report: dict[str, Any], json_path: Path | None) -> None:
    """The last lines: total time, what was skipped, what failed (and where the report is)."""
    skipped = report["skipped"]
    print(f"\ntotal {report['total_seconds']:.0f} s" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    for name in report["failed"]:
        for e in report["sections"][name]["errors"]:
            print(f"FAILED [{name}] {e['where']}: {e['type']}: {e['message'][:300]}")
    if report["status"] != "finished":
        print(f"the run was {report['status']}")
    if json_path is not None:
        print(f"report: {json_path}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    """The command's exit status: 1 when a section failed (the others ran), else 0."""
    return 1 if main(argv)["failed"] else 0


ACTIVE: list[Run] = []  # the run in progress, for the SIGTERM handler


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (a timeout's): the section in progress marked interrupted, the report written, the process ended at
    once (an exception raised from here may land in a weakref callback, where Python ignores it)."""
    for run in ACTIVE:
        state = run.report["sections"].get(run.section)
        if state is not None and state["status"] == "running":
            state["status"] = "interrupted"
        run.report.update(status="interrupted", skipped=run.budget.skipped, failed=[
            n for n, s in run.report["sections"].items() if s["status"] in ("failed", "interrupted")])
        try:
            run.save()
        finally:
            print(f"\ninterrupted by signal {signum} in section {run.section or '-'}; report: {run.json_path}",
                  flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (a killed run keeps its lines)
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(cli(sys.argv[1:]))
