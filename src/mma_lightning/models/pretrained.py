"""The MMA paper's released models as this package's models, with the same outputs.

Two published layouts (Ding et al., ICLR 2020):

- ``source="robustbench"``: RobustBench's ``Ding2020MMA`` (CIFAR10 Linf; ``robustbench/model_zoo/cifar10.py``,
  ``Ding2020MMANet``): the TRADES-style ``WideResNet`` of ``architectures/wide_resnet.py`` with
  ``depth=28, widen_factor=4, sub_block1=False`` (keys ``conv1``, ``block<g>.layer.<i>.{bn1, conv1, bn2,
  conv2, convShortcut}``, ``bn1``, ``fc``) and per-image standardisation in ``forward``.
- ``source="mma_training"``: the authors' ``trained_models/*/model_best.pt`` (BorealisAI/mma_training, read
  by its ``evaluate_on_pgd_attacks.py`` as ``ckpt["model"]``): for CIFAR10
  ``nn.Sequential(PerImageStandardize(), WideResNet(28, 10, 4))`` of ``advertorch_examples/models.py`` (keys
  ``1.conv1``, ``1.convgroup<g>.layer.<i>.{bn1, conv1, bn2, conv2, conv_shortcut}``, ``1.bn1``, ``1.fc``), for
  MNIST advertorch's ``LeNet5Madry`` (``conv1``, ``conv2``, ``linear1``, ``linear2``).

All are pre-activation networks with the same block (projection shortcut on the activated input), so they map
one to one onto :class:`~mma_lightning.models.WideResNet` (with :class:`PerImageStandardization` inside, as
both references standardise each image by its unbiased std floored at ``1/sqrt(C*H*W)``) and
:class:`~mma_lightning.models.LeNet5Madry`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mma_lightning.models.lenet import LeNet5Madry
from mma_lightning.models.standardize import PerImageStandardization
from mma_lightning.models.wideresnet import WideResNet

SOURCES = ("robustbench", "mma_training")
"""The accepted ``source=`` values of :func:`load_pretrained`."""
PAPER_INFO: dict[str, object] = {
    "link": "https://openreview.net/forum?id=HkeryxBtPB",
    "name": "MMA Training: Direct Input Space Margin Maximization through Adversarial Training",
    "authors": "Gavin Weiguang Ding, Yash Sharma, Kry Yik Chau Lui, Ruitong Huang",
    "venue": "ICLR 2020",
    "additional_data": False,
    "number_forward_passes": 1,
}
"""What RobustBench's ``model_info`` says of the paper behind every released model (``Ding2020MMA.json``)."""

# (published key pattern, this package's key) per layout; every key must match one rule.
_WRN_BLOCK = r"(bn1|conv1|bn2|conv2)"
_RULES: dict[str, list[tuple[str, str]]] = {
    "robustbench_wrn": [
        (r"conv1\.(weight)", r"conv1.\1"),
        (rf"block(\d)\.layer\.(\d+)\.{_WRN_BLOCK}\.(\w+)", r"block\1.\2.\3.\4"),
        (r"block(\d)\.layer\.(\d+)\.convShortcut\.weight", r"block\1.\2.shortcut.weight"),
        (r"bn1\.(\w+)", r"bn.\1"),
        (r"fc\.(weight|bias)", r"fc.\1"),
    ],
    "advertorch_wrn": [
        (r"conv1\.(weight)", r"conv1.\1"),
        (rf"convgroup(\d)\.layer\.(\d+)\.{_WRN_BLOCK}\.(\w+)", r"block\1.\2.\3.\4"),
        (r"convgroup(\d)\.layer\.(\d+)\.conv_shortcut\.weight", r"block\1.\2.shortcut.weight"),
        (r"bn1\.(\w+)", r"bn.\1"),
        (r"fc\.(weight|bias)", r"fc.\1"),
    ],
    "advertorch_lenet": [
        (r"conv(1|2)\.(weight|bias)", r"features.conv\1.\2"),
        (r"linear(1|2)\.(weight|bias)", r"classifier.fc\1.\2"),
    ],
}


