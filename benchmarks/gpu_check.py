"""One GPU check of the training step (issue 9): sync-free, fast paths, projected paper run, real-data run.

Usage: ``python benchmarks/gpu_check.py`` on a machine with one CUDA GPU (under 8 minutes), or
``python benchmarks/gpu_check.py --device cpu`` for the same sections at a reduced size (the test suite runs
that mode). Sections:

1. sync: a Lightning ``fit`` of MMA whose ``training_step`` runs, after the first batch, under
   ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation raises). CUDA only; on CPU the same
   property is what ``tests/test_sync.py`` checks.
2. speed: WRN-28-4, batch 128, Linf, K = 10 (CIFAR10 MMA-32 / PGD-8 settings). One step = the method's
   ``training_loss`` + ``backward`` + SGD step, timed alternately for MMA and PGD-AT (medians of ``--reps``)
   in fp32, bf16 (autocast, as ``precision="bf16-mixed"``), bf16 + channels_last and
   bf16 + channels_last + ``torch.compile``; ratio MMA / PGD-AT, images per second, peak memory.
3. projection: the paper's 50k-step CIFAR10 MMA-32 run at the fastest MMA step, and the fraction of the
   card's bf16 peak the step uses. FLOPs per step = 1.69 GFLOP (WRN-28-4 forward, one 32x32 image) x batch x
   (forwards + attack backwards + 2 x training backwards): a backward to the input costs about one forward,
   one that also computes weight gradients about two. Passes counted by module hooks.
4. real data: a 200-step MMA run of LeNet5-Madry on Fashion-MNIST (``fashion_mnist.npz`` next to this
   script, written from Debian's ``dataset-fashion-mnist`` files when missing), final ``train/avg_eps`` and
   ``val/robust_acc``.

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

from mma_lightning import MMAModule, PGDATModule
from mma_lightning.data import TensorDataModule
from mma_lightning.data.vision import find_idx_file, read_idx
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
VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


@dataclass
class Size:
    """The sizes of one mode: full (a GPU) or reduced (``--device cpu``)."""

    depth: int
    width: int
    batch: int
    nb_iter: int
    search_steps: int
    reps: int
    real_steps: int
    real_batch: int
    real_nb_iter: int
    real_train: int
    real_val: int


FULL = Size(depth=28, width=4, batch=128, nb_iter=10, search_steps=10, reps=10, real_steps=200, real_batch=50,
            real_nb_iter=10, real_train=20_000, real_val=1_000)
REDUCED = Size(depth=10, width=1, batch=8, nb_iter=2, search_steps=2, reps=2, real_steps=4, real_batch=16,
               real_nb_iter=2, real_train=128, real_val=16)


# --- section 1: no host sync inside training_step ------------------------------------------------------------
def sync_check(device: torch.device, size: Size) -> dict[str, Any]:
    """Fit MMA a few steps; from the second batch on, ``training_step`` runs under sync debug mode "error"."""
    if device.type != "cuda":
        return {"ran": False, "why": "sync debug mode is CUDA-only; tests/test_sync.py checks the CPU proxy"}
    module = mma_module(wrn(size), size)
    original = module.training_step
    calls: list[int] = []

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            return original(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    module.training_step = guarded  # type: ignore[method-assign]
    x = torch.rand(4 * size.batch, 3, 32, 32)
    y = torch.randint(0, 10, (4 * size.batch,))
    trainer = quiet_trainer(device, max_steps=4, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, TensorDataModule(x, y, batch_size=size.batch))
    return {"ran": True, "guarded_steps": len(calls) - 1, "raised": False}


# --- section 2: step times ---------------------------------------------------------------------------------------
def wrn(size: Size) -> nn.Module:
    torch.manual_seed(0)
    return WideResNet(depth=size.depth, widen_factor=size.width)


def mma_module(net: nn.Module, size: Size, **options: Any) -> MMAModule:
    """CIFAR10 MMA-32 (Linf, d_max 32/255, min eps 0.005, K = 10) on ``net``."""
    return MMAModule(net, norm="linf", max_eps=32 / 255, min_eps=0.005, nb_iter=size.nb_iter,
                     search_steps=size.search_steps, eval_eps=8 / 255, num_train_samples=size.batch, **options)


def pgd_at_module(net: nn.Module, size: Size, **options: Any) -> PGDATModule:
    """CIFAR10 PGD-8 (Linf, eps 8/255, K = 10) on ``net``."""
    return PGDATModule(net, norm="linf", eps=8 / 255, nb_iter=size.nb_iter, eval_eps=8 / 255, **options)


def make_step(module: AdversarialModule, x: Tensor, y: Tensor, index: Tensor, bf16: bool) -> Callable[[], None]:
    """One training step as Lightning runs it: loss (under bf16 autocast if asked), backward, SGD step."""
    opt = torch.optim.SGD(module.net.parameters(), lr=1e-4, momentum=0.9)
    device = x.device
    x = module.as_input(x)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = module.training_loss(x, y, index)
        loss.backward()
        opt.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(variant: str, device: torch.device, size: Size, reps: int,
                 compile_backend: str = "inductor") -> dict[str, Any]:
    """Median step time of MMA and PGD-AT (alternated) under one variant, plus peak memory and passes."""
    bf16, channels_last, compile_ = "bf16" in variant, "channels_last" in variant, "compile" in variant
    g = torch.Generator().manual_seed(0)
    x = torch.rand(size.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (size.batch,), generator=g).to(device)
    index = torch.arange(size.batch, device=device)
    options = dict(channels_last=channels_last, compile={"backend": compile_backend} if compile_ else False)
    modules = {"mma": mma_module(wrn(size), size, **options).to(device),
               "pgd_at": pgd_at_module(wrn(size), size, **options).to(device)}
    out: dict[str, Any] = {"variant": variant}
    steps = {}
    for name, module in modules.items():
        module.net.train()
        steps[name] = make_step(module, x, y, index, bf16)
        counter = PassCounter(module.net) if not compile_ else None
        t0 = time.perf_counter()
        for _ in range(2 if compile_ else 1):  # warm-up (compiles every graph variant of the step)
            steps[name]()
        synchronize(device)
        out[f"{name}_warmup_s"] = time.perf_counter() - t0
        if counter is not None:
            out[f"{name}_passes"] = {"forwards": counter.fwd_grad + counter.fwd_nograd, "backwards": counter.bwd}
            counter.remove()
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
        med = statistics.median(t)
        out[f"{name}_ms"] = med * 1e3
        out[f"{name}_img_per_s"] = size.batch / med
        out[f"{name}_peak_gib"] = peak.get(name)
    out["ratio"] = out["mma_ms"] / out["pgd_at_ms"]
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


# --- section 4: a real-data run -----------------------------------------------------------------------------------
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
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: the full check; cpu: the same sections at a reduced size")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per method and variant")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip", nargs="*", choices=("sync", "speed", "real"), default=[])
    parser.add_argument("--compile-backend", default="inductor",
                        help='torch.compile backend of the compile variant ("eager": tracing only, a fast check)')
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--npz", type=Path, default=NPZ, help="Fashion-MNIST arrays (written when missing)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu for the reduced check)")
    size = FULL if device.type == "cuda" else REDUCED
    reps = args.reps or size.reps
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "size": asdict(size)}
    print(f"gpu_check on {report['device']} (torch {torch.__version__}), "
          f"{'full' if size is FULL else 'reduced'} size: WRN-{size.depth}-{size.width}, batch {size.batch}, "
          f"K={size.nb_iter}, S={size.search_steps}")

    if "sync" not in args.skip:
        report["sync"] = sync_check(device, size)
        s = report["sync"]
        print("\n[1] sync: " + (f"{s['guarded_steps']} MMA training steps under set_sync_debug_mode('error'): "
                                "no host synchronisation" if s["ran"] else f"skipped ({s['why']})"))

    if "speed" not in args.skip:
        rows = [time_variant(v, device, size, reps, args.compile_backend) for v in args.variants]
        report["speed"] = rows
        print(f"\n[2] step times, WRN-{size.depth}-{size.width}, batch {size.batch}, Linf, K={size.nb_iter} "
              f"(median of {reps} alternated steps)")
        print(f"  {'variant':28s} {'MMA ms':>9s} {'PGD-AT ms':>10s} {'ratio':>6s} {'MMA img/s':>10s} "
              f"{'PGD img/s':>10s} {'MMA GiB':>8s} {'PGD GiB':>8s} {'warm-up s':>9s}")
        for r in rows:
            gib = [f"{r[f'{m}_peak_gib']:8.2f}" if r[f"{m}_peak_gib"] is not None else f"{'-':>8s}"
                   for m in ("mma", "pgd_at")]
            print(f"  {r['variant']:28s} {r['mma_ms']:9.1f} {r['pgd_at_ms']:10.1f} {r['ratio']:6.3f} "
                  f"{r['mma_img_per_s']:10.1f} {r['pgd_at_img_per_s']:10.1f} {gib[0]} {gib[1]} "
                  f"{r['mma_warmup_s'] + r['pgd_at_warmup_s']:9.1f}")
        counted = next((r for r in rows if "mma_passes" in r), None)
        if counted is not None:
            best = min(rows, key=lambda r: r["mma_ms"])
            flops = step_flops(counted["mma_passes"], training_passes=2, batch=size.batch)
            achieved = flops / (best["mma_ms"] / 1e3) / 1e12
            peak = bf16_peak_tflops(device, args.peak_tflops)
            projection = {
                "mma_passes": counted["mma_passes"], "pgd_at_passes": counted.get("pgd_at_passes"),
                "best_variant": best["variant"], "mma_step_ms": best["mma_ms"],
                "projected_50k_minutes": PAPER_STEPS * best["mma_ms"] / 1e3 / 60,
                "flop_per_step_wrn28_4": flops, "achieved_tflops": achieved, "bf16_peak_tflops": peak,
                "fraction_of_peak": achieved / peak if peak else None,
                "minutes_at_peak": PAPER_STEPS * flops / (peak * 1e12) / 60 if peak else None,
            }
            report["projection"] = projection
            p = projection
            print(f"\n[3] paper run (CIFAR10 MMA-32, {PAPER_STEPS} steps of batch {size.batch}) at the fastest MMA "
                  f"step ({p['best_variant']}, {p['mma_step_ms']:.1f} ms): {p['projected_50k_minutes']:.1f} min "
                  f"(training steps only; target <= 20 min on one H100/H200)")
            print(f"  MMA step passes: {p['mma_passes']['forwards']} forwards, {p['mma_passes']['backwards']} "
                  f"backwards (2 with weight gradients) -> {flops / 1e12:.2f} TFLOP per step at "
                  f"{WRN28_4_GFLOP_PER_IMAGE} GFLOP/image/forward (the WRN-28-4 figure)")
            if peak:
                print(f"  {achieved:.1f} TFLOP/s = {p['fraction_of_peak']:.1%} of the {peak:.0f} TFLOP/s bf16 peak "
                      f"(the run at peak: {p['minutes_at_peak']:.1f} min)")
            else:
                print(f"  {achieved:.3f} TFLOP/s (bf16 peak unknown here: pass --peak-tflops)")

    if "real" not in args.skip:
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        report["real"] = real_data_run(device, size, precision, args.npz)
        r = report["real"]
        print(f"\n[4] Fashion-MNIST, LeNet5-Madry, MMA (Linf, d_max 0.2), {r['steps']} steps of batch "
              f"{size.real_batch}, {precision}, {r['seconds']:.0f} s: train/avg_eps {r['train/avg_eps']:.4f}, "
              f"val/robust_acc {r['val/robust_acc']:.4f} (eps 0.1, {size.real_val} test images), "
              f"val/acc {r['val/acc']:.4f}, val/avg_eps {r['val/avg_eps']:.4f}")

    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
