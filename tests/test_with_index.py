"""``mma_lightning.data.with_index``: an ``(x, y)`` LightningDataModule written as the lightning-hydra-template
writes one (its own transforms, ``prepare_data`` / ``setup``, ``random_split``) trains MMAModule unchanged."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    TensorDataset,
    WeightedRandomSampler,
    random_split,
)
from torchvision import transforms

from mma_lightning import MMAModule
from mma_lightning.data import TensorDataModule, WithIndexDataModule, with_index
from mma_lightning.data.resumable import ResumableDataLoader


class ImageFiles(Dataset):
    """uint8 images and labels saved by ``prepare_data``, a torchvision-like ``transform`` applied per sample."""

    def __init__(self, path: Path, transform: Any) -> None:
        self.images, self.labels = torch.load(path)
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])

    def __len__(self) -> int:
        return len(self.labels)


def template_datamodule_class(base: type) -> type:
    """The template's ``MNISTDataModule`` on ``base`` (pytorch_lightning's or lightning.pytorch's class)."""

    class TemplateDataModule(base):  # type: ignore[misc, valid-type]
        def __init__(self, data_dir: Path, train_val_test_split: tuple[int, int, int] = (40, 12, 12),
                     batch_size: int = 8, num_workers: int = 0, pin_memory: bool = False) -> None:
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.transforms = transforms.Compose([transforms.ConvertImageDtype(torch.float32)])
            self.data_train: Dataset | None = None
            self.data_val: Dataset | None = None
            self.data_test: Dataset | None = None
            self.batch_size_per_device = batch_size
            self.transferred = 0

        @property
        def num_classes(self) -> int:
            return 3

        def prepare_data(self) -> None:  # the "download"
            g = torch.Generator().manual_seed(0)
            for split, n in (("train", 48), ("test", 16)):
                y = torch.arange(n) % 3
                x = (80 * y.view(-1, 1, 1, 1) + torch.randint(0, 60, (n, 1, 4, 4), generator=g)).to(torch.uint8)
                torch.save((x, y), Path(self.hparams.data_dir) / f"{split}.pt")

        def setup(self, stage: str | None = None) -> None:
            if self.trainer is not None:
                self.batch_size_per_device = self.hparams.batch_size // self.trainer.world_size
            if not self.data_train and not self.data_val and not self.data_test:
                root = Path(self.hparams.data_dir)
                dataset = ConcatDataset([ImageFiles(root / "train.pt", self.transforms),
                                         ImageFiles(root / "test.pt", self.transforms)])
                self.data_train, self.data_val, self.data_test = random_split(
                    dataset, self.hparams.train_val_test_split, generator=torch.Generator().manual_seed(42))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data_train, batch_size=self.batch_size_per_device, drop_last=True,
                              num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(self.data_val, batch_size=self.batch_size_per_device, shuffle=False)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(self.data_test, batch_size=self.batch_size_per_device, shuffle=False)

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            assert len(batch) == 2, "the template's own hook sees (x, y)"
            self.transferred += 1
            return batch

    return TemplateDataModule