def load_pretrained(path_or_state_dict: str | Path | Mapping[str, object], source: str) -> nn.Module:
    """The released MMA model in ``path_or_state_dict`` as this package's model, in eval mode.

    Args:
        path_or_state_dict: a checkpoint file (``torch.load``-able) or what it holds: a state dict, or a dict
            with it under ``"model"`` (mma_training) or ``"state_dict"``; a ``"module."`` prefix
            (``DataParallel``) is removed.
        source: ``"robustbench"`` (``Ding2020MMA``) or ``"mma_training"`` (the authors' checkpoints).

    Returns:
        :class:`WideResNet` (taking [0, 1] pixels, standardisation inside when the published model has it) or
        :class:`LeNet5Madry` (wrapped after :class:`PerImageStandardization` if the checkpoint is such a
        ``Sequential``), whose logits equal the published model's.

    Raises:
        ValueError: unknown ``source``, or a state dict that is not in that source's layout (the keys that do
            not fit are named).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    state = _state_dict(path_or_state_dict)
    if source == "robustbench":
        model: nn.Module = _wide_resnet(_mapped(state, "robustbench_wrn", source), standardize=True)
        return model.eval()
    standardized = bool(state) and all(k.startswith(("0.", "1.")) for k in state)  # Sequential(std, net)
    if standardized:
        state = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    if any(k.startswith("convgroup") for k in state):
        model = _wide_resnet(_mapped(state, "advertorch_wrn", source), standardize=standardized)
    else:
        mapped = _mapped(state, "advertorch_lenet", source)
        lenet = LeNet5Madry(in_channels=mapped["features.conv1.weight"].shape[1],
                            num_classes=mapped["classifier.fc2.weight"].shape[0])
        _load(lenet, mapped, source)
        model = nn.Sequential(PerImageStandardization(), lenet) if standardized else lenet
    return model.eval()


def architecture_name(model: nn.Module) -> str:
    """RobustBench's ``architecture`` label of a model: ``"WideResNet-28-4"`` (depth and width read from the
    blocks), ``"LeNet5-Madry"``, else the class name (a ``Sequential`` of standardisation and a model: the
    model's)."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], PerImageStandardization):
        model = model[1]
    if isinstance(model, WideResNet):
        conv = model.block1[0].conv1
        assert isinstance(conv, nn.Conv2d)
        return f"WideResNet-{6 * len(model.block1) + 4}-{conv.out_channels // 16}"
    if isinstance(model, LeNet5Madry):
        return "LeNet5-Madry"
    return type(model).__name__


def _state_dict(obj: str | Path | Mapping[str, object]) -> dict[str, Tensor]:
    """The tensors of a checkpoint file or object, out of ``model`` / ``state_dict``, without ``module.``."""
    if isinstance(obj, (str, Path)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise ValueError(f"path_or_state_dict: no such checkpoint file {str(path)!r}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError("path_or_state_dict must be a state dict or a checkpoint dict, "
                         f"got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]  # type: ignore[assignment]
            break
    state = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mapped(state: dict[str, Tensor], layout: str, source: str) -> dict[str, Tensor]:
    """``state`` renamed by the layout's rules; a ValueError naming the keys no rule fits."""
    rules = [(re.compile(pattern), repl) for pattern, repl in _RULES[layout]]
    mapped, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if pattern.fullmatch(key):
                mapped[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown or not mapped:
        raise ValueError(f"source={source!r}: the state dict is not in the {layout} layout; keys that do not "
                         f"fit: {unknown[:8] or '(no tensors)'}" + (" ..." if len(unknown) > 8 else ""))
    return mapped


def _wide_resnet(mapped: dict[str, Tensor], standardize: bool) -> WideResNet:
    """The :class:`WideResNet` whose depth, width, classes and channels the tensors' shapes give, loaded."""
    blocks = {int(m.group(1)) for k in mapped if (m := re.match(r"block1\.(\d+)\.", k))}
    stem = mapped["conv1.weight"]
    model = WideResNet(depth=6 * len(blocks) + 4, widen_factor=mapped["block1.0.conv1.weight"].shape[0] // 16,
                       num_classes=mapped["fc.weight"].shape[0], in_channels=stem.shape[1],
                       standardize=standardize)
    _load(model, mapped, "WideResNet")
    return model


def _load(model: nn.Module, mapped: dict[str, Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with shape and key mismatches as a ValueError."""
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint does not fit {what}: {err}") from None
