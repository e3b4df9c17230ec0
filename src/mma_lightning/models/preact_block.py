"""The pre-activation residual block of PreActResNet and WideResNet."""

from __future__ import annotations

from torch import Tensor, nn


class PreActBlock(nn.Module):
    """Pre-activation basic block BN-ReLU-conv3x3-BN-ReLU-conv3x3 (He et al., "Identity Mappings in Deep
    Residual Networks", ECCV 2016), shared by PreActResNet-18 and the wide ResNet (Zagoruyko & Komodakis 2016,
    Fig. 1c). When the shape changes, the shortcut is a 1x1 convolution of the *activated* input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x``; a projection shortcut sees the activated input."""
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut
