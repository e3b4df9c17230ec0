"""Model backbones: shapes, sizes, preprocessing semantics, argument validation and gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mma_lightning.models import (
    LeNet5Madry,
    Normalize,
    PerImageStandardization,
    PreActResNet18,
    ResNet18,
    WideResNet,
    torchvision_model,
    wrn28_4,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
WRN28_4_PARAMS = 5_849_050  # published WRN-28-4: ~5.8M


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Each model is built once per module: WRN-28-4 and the ResNet-18s take a moment to initialise.
@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "lenet": (LeNet5Madry(), (1, 28, 28)),
        "wrn28_4": (wrn28_4(), (3, 32, 32)),
        "preact_resnet18": (PreActResNet18(), (3, 32, 32)),
        "resnet18": (ResNet18(), (3, 32, 32)),
        "tv_resnet18": (torchvision_model("resnet18", mean=CIFAR_MEAN, std=CIFAR_STD), (3, 32, 32)),
    }


@pytest.mark.parametrize("name", ["lenet", "wrn28_4", "preact_resnet18", "resnet18", "tv_resnet18"])
def test_output_shape_train_and_eval_and_input_gradient(models, name: str) -> None:
    model, shape = models[name]
    x = torch.rand(2, *shape, requires_grad=True)
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    assert out_eval.shape == (2, 10) and torch.isfinite(out_eval).all()


def test_num_classes_and_in_channels() -> None:
    assert LeNet5Madry(in_channels=3, num_classes=7)(torch.rand(2, 3, 28, 28)).shape == (2, 7)
    wrn = WideResNet(depth=10, widen_factor=1, num_classes=5, in_channels=1)
    assert wrn(torch.rand(2, 1, 32, 32)).shape == (2, 5)
    assert ResNet18(num_classes=3, in_channels=1)(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    assert PreActResNet18(num_classes=3, in_channels=1)(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_wrn28_4_structure(models) -> None:
    wrn = models["wrn28_4"][0]
    assert n_params(wrn) == WRN28_4_PARAMS
    assert isinstance(wrn.standardize, PerImageStandardization)
    assert not any(isinstance(m, nn.Dropout) for m in wrn.modules())
    bns = [m for m in wrn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 12 + 1  # two per block, 4 blocks x 3 groups, plus the final one
    assert all(bn.momentum == 0.1 and bn.eps == 1e-5 for bn in bns)
    assert [wrn.block1[0].conv1.out_channels, wrn.block2[0].conv1.out_channels] == [64, 128]
    assert wrn.block3[0].conv1.out_channels == 256 and wrn.fc.in_features == 256
    assert [len(wrn.block1), len(wrn.block2), len(wrn.block3)] == [4, 4, 4]
    assert isinstance(WideResNet(depth=10, widen_factor=1, standardize=False).standardize, nn.Identity)


def test_wrn_standardize_makes_it_invariant_to_affine_pixel_changes(models) -> None:
    wrn = models["wrn28_4"][0].eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrn(x), wrn(0.5 * x + 0.2), atol=1e-4, rtol=1e-4)


def test_model_sizes_of_resnets(models) -> None:
    assert n_params(models["resnet18"][0]) == 11_173_962  # kuangliu/pytorch-cifar ResNet18
    assert n_params(models["preact_resnet18"][0]) == 11_172_170  # + final BN of Rice et al.


@pytest.mark.parametrize("depth", [0, 4, 27, 29])
def test_invalid_wrn_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=depth)


def test_invalid_wrn_widen_factor() -> None:
    with pytest.raises(ValueError, match="widen_factor"):
        WideResNet(depth=10, widen_factor=0)


def test_lenet5madry_layer_sizes() -> None:
    net = LeNet5Madry()
    f, c = net.features, net.classifier
    assert f.conv1.weight.shape == (32, 1, 5, 5) and f.conv1.padding == (2, 2)
    assert f.conv2.weight.shape == (64, 32, 5, 5) and f.conv2.padding == (2, 2)
    assert isinstance(f.pool1, nn.MaxPool2d) and isinstance(f.pool2, nn.MaxPool2d)
    assert (c.fc1.in_features, c.fc1.out_features) == (3136, 1024)
    assert (c.fc2.in_features, c.fc2.out_features) == (1024, 10)
    assert n_params(net) == 3_274_634


def _per_image_standardization_numpy(x: np.ndarray) -> np.ndarray:
    """Direct reference: ``(x - mean) / max(std, 1/sqrt(n))`` per image, unbiased ``std`` (ddof=1)."""
    out = np.empty_like(x)
    for i, img in enumerate(x):
        scale = max(img.std(ddof=1), 1.0 / np.sqrt(img.size))
        out[i] = (img - img.mean()) / scale
    return out


def test_per_image_standardization_matches_reference() -> None:
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * torch.tensor([1.0, 0.1, 5.0]).view(3, 1, 1, 1).double()
    out = PerImageStandardization()(x)
    torch.testing.assert_close(out, torch.from_numpy(_per_image_standardization_numpy(x.numpy())))
    flat = out.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, dtype=torch.float64))
    # Images 0 and 2 have std > 1/sqrt(192): unit *unbiased* std. Image 1 (std ~0.03 < 0.072) is floored.
    torch.testing.assert_close(flat[[0, 2]].std(1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(flat[[0, 2]].std(1, correction=0), torch.ones(2, dtype=torch.float64))
    assert flat[1].std() < 0.5


def test_per_image_standardization_floor() -> None:
    n = 3 * 4 * 4
    const = torch.full((1, 3, 4, 4), 0.75, requires_grad=True)  # exact in float32, so mean - x == 0
    out = PerImageStandardization()(const)
    assert torch.isfinite(out).all() and (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(const.grad).all()
    # Tiny variation: std < 1/sqrt(n), so the floor divides and the output stays small.
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    x[0, 0, 0, 0] += 1e-3
    expected = (x - x.mean()) * np.sqrt(n)
    torch.testing.assert_close(PerImageStandardization()(x), expected)
    torch.testing.assert_close(expected, torch.from_numpy(_per_image_standardization_numpy(x.numpy())))


def test_normalize() -> None:
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert not list(norm.parameters())
    x = torch.rand(2, 3, 4, 4)
    for c in range(3):
        torch.testing.assert_close(norm(x)[:, c], (x[:, c] - CIFAR_MEAN[c]) / CIFAR_STD[c])
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5, 0.5), (0.5,))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))


def test_torchvision_model_wrapping(models) -> None:
    wrapped = models["tv_resnet18"][0]
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], Normalize)
    assert wrapped[1].fc.out_features == 10
    bare = torchvision_model("resnet18", num_classes=4)
    assert not isinstance(bare, nn.Sequential) and bare.fc.out_features == 4


def test_torchvision_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="name") as info:
        torchvision_model("not_a_model")
    assert "resnet18" in str(info.value)
    with pytest.raises(ValueError, match="mean"):
        torchvision_model("resnet18", mean=CIFAR_MEAN)
