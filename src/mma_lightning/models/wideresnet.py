"""Pre-activation Wide Residual Network, the CIFAR10 model of MMA training (WRN-28-4)."""

from __future__ import annotations

from torch import Tensor, nn

from mma_lightning.models.preact_block import PreActBlock
from mma_lightning.models.standardize import PerImageStandardization


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), pre-activation, no dropout.

    Three groups of ``(depth - 4) / 6`` blocks with 16k/32k/64k channels after a 16-channel 3x3 stem, then
    BN-ReLU, global average pooling and a linear classifier. With ``standardize=True`` the first layer is
    :class:`PerImageStandardization`, as in the MMA reference (BorealisAI/mma_training) for CIFAR10, so the
    model takes [0, 1] pixels and every ``eps`` is in pixel units.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet: depth must be >= 10 with (depth - 4) % 6 == 0 (10, 16, 22, 28, 34, 40, ...), "
                f"got depth={depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got widen_factor={widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.standardize: nn.Module = PerImageStandardization() if standardize else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, stride=1)
        self.block2 = self._group(widths[1], widths[2], n, stride=2)
        self.block3 = self._group(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # He (fan_out) init, as advertorch_examples WideResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        """``n`` blocks; only the first changes width and resolution."""
        blocks = [PreActBlock(in_planes, out_planes, stride)]
        blocks += [PreActBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for a ``[N, in_channels, H, W]`` batch."""
        out = self.conv1(self.standardize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.pool(self.relu(self.bn(out))).flatten(1)
        return self.fc(out)


def wrn28_4(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-4 with per-image standardisation inside: the CIFAR10 model of MMA (Ding et al., ICLR 2020)."""
    return WideResNet(28, 4, num_classes=num_classes, in_channels=in_channels, standardize=True)
