"""LeNet-5 variant of the Madry et al. MNIST challenge, the MNIST model of MMA training."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class LeNet5Madry(nn.Module):
    """The MNIST CNN of Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
    (ICLR 2018; github.com/MadryLab/mnist_challenge), as used by MMA (Ding et al., ICLR 2020) through
    advertorch's ``LeNet5Madry``.

    conv5x5(32, pad 2) - ReLU - maxpool2 - conv5x5(64, pad 2) - ReLU - maxpool2 - FC(3136, 1024) - ReLU -
    FC(1024, num_classes). Expects 28x28 inputs (3136 = 64 * 7 * 7).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(32, 64, kernel_size=5, padding=2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * 7 * 7, 1024),
                relu3=nn.ReLU(),
                fc2=nn.Linear(1024, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for a ``[N, in_channels, 28, 28]`` batch."""
        return self.classifier(self.features(x))