class SeenIndices(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(batch[2])


def tiny_mma(package: Any = None) -> Any:
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    cls = MMAModule if package is None else package.MMAModule
    return cls(net, max_eps=0.1, min_eps=0.02, nb_iter=2, search_steps=3, eval_eps=0.05, eval_nb_iter=2,
               eval_search_steps=2, optimizer=partial(torch.optim.Adam, lr=1e-2))


def trainer(ns: Any, tmp_path: Path, **kwargs: Any) -> Any:
    args: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=tmp_path, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    args.update(kwargs)
    return ns.Trainer(**args)


def test_a_template_style_datamodule_trains_mma_with_the_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = template_datamodule_class(pl.LightningDataModule)(tmp_path)
    wrapped = with_index(dm)
    assert type(wrapped) is WithIndexDataModule and wrapped.num_classes == 3  # attributes pass through
    module, seen = tiny_mma(), SeenIndices()
    stored: list[torch.Tensor] = []
    update = module.eps_store.update
    module.eps_store.update = lambda index, eps: (stored.append(index.clone()), update(index, eps))[1]
    fit = trainer(pl, tmp_path, callbacks=[seen])
    fit.fit(module, datamodule=wrapped)
    assert (tmp_path / "train.pt").is_file()  # the wrapped prepare_data ran
    assert wrapped.num_train_samples == len(dm.data_train) == 40
    assert len(module.eps_store) == 40
    # Two epochs of 5 full batches of 8 (drop_last as the wrapped loader): every sample once per epoch, index int64.
    assert len(seen.seen) == 10 and all(i.dtype == torch.int64 and len(i) == 8 for i in seen.seen)
    first, second = torch.cat(seen.seen[:5]), torch.cat(seen.seen[5:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(40))
    assert first.tolist() != second.tolist()  # reshuffled each epoch, as shuffle=True
    assert torch.equal(torch.cat(stored), torch.cat(seen.seen))  # the eps table is keyed by the batches' index
    assert dm.transferred >= 10 + 2  # the template's own batch hook ran on (x, y), train and val

    loader = wrapped.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    assert (loader.batch_size, loader.drop_last, loader.num_workers) == (8, True, 0)
    assert loader.dataset.dataset is dm.data_train
    assert wrapped.val_dataloader().dataset is dm.data_val and wrapped.test_dataloader().dataset is dm.data_test
    x, _ = next(iter(wrapped.val_dataloader()))  # validation batches pass through as (x, y)
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert fit.test(module, datamodule=wrapped, verbose=False)[0]["test/acc"] >= 0


def test_the_training_order_resumes_mid_epoch(tmp_path: Path) -> None:
    def loader() -> ResumableDataLoader:
        dm = template_datamodule_class(pl.LightningDataModule)(tmp_path, batch_size=4)
        dm.prepare_data()
        wrapped = with_index(dm, seed=3)
        wrapped.setup("fit")
        return wrapped.train_dataloader()

    full = [index.tolist() for _, _, index in loader()]
    stopped = loader()
    it = iter(stopped)
    for _ in range(4):
        next(it)
    resumed = loader()
    resumed.load_state_dict(stopped.state_dict())
    assert [index.tolist() for _, _, index in resumed] == full[4:]


def test_each_namespace_in_gives_the_same_namespace_out(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    import mma_lightning.lightning as mml

    dm = template_datamodule_class(L.LightningDataModule)(tmp_path)
    wrapped = mml.data.with_index(dm)
    assert type(wrapped) is mml.data.WithIndexDataModule and isinstance(wrapped, L.LightningDataModule)
    assert not isinstance(wrapped, pl.LightningDataModule)
    module = tiny_mma(mml)
    trainer(L, tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=wrapped)
    assert len(module.eps_store) == 40 and module.global_step == 5


def test_what_with_index_refuses_or_keeps(tmp_path: Path) -> None:
    indexed = TensorDataModule(torch.rand(8, 1, 4, 4), torch.arange(8) % 2, batch_size=4)
    assert with_index(indexed) is indexed  # already yields the index
    with pytest.raises(ValueError, match="needs a LightningDataModule.*got TensorDataset"):
        with_index(TensorDataset(torch.rand(4, 2), torch.arange(4)))

    class Weighted(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            data = TensorDataset(torch.rand(8, 2), torch.arange(8))
            return DataLoader(data, batch_size=4, sampler=WeightedRandomSampler([1.0] * 8, 8))

    with pytest.raises(ValueError, match="shuffle=True or False.*got sampler=WeightedRandomSampler"):
        with_index(Weighted()).train_dataloader()


def test_the_missing_index_message_names_with_index() -> None:
    module = tiny_mma()
    with pytest.raises(ValueError, match=r"mma_lightning\.data\.with_index\(datamodule\)"):
        module.training_step((torch.rand(4, 1, 4, 4), torch.arange(4) % 3), 0)


class PlainPairs(pl.LightningDataModule):
    """An (x, y) datamodule with its own arguments, importable by path (for Hydra and LightningCLI)."""

    def __init__(self, batch_size: int = 4, size: int = 12) -> None:
        super().__init__()
        self.data = TensorDataset(torch.rand(size, 1, 4, 4), torch.arange(size) % 3)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def test_hydra_builds_the_wrapper_and_its_datamodule_from_targets() -> None:
    from hydra.utils import instantiate

    wrapped = instantiate({"_target_": "mma_lightning.data.WithIndexDataModule", "seed": 3,
                           "datamodule": {"_target_": f"{__name__}.PlainPairs", "batch_size": 6}})
    assert type(wrapped) is WithIndexDataModule and type(wrapped.datamodule) is PlainPairs
    assert wrapped.seed == 3 and wrapped.train_dataloader().batch_size == 6


def test_with_index_of_a_class_is_a_class_with_its_arguments() -> None:
    import inspect

    indexed = with_index(PlainPairs, seed=5)
    assert issubclass(indexed, WithIndexDataModule) and indexed.__name__ == "PlainPairsWithIndex"
    assert list(inspect.signature(indexed).parameters) == ["batch_size", "size"]
    module = indexed(batch_size=3, size=9)
    assert type(module.datamodule) is PlainPairs and module.seed == 5 and module.num_train_samples == 9
    x, _, index = next(iter(module.train_dataloader()))
    assert x.shape == (3, 1, 4, 4) and index.dtype == torch.int64
    assert with_index(TensorDataModule) is TensorDataModule  # already yields the index
    with pytest.raises(ValueError, match="needs a LightningDataModule class or object.*got <class 'int'>"):
        with_index(int)
