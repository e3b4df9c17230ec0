"""``load_pretrained``: state dicts in exactly the published layouts (random weights, keys and shapes built
from the published architectures), outputs compared with a re-implementation of each published forward.

The references below are written from the published descriptions, functionally over the state dict:
- RobustBench ``Ding2020MMANet`` (robustbench/model_zoo/cifar10.py, architectures/wide_resnet.py): per-image
  standardisation ``(x - mean) / max(std, 1/sqrt(n))`` (unbiased std), conv1, three ``block<g>.layer.<i>``
  groups of pre-activation blocks (``convShortcut`` on the activated input where the width changes), BN-ReLU,
  ``avg_pool2d(8)``, ``fc``.
- mma_training's CIFAR10 model, ``nn.Sequential(PerImageStandardize(), WideResNet(28, 10, 4))`` of
  advertorch_examples/models.py (``convgroup<g>.layer.<i>``, ``conv_shortcut``, mean over H and W), and
  advertorch's ``LeNet5Madry`` (conv1-ReLU-maxpool2, conv2-ReLU-maxpool2, linear1-ReLU, linear2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mma_lightning.models import LeNet5Madry, WideResNet, load_pretrained

BN = ("weight", "bias", "running_mean", "running_var")


def _bn(sd: dict[str, Tensor], prefix: str, channels: int, g: torch.Generator) -> None:
    sd[f"{prefix}.weight"] = 1 + 0.2 * torch.randn(channels, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=g)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=g)
    sd[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=g)
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def _conv(sd: dict[str, Tensor], key: str, cout: int, cin: int, k: int, g: torch.Generator) -> None:
    sd[key] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (k * k * cout)) ** 0.5


def wrn_state_dict(depth: int, widen: int, layout: str, num_classes: int = 10, seed: int = 0) -> dict:
    """Random tensors under the published key names: ``layout`` "robustbench" or "advertorch"."""
    g = torch.Generator().manual_seed(seed)
    group, shortcut, prefix = {"robustbench": ("block", "convShortcut", ""),
                               "advertorch": ("convgroup", "conv_shortcut", "1.")}[layout]
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    n = (depth - 4) // 6
    sd: dict[str, Tensor] = {}
    _conv(sd, f"{prefix}conv1.weight", 16, 3, 3, g)
    for gi in range(1, 4):
        for i in range(n):
            cin, cout = (widths[gi - 1] if i == 0 else widths[gi]), widths[gi]
            p = f"{prefix}{group}{gi}.layer.{i}"
            _bn(sd, f"{p}.bn1", cin, g)
            _conv(sd, f"{p}.conv1.weight", cout, cin, 3, g)
            _bn(sd, f"{p}.bn2", cout, g)
            _conv(sd, f"{p}.conv2.weight", cout, cout, 3, g)
            if cin != cout:
                _conv(sd, f"{p}.{shortcut}.weight", cout, cin, 1, g)
    _bn(sd, f"{prefix}bn1", widths[3], g)
    sd[f"{prefix}fc.weight"] = 0.1 * torch.randn(num_classes, widths[3], generator=g)
    sd[f"{prefix}fc.bias"] = 0.1 * torch.randn(num_classes, generator=g)
    return sd


def lenet_state_dict(seed: int = 0) -> dict:
    """advertorch's LeNet5Madry keys: conv1 (32, 1, 5, 5), conv2 (64, 32, 5, 5), linear1 (1024, 3136),
    linear2 (10, 1024), with biases."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1": (32, 1, 5, 5), "conv2": (64, 32, 5, 5), "linear1": (1024, 3136), "linear2": (10, 1024)}
    sd = {}
    for name, shape in shapes.items():
        fan_in = torch.tensor(shape[1:]).prod().item()
        sd[f"{name}.weight"] = torch.randn(*shape, generator=g) / fan_in ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    return sd


