"""AutoAttack as an optional extra (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020), through the ``torchattacks`` package.

AutoAttack is the stronger modern yardstick (docs/mma-algorithm.md: the paper's CIFAR10 Linf MMA-32 model
scores 47.2% at 8/255 under the paper's PGD protocol but 41.4% under AutoAttack). Install the extra with
``pip install "mma-lightning[autoattack]"``.

``torchattacks`` has side effects that this wrapper contains: its attacks re-seed the global RNG (restored
here with ``torch.random.fork_rng``) and set only the top module's mode back (every submodule's flag is
restored here).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from mma_lightning.attacks.context import model_mode
from mma_lightning.evaluation.batches import EvalData, evaluation_batches, model_device, resolve_shard
from mma_lightning.evaluation.collect import SampleCollector
from mma_lightning.evaluation.protocol import check_eps_grid
from mma_lightning.evaluation.robustness import RobustnessResult, check_norm, result_from_outcomes

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}
INSTALL_HINT = 'pip install "mma-lightning[autoattack]"  (or: pip install torchattacks)'


def load_torchattacks() -> ModuleType:
    """Import ``torchattacks``, or raise ``ImportError`` saying how to install the ``autoattack`` extra."""
    try:
        return importlib.import_module("torchattacks")
    except ImportError as err:
        raise ImportError(f"AutoAttack needs the optional 'autoattack' extra, which is not installed: "
                          f"{INSTALL_HINT}") from err


def autoattack_accuracy(
    model: nn.Module,
    data: EvalData,
    norm: str,
    eps_grid: Sequence[float],
    *,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = False,
) -> RobustnessResult:
    """Robust accuracy under AutoAttack at every eps (APGD-CE, APGD-T, FAB-T, Square for ``"standard"``).

    A point is robust at eps iff it is classified correctly clean and after the attack. Same ``data``, model
    handling and sharding as :func:`robust_accuracy`; the result has ``attack == "autoattack"``. Inputs must
    lie in ``[0, 1]`` (torchattacks' box).

    Args:
        version: the AutoAttack suite, one of ``"standard"``, ``"plus"``, ``"rand"`` (randomised defences).
        seed: the attacks' seed (the global RNG is restored afterwards).
    """
    norm = check_norm(norm)
    grid = check_eps_grid(eps_grid)
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"version must be one of {list(AUTOATTACK_VERSIONS)}, got {version!r}")
    torchattacks = load_torchattacks()
    device = model_device(model)
    collector = SampleCollector(["label", "correct", *(f"robust@{k}" for k in range(len(grid)))], device,
                                sync=resolve_shard(shard))
    batches = evaluation_batches(data, device, batch_size=batch_size, max_samples=max_samples, shard=shard,
                                 progress=progress, desc=f"AutoAttack {norm}", box=(0.0, 1.0),
                                 box_settable=False)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(False), model_mode(model, train=False), torch.random.fork_rng(fork_devices):
        for x, y, index in batches:
            with torch.no_grad():
                logits = model(x)
            correct, n_classes = logits.argmax(dim=1) == y, int(logits.shape[1])
            robust = {}
            for k, eps in enumerate(grid):
                attack = torchattacks.AutoAttack(model, norm=AUTOATTACK_NORMS[norm], eps=eps, version=version,
                                                 n_classes=n_classes, seed=seed)
                x_adv = attack(x, y)
                with torch.no_grad():
                    robust[f"robust@{k}"] = correct & (model(x_adv).argmax(dim=1) == y)
            collector.update(index, label=y, correct=correct, **robust)
    settings = {"version": version, "seed": seed, "package": f"torchattacks {torchattacks.__version__}"}
    return result_from_outcomes(collector.compute(), norm, grid, "autoattack", settings)
