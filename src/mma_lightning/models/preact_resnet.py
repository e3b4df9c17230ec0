"""Pre-activation ResNet-18 for 32x32 inputs."""

from __future__ import annotations

from torch import Tensor, nn

from mma_lightning.models.preact_block import PreActBlock


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He et al., ECCV 2016) in the CIFAR layout of Rice et al., "Overfitting in
    adversarially robust deep learning" (ICML 2020; github.com/locuslab/robust_overfitting).

    3x3 stem (64 channels, stride 1, no max-pool), four stages of two pre-activation blocks
    (64/128/256/512 channels), final BN-ReLU, global average pooling and a linear classifier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        """Two blocks; the first may downsample."""
        return nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for a ``[N, in_channels, H, W]`` batch."""
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(self.relu(self.bn(out))).flatten(1)
        return self.linear(out)
