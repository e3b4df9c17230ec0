"""What was evaluated: fingerprints of the model and of the test points, for ``results.json``.

A number in a report is only useful with the identity of the model (architecture, exact weights) and of the
data (which points, which labels) that produced it; RobustBench reports its results the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn


def tensor_sha256(tensors: list[Tensor]) -> str:
    """SHA-256 of the raw bytes of ``tensors`` (in order), as hex; copies to the host once per tensor."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Class, parameter count and a SHA-256 of the ``state_dict`` (weights and buffers) of ``model``."""
    state = model.state_dict()
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_sha256": tensor_sha256([state[k] for k in sorted(state)]),
    }


def data_identity(index: Tensor, label: Tensor) -> dict[str, Any]:
    """Number of evaluated points and a SHA-256 of their (index, label) pairs."""
    return {
        "num_samples": int(index.numel()),
        "samples_sha256": tensor_sha256([index.long(), label.long()]),
    }
