"""One GPU check of adversarial training and evaluation speed (issues 9 and 16), in one run under 8 minutes.

Usage: ``python benchmarks/gpu_check.py [--json report.json]`` on a machine with one CUDA GPU, or
``python benchmarks/gpu_check.py --device cpu`` for every section at a reduced size (the test suite runs that mode;
its figures mean nothing, it proves the script works). Sections, in order of importance; a section that no longer
fits the time budget (``--budget-min``) is skipped and named (``--only`` runs chosen sections in a second run):

1. ``sync``: Lightning fits of MMA (eager, then the captured step) whose ``training_step`` runs, after warm-up,
   under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises. CUDA only.
2. ``passes``: one WRN-28-4 pass (forward without autograd; forward + backward to the input, what an attack step
   costs), batch 128, fp32 / bf16, eager and captured (the backbone compiled with CUDA graphs, frozen weights).
3. ``steps``: the training step of each method (MMA, PGD-AT, OMMA, TRADES, PGDLS, standard) at batch 128, eager
   and captured (``compile_step``), in the GPU defaults of ``trainer=gpu`` (bf16 autocast, channels_last): median
   of alternated steps, images per second, peak memory, warm-up (compile) seconds, MMA / PGD-AT.
4. ``projection``: the paper's 50k-step CIFAR10 MMA-32 run at the fastest MMA step, and the fraction of the card's
   bf16 peak it uses (FLOPs from the pass counts: 1.69 GFLOP per WRN-28-4 forward and 32x32 image).
5. ``batch``: the captured MMA step at batch 512 and 1024 (images per second; target >= 6,000 at 512).
6. ``train``: ``mma-train experiment=cifar10_linf_mma32 trainer=gpu`` (its config composed with Hydra's compose
   API and run by the same ``train`` function) for 300 steps on Fashion-MNIST (the device kit's files), its steps
   per second next to the isolated captured step on the same shapes: what the command line costs on top.
7. ``eval``: ``evaluate_model`` with ``evaluation=fast``'s settings (mma-eval's evaluator) on CIFAR10-shaped points
   with WRN-28-4, batch size picked for the device, captured passes: images per second and the projected time of
   10,000 points (target <= 60 s). The labels are the model's own predictions, so every point is attacked.
8. ``real``: a 200-step MMA run of LeNet5-Madry on Fashion-MNIST (``fashion_mnist.npz``, written from Debian's
   files when missing), final ``train/avg_eps`` and ``val/robust_acc``.
9. ``tuning``: the captured MMA step at batch 512 with ``cudnn.benchmark`` off (everything above runs with it on, as
   ``trainer=gpu``) and with inductor's autotuning (``compile_step={mode: max-autotune}``): at batch 512 the step is
   kernel-bound, so the kernels' choice is what is left.

``--json PATH`` also writes every figure to a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from mma_lightning import MMAModule, PGDATModule, PGDLSModule, StandardModule, TRADESModule
from mma_lightning.attacks.checks import host_checks
from mma_lightning.capture import CapturedModel
from mma_lightning.data import TensorDataModule
from mma_lightning.data.vision import find_idx_file, read_idx
from mma_lightning.evaluation import evaluate_model, eps_grid
from mma_lightning.evaluation.batches import device_batch_size
from mma_lightning.methods.base import AdversarialModule
from mma_lightning.models import LeNet5Madry
from mma_lightning.models.wideresnet import WideResNet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_time import PassCounter  # noqa: E402  (the sibling benchmark's hook counter)

NPZ = HERE / "fashion_mnist.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
WRN28_4_GFLOP_PER_IMAGE = 1.69  # forward of WRN-28-4 on one 32x32 image
PAPER_STEPS = 50_000  # CIFAR10 MMA-32 (Ding et al. 2020): 50k steps of batch 128
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SECTIONS = ("sync", "passes", "steps", "projection", "batch", "train", "eval", "real", "tuning")
METHODS = ("mma", "pgd_at", "omma", "trades", "pgdls", "standard")
TARGETS = {"paper_run_minutes": 45.0, "batch512_img_per_s": 6000.0, "eval_fast_10k_seconds": 60.0}


@dataclass
class Size:
    """The sizes of one mode: full (a GPU) or reduced (``--device cpu``)."""

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
REDUCED = Size(depth=10, width=1, batch=8, big_batches=(16,), nb_iter=2, search_steps=2, reps=2, train_steps=4,
               train_images=96, eval_points=24, real_steps=4, real_batch=16, real_nb_iter=2, real_train=128,
               real_val=16)


class Budget:
    """The wall-clock budget of the whole check: sections that would start past it are skipped."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.perf_counter() + 60 * minutes
        self.skipped: list[str] = []

    def allows(self, section: str, needs_s: float) -> bool:
        if time.perf_counter() + needs_s <= self.deadline:
            return True
        self.skipped.append(section)
        print(f"\n[{section}] skipped: about {needs_s:.0f} s needed, "
              f"{max(0.0, self.deadline - time.perf_counter()):.0f} s of the budget left (--only {section})")
        return False


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
                    warmup: int = 3) -> dict[str, dict[str, float | None]]:
    """Warm each step up (compiles and records its graphs), then time them alternately: median ms, peak GiB."""
    out: dict[str, dict[str, float | None]] = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize(device)
        out[name] = {"warmup_s": time.perf_counter() - t0}
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, float] = {}
    for _ in range(reps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    for name, t in times.items():
        out[name].update(ms=statistics.median(t) * 1e3, peak_gib=peak.get(name))
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
        trainer.fit(module, TensorDataModule(x, y, batch_size=size.batch))
        out[variant] = {"guarded_steps": len(calls) - warmup, "raised": False}
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

        def forward() -> None:
            with torch.no_grad(), autocast():
                model(x)

        def attack_pass() -> None:
            delta = torch.zeros_like(x, requires_grad=True)
            with autocast():
                loss = nn.functional.cross_entropy(model(x + delta).float(), y)
            torch.autograd.grad(loss, delta)

        timed = time_alternated({"forward": forward, "attack_pass": attack_pass}, device, reps)
        rows.append({"precision": precision, "captured": captured, "batch": size.batch,
                     "forward_ms": timed["forward"]["ms"], "attack_pass_ms": timed["attack_pass"]["ms"],
                     "warmup_s": timed["forward"]["warmup_s"] + timed["attack_pass"]["warmup_s"]})
    return rows


# --- 3. / 5. training steps -----------------------------------------------------------------------------------------
def step_times(device: torch.device, size: Size, batch: int, methods: tuple[str, ...], variants: tuple[str, ...],
               reps: int, backend: str, shape: tuple[int, ...] = (3, 32, 32)) -> list[dict[str, Any]]:
    """Each method's step at ``batch`` in the GPU defaults (bf16 on CUDA, channels_last), eager and captured
    (``"autotuned"``: captured with inductor's ``max-autotune``)."""
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
        rows.append({"method": method, "variant": variant, "batch": batch, "ms": t["ms"],
                     "img_per_s": batch / (t["ms"] / 1e3), "peak_gib": t["peak_gib"], "warmup_s": t["warmup_s"]})
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
    at the window's ends only, so the timed steps keep their asynchrony)."""

    latest: "StepClock | None" = None

    def __init__(self, first: int = 50) -> None:
        self.first = first
        self.start: float | None = None
        self.end: float | None = None
        self.steps_at_start = 0
        self.steps_at_end = 0
        self.paused = 0.0
        self._pause: float | None = None
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
                      "data.num_workers=0", "data.val_size=16", "data.eval_batch_size=8", f"data.batch_size={size.batch}",
                      f"method.compile_step={{backend: {backend}}}", "method.channels_last=true",
                      "+callbacks.step_clock.first=1", "trainer.enable_progress_bar=false",
                      "trainer.enable_model_summary=false"]
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    clock = StepClock.latest
    cli_ms = clock.step_ms() if clock is not None else None
    batch = int(cfg.data.batch_size)
    isolated = step_times(device, size, batch, ("mma",), ("captured",), size.reps, backend, shape=(1, 28, 28))[0]
    return {"steps": size.train_steps, "wall_s": wall, "cli_step_ms": cli_ms, "isolated_step_ms": isolated["ms"],
            "cli_over_isolated": cli_ms / isolated["ms"] if cli_ms else None, "batch": batch,
            "precision": str(cfg.trainer.precision), "compile_step": str(cfg.method.compile_step)}


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
    t0 = time.perf_counter()
    ev = evaluate_model(net, (x, y), "linf", eps_grid("cifar10_linf"), nb_iter=20 if size is FULL else 2, restarts=1,
                        margin_nb_iter=20 if size is FULL else 2, margin_search_steps=10 if size is FULL else 2,
                        probe_samples=min(100, size.eval_points), batch_size=batch, progress=False,
                        capture=capture)
    seconds = time.perf_counter() - t0
    return {"points": size.eval_points, "batch": batch, "seconds": seconds,
            "img_per_s": size.eval_points / seconds, "projected_10k_s": 10_000 * seconds / size.eval_points,
            "clean_acc": ev.pgd.clean_accuracy, "avg_robust_acc": ev.pgd.avg_robust_accuracy}


