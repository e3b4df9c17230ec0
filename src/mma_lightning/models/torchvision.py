"""Any torchvision classification model by name, optionally with input normalisation inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torchvision
from torch import nn

from mma_lightning.models.standardize import Normalize

_EXAMPLES = ("resnet18", "resnet50", "wide_resnet50_2", "vgg16_bn", "densenet121", "vit_b_16")


def torchvision_model(
    name: str,
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A randomly initialised torchvision classification model by name (``torchvision.models.get_model``).

    Weights are always ``None``: nothing is downloaded and ``num_classes`` may be anything. ``kwargs`` go to
    the model builder. When ``mean`` and ``std`` are given the result is
    ``nn.Sequential(Normalize(mean, std), model)``, so the model takes [0, 1] pixels and attack radii are in
    pixel units. Note that torchvision's ImageNet stems downsample 32x32 inputs aggressively; for CIFAR prefer
    :class:`~mma_lightning.models.ResNet18` or :class:`~mma_lightning.models.PreActResNet18`.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name.lower() not in available:
        examples = ", ".join([n for n in _EXAMPLES if n in available] or available[:5])
        raise ValueError(
            f"torchvision_model: unknown name={name!r}; expected a torchvision classification model, e.g. "
            f"{examples} (all {len(available)}: torchvision.models.list_models(module=torchvision.models))"
        )
    if (mean is None) != (std is None):
        raise ValueError(f"torchvision_model: give both mean and std or neither, got mean={mean}, std={std}")
    model = torchvision.models.get_model(name.lower(), weights=None, num_classes=num_classes, **kwargs)
    if mean is None or std is None:
        return model
    return nn.Sequential(Normalize(mean, std), model)