# --- the published forwards, re-implemented over the state dicts --------------------------------------------
def per_image_standardize(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    std = flat.std(dim=1).view(-1, 1, 1, 1)
    std_min = torch.ones_like(std) / flat.shape[1] ** 0.5
    return (x - flat.mean(dim=1).view(-1, 1, 1, 1)) / torch.max(std, std_min)


def _bn_eval(sd: dict, prefix: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=1e-5)


def published_wrn_forward(sd: dict, x: Tensor, layout: str) -> Tensor:
    group, shortcut, prefix = {"robustbench": ("block", "convShortcut", ""),
                               "advertorch": ("convgroup", "conv_shortcut", "1.")}[layout]
    out = F.conv2d(per_image_standardize(x), sd[f"{prefix}conv1.weight"], padding=1)
    for gi in range(1, 4):
        i = 0
        while f"{prefix}{group}{gi}.layer.{i}.conv1.weight" in sd:
            p = f"{prefix}{group}{gi}.layer.{i}"
            stride = 2 if (gi > 1 and i == 0) else 1
            act = F.relu(_bn_eval(sd, f"{p}.bn1", out))
            projection = sd.get(f"{p}.{shortcut}.weight")
            residual = out if projection is None else F.conv2d(act, projection, stride=stride)
            h = F.conv2d(act, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.relu(_bn_eval(sd, f"{p}.bn2", h))
            out = residual + F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1)
            i += 1
    out = F.relu(_bn_eval(sd, f"{prefix}bn1", out))
    pooled = F.avg_pool2d(out, 8).flatten(1) if layout == "robustbench" else out.mean(dim=-1).mean(dim=-1)
    return F.linear(pooled, sd[f"{prefix}fc.weight"], sd[f"{prefix}fc.bias"])


def published_lenet_forward(sd: dict, x: Tensor) -> Tensor:
    out = F.max_pool2d(F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=2)), 2)
    out = F.max_pool2d(F.relu(F.conv2d(out, sd["conv2.weight"], sd["conv2.bias"], padding=2)), 2)
    out = F.relu(F.linear(out.view(out.size(0), -1), sd["linear1.weight"], sd["linear1.bias"]))
    return F.linear(out, sd["linear2.weight"], sd["linear2.bias"])


def images(n: int, shape: tuple[int, ...], seed: int = 1) -> Tensor:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.5  # a constant image: the std floor of the standardisation
    return x


# --- tests --------------------------------------------------------------------------------------------------
def test_robustbench_ding2020mma_wrn28_4_same_outputs(tmp_path: Path) -> None:
    sd = wrn_state_dict(28, 4, "robustbench")
    assert len([k for k in sd if k.endswith("convShortcut.weight")]) == 3  # 16->64, 64->128, 128->256
    path = tmp_path / "Ding2020MMA.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # as RobustBench's files
    model = load_pretrained(path, source="robustbench")
    assert isinstance(model, WideResNet) and not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in sd.items()
                                                             if not k.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked")))
    x = images(3, (3, 32, 32))
    with torch.no_grad():
        expected = published_wrn_forward(sd, x, "robustbench")
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_mma_training_cifar10_sequential_same_outputs() -> None:
    sd = wrn_state_dict(10, 2, "advertorch", seed=3)
    model = load_pretrained({"model": sd, "epoch": 7}, source="mma_training")  # as model_best.pt
    assert isinstance(model, WideResNet) and isinstance(model.standardize, torch.nn.Module)
    x = images(3, (3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), published_wrn_forward(sd, x, "advertorch"), rtol=1e-4, atol=1e-4)


def test_mma_training_mnist_lenet_same_outputs() -> None:
    sd = lenet_state_dict()
    model = load_pretrained({"model": sd}, source="mma_training")
    assert isinstance(model, LeNet5Madry)
    x = images(4, (1, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(model(x), published_lenet_forward(sd, x), rtol=1e-5, atol=1e-5)


def test_layout_and_source_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"source must be one of \['robustbench', 'mma_training'\]"):
        load_pretrained({}, source="torchhub")
    with pytest.raises(ValueError, match="not in the robustbench_wrn layout.*convgroup1"):
        advertorch_keys = {k[2:]: v for k, v in wrn_state_dict(10, 1, "advertorch").items()}
        load_pretrained(advertorch_keys, source="robustbench")
    broken = wrn_state_dict(10, 1, "robustbench")
    broken["fc.weight"] = broken["fc.weight"][:, :-1]
    with pytest.raises(ValueError, match="does not fit WideResNet"):
        load_pretrained(broken, source="robustbench")
    with pytest.raises(ValueError, match="no such checkpoint file"):
        load_pretrained("/nonexistent/model_best.pt", source="mma_training")