# --- 8. a real-data run ---------------------------------------------------------------------------------------------
def fashion_mnist(path: Path = NPZ) -> dict[str, np.ndarray]:
    """Fashion-MNIST as uint8 arrays from ``path``; written there from Debian's IDX files when missing."""
    if not path.is_file():
        files = {key: find_idx_file(DEBIAN_FASHION_MNIST, stem) for key, stem in (
            ("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
            ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte"))}
        missing = [k for k, f in files.items() if f is None]
        if missing:
            raise SystemExit(f"{path} is missing and so are the Debian files in {DEBIAN_FASHION_MNIST} "
                             "(apt-get install -y dataset-fashion-mnist), needed to write it")
        arrays = {k: read_idx(f).numpy() for k, f in files.items()}  # type: ignore[arg-type]
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][:FULL.real_train], arrays["y_train"][:FULL.real_train]
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def real_data_run(device: torch.device, size: Size, precision: str, npz: Path = NPZ) -> dict[str, Any]:
    """``experiment=quickstart`` on the GPU: MMA (Linf, d_max 0.2, min eps 0.02, K = 10), LeNet5-Madry, Adam
    1e-3, batch 50, on Fashion-MNIST for ``size.real_steps`` steps, then a validation at eps 0.1."""
    data = fashion_mnist(npz)
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


# --- main -----------------------------------------------------------------------------------------------------------
def print_steps(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':9s} {'variant':30s} {'batch':>5s} {'ms':>8s} {'img/s':>8s} {'GiB':>6s} {'warm-up s':>9s}")
    for r in rows:
        gib = f"{r['peak_gib']:6.2f}" if r["peak_gib"] is not None else f"{'-':>6s}"
        print(f"  {r['method']:9s} {r['variant']:30s} {r['batch']:5d} {r['ms']:8.1f} {r['img_per_s']:8.0f} {gib} "
              f"{r['warmup_s']:9.1f}")


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
                        help="Fashion-MNIST IDX files for the command-line run (the device kit's .devicekit/fashion-mnist)")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_check_run"), help="the command-line run's directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu for the reduced check)")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    size = FULL if device.type == "cuda" else REDUCED
    reps = args.reps or size.reps
    budget = Budget(args.budget_min)
    backend = args.compile_backend
    warnings.filterwarnings("ignore")
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # StepClock's _target_
    started = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "size": asdict(size), "targets": TARGETS}
    print(f"gpu_check on {report['device']} (torch {torch.__version__}), "
          f"{'full' if size is FULL else 'reduced'} size: WRN-{size.depth}-{size.width}, batch {size.batch}, "
          f"K={size.nb_iter}, S={size.search_steps}; budget {args.budget_min} min")
    wanted = set(args.only)

    if "sync" in wanted:
        report["sync"] = s = sync_check(device, size, backend)
        print("\n[1] sync: " + ("MMA training steps under set_sync_debug_mode('error'), no host synchronisation: "
                                + ", ".join(f"{v} {s[v]['guarded_steps']} steps" for v in ("eager", "captured"))
                                if s["ran"] else f"skipped ({s['why']})"))

    if "passes" in wanted and budget.allows("passes", 120 if size is FULL else 5):
        report["passes"] = rows = pass_table(device, size, reps, backend)
        print(f"\n[2] one WRN-{size.depth}-{size.width} pass, batch {size.batch}, channels_last (median of {reps})")
        print(f"  {'precision':9s} {'captured':8s} {'forward ms':>10s} {'fwd+input bwd ms':>16s} {'warm-up s':>9s}")
        for r in rows:
            print(f"  {r['precision']:9s} {str(r['captured']):8s} {r['forward_ms']:10.2f} {r['attack_pass_ms']:16.2f} "
                  f"{r['warmup_s']:9.1f}")

    steps: list[dict[str, Any]] = []
    if "steps" in wanted or "projection" in wanted:
        first = tuple(m for m in ("mma", "pgd_at") if m in args.methods or m == "mma")
        if budget.allows("steps", 240 if size is FULL else 10):
            steps += step_times(device, size, size.batch, first, ("eager", "captured"), reps, backend)
        others = tuple(m for m in args.methods if m not in first) if "steps" in wanted else ()
        for method in others:
            if budget.allows(f"steps:{method}", 150 if size is FULL else 5):
                steps += step_times(device, size, size.batch, (method,), ("eager", "captured"), reps, backend)
        report["steps"] = steps
        if steps:
            print_steps(f"[3] training steps, WRN-{size.depth}-{size.width}, Linf, K={size.nb_iter}, "
                        f"{'bf16' if device.type == 'cuda' else 'fp32'} + channels_last (median of {reps} alternated)",
                        steps)
            by = {(r["method"], r["variant"]): r for r in steps}
            for variant in ("eager", "captured"):
                if ("mma", variant) in by and ("pgd_at", variant) in by:
                    print(f"  MMA / PGD-AT ({variant}): {by['mma', variant]['ms'] / by['pgd_at', variant]['ms']:.3f}")
            if ("mma", "captured") in by:
                print(f"  captured / eager MMA step: {by['mma', 'captured']['ms'] / by['mma', 'eager']['ms']:.3f}")

    mma_rows = [r for r in steps if r["method"] == "mma"]
    if "projection" in wanted and mma_rows:
        passes = count_passes(device, size)
        best = min(mma_rows, key=lambda r: r["ms"])
        flops = step_flops(passes["mma"], training_passes=2, batch=size.batch)
        achieved = flops / (best["ms"] / 1e3) / 1e12
        peak = bf16_peak_tflops(device, args.peak_tflops)
        report["projection"] = p = {
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

    if "batch" in wanted:
        rows = []
        for batch in size.big_batches:
            if budget.allows(f"batch:{batch}", 150 if size is FULL else 5):
                rows += step_times(device, size, batch, ("mma",), ("captured",), reps, backend)
        report["batch"] = rows
        if rows:
            print_steps(f"[5] captured MMA step at large batches (target >= {TARGETS['batch512_img_per_s']:.0f} img/s "
                        "at 512)", rows)

    if "train" in wanted and budget.allows("train", 240 if size is FULL else 20):
        report["train"] = t = command_line_run(device, size, args.data_dir, args.out_dir, backend)
        cli = f"{t['cli_step_ms']:.1f} ms" if t["cli_step_ms"] else "-"
        ratio = f"{t['cli_over_isolated']:.3f}" if t["cli_over_isolated"] else "-"
        print(f"\n[6] mma-train (cifar10_linf_mma32 recipe on Fashion-MNIST, {t['precision']}, compile_step "
              f"{t['compile_step']}), {t['steps']} steps in {t['wall_s']:.0f} s: a step {cli} against the isolated "
              f"captured step {t['isolated_step_ms']:.1f} ms -> {ratio} (target <= 1.10)")
        if "projection" in report and t["cli_over_isolated"]:
            minutes = report["projection"]["projected_50k_minutes"] * t["cli_over_isolated"]
            report["projection"]["projected_50k_minutes_cli"] = minutes
            print(f"  the paper run through mma-train: {minutes:.1f} min (target <= {TARGETS['paper_run_minutes']:.0f})")

    if "eval" in wanted and budget.allows("eval", 120 if size is FULL else 20):
        report["eval"] = e = evaluation_speed(device, size, backend)
        print(f"\n[7] evaluate_model, evaluation=fast settings, {e['points']} CIFAR10-shaped points, batch {e['batch']}: "
              f"{e['seconds']:.1f} s, {e['img_per_s']:.0f} img/s -> 10,000 points in {e['projected_10k_s']:.0f} s "
              f"(target <= {TARGETS['eval_fast_10k_seconds']:.0f} s)")

    if "real" in wanted and budget.allows("real", 60 if size is FULL else 10):
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        report["real"] = r = real_data_run(device, size, precision, args.npz)
        print(f"\n[8] Fashion-MNIST, LeNet5-Madry, MMA (Linf, d_max 0.2), {r['steps']} steps of batch "
              f"{size.real_batch}, {precision}, {r['seconds']:.0f} s: train/avg_eps {r['train/avg_eps']:.4f}, "
              f"val/robust_acc {r['val/robust_acc']:.4f} (eps 0.1, {size.real_val} test images), "
              f"val/acc {r['val/acc']:.4f}, val/avg_eps {r['val/avg_eps']:.4f}")

    if "tuning" in wanted:
        rows = []
        batch = size.big_batches[0]
        if budget.allows("tuning:cudnn", 90 if size is FULL else 5):
            torch.backends.cudnn.benchmark = False
            rows += [dict(r, variant="captured, no cudnn.benchmark")
                     for r in step_times(device, size, batch, ("mma",), ("captured",), reps, backend)]
            torch.backends.cudnn.benchmark = device.type == "cuda"
        if budget.allows("tuning:autotune", 300 if size is FULL else 5):
            rows += step_times(device, size, batch, ("mma",), ("autotuned",), reps, backend)
        report["tuning"] = rows
        if rows:
            print_steps(f"[9] the captured MMA step at batch {batch}: cudnn.benchmark off, inductor max-autotune "
                        "(compare with [5])", rows)

    report["skipped"] = budget.skipped
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['total_seconds']:.0f} s" + (f"; skipped: {', '.join(budget.skipped)}" if budget.skipped
                                                        else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
