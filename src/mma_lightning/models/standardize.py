"""Input preprocessing layers that live *inside* the model, so attacks work in [0, 1] pixel space.

Putting the preprocessing in the model means every attack radius ``eps`` is measured in pixel units, as in
the MMA reference code (Ding et al., ICLR 2020; github.com/BorealisAI/mma_training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class PerImageStandardization(nn.Module):
    """Per-image standardisation, ``tf.image.per_image_standardization`` applied to a batch.

    Each image is mapped to ``(x - mean) / max(std, 1 / sqrt(n))`` where ``mean`` and ``std`` are taken over
    all ``n = C*H*W`` elements of that image, and ``std`` is the *unbiased* standard deviation
    (``torch.std``'s default), matching ``batch_per_image_standardization`` in the MMA reference code
    (BorealisAI/mma_training, via advertorch_examples), which MMA places in front of its CIFAR10 WRN-28-4.

    The scale is computed as ``sqrt(max(var, 1/n))``, which equals ``max(std, 1/sqrt(n))`` but keeps the
    gradient finite for constant images (``std`` itself has an undefined gradient at zero variance).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Standardise each image of a ``[N, ...]`` batch independently."""
        flat = x.flatten(1)
        n = flat.shape[1]
        mean = flat.mean(dim=1, keepdim=True)
        var = (flat - mean).square().sum(dim=1, keepdim=True) / (n - 1)
        scale = var.clamp_min(1.0 / n).sqrt()
        return ((flat - mean) / scale).view_as(x)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, as ``torchvision.transforms.Normalize`` but as a batched layer.

    ``mean`` and ``std`` are registered as (non-trainable) buffers, so they follow the model across devices
    and into its ``state_dict``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"Normalize: mean and std must be non-empty and of equal length (one value per channel), "
                f"got mean={list(mean)} and std={list(std)}"
            )
        if any(not math.isfinite(s) or s <= 0 for s in std):
            raise ValueError(f"Normalize: every std must be finite and > 0, got std={list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise a ``[N, C, H, W]`` batch channel by channel."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the channel statistics in ``print(model)``."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
