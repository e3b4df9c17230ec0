"""Model backbones in plain PyTorch; preprocessing lives inside the models, so inputs are [0, 1] pixels."""

from mma_lightning.models.lenet import LeNet5Madry
from mma_lightning.models.preact_resnet import PreActResNet18
from mma_lightning.models.pretrained import load_pretrained
from mma_lightning.models.resnet import ResNet18
from mma_lightning.models.standardize import Normalize, PerImageStandardization
from mma_lightning.models.torchvision import torchvision_model
from mma_lightning.models.wideresnet import WideResNet, wrn28_4

__all__ = [
    "LeNet5Madry",
    "Normalize",
    "PerImageStandardization",
    "PreActResNet18",
    "ResNet18",
    "WideResNet",
    "load_pretrained",
    "torchvision_model",
    "wrn28_4",
]
