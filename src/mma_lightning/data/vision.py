"""LightningDataModules on torchvision datasets; every loader yields ``(x, y, index)``.

The shared logic lives in :class:`VisionDataModule`: locate or download the files (downloads go through a
temporary folder, so a failed one leaves nothing behind), carve the seeded validation split out of the
training set (un-augmented), optionally keep only the first ``train_subset`` training samples, and build the
loaders. A per-dataset class only names the torchvision dataset, its number of classes, image shape and
training augmentation.

MNIST and Fashion-MNIST also read the four original IDX files (plain or ``.gz``) straight from a folder, e.g.
Debian's read-only ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from mma_lightning.data.indexed import IndexedDataModule, IndexedDataModuleLogic, check_positive, seeded_split

Transform = Callable[[Any], Any]

# torchvision raises RuntimeError("Dataset not found ...") for a missing dataset; ImageFolder and the IDX
# reader below raise FileNotFoundError.
_MISSING_ERRORS = (RuntimeError, FileNotFoundError)

IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists first; ``None`` when neither does."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def read_idx(path: Path) -> Tensor:
    """Read an IDX file of unsigned bytes (the MNIST format), plain or gzipped, as a uint8 tensor."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(shape)


class IDXFolderDataset(datasets.MNIST):
    """torchvision's MNIST dataset (same items, same transforms) read from a folder holding the IDX files.

    torchvision itself only reads decompressed files under ``<root>/<ClassName>/raw/``; this reads
    :data:`IDX_FILES` (plain or ``.gz``) from ``folder`` directly and writes nothing.
    """

    def __init__(
        self,
        folder: str | Path,
        train: bool = True,
        transform: Transform | None = None,
        classes: list[str] | None = None,
    ) -> None:
        # MNIST.__init__ would look only in <root>/<ClassName>/raw/ (and maybe download): skip it.
        datasets.VisionDataset.__init__(self, str(folder), transform=transform)
        folder = Path(folder)
        split = "train" if train else "t10k"
        images = find_idx_file(folder, f"{split}-images-idx3-ubyte")
        labels = find_idx_file(folder, f"{split}-labels-idx1-ubyte")
        if images is None or labels is None:
            raise FileNotFoundError(f"{split}-images/labels IDX files (plain or .gz) not in {folder}")
        self.train = train
        self.classes = list(classes) if classes is not None else list(datasets.MNIST.classes)
        self.data = read_idx(images)
        self.targets = read_idx(labels).long()


class VisionDataModuleLogic(IndexedDataModuleLogic):
    """Base LightningDataModule over a torchvision dataset; loaders yield ``(x, y, index)``, x in [0, 1].

    Args:
        data_dir: where the dataset lives (or is downloaded to).
        download: download the files in :meth:`prepare_data` when they are missing. With the files present
            no network is touched.
        val_size: size of the validation split carved at random (seeded) from the training set (paper: 5000).
            It uses the un-augmented transform. 0 disables validation.
        batch_size: GLOBAL training batch size, divided by the trainer's world size in :meth:`setup`.
        eval_batch_size: GLOBAL val/test batch size (default: ``batch_size``).
        num_workers, pin_memory: passed to the DataLoaders.
        seed: seed of the validation split.
        augment: apply the dataset's training augmentation (training split only).
        train_subset: keep only the first N training samples after the split (quick runs).
    """

    DATASET: ClassVar[Any]
    NUM_CLASSES: ClassVar[int]
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
    EXPECTED: ClassVar[str] = "the dataset files"  # what data_dir must hold, for error messages
    DOWNLOADABLE: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = True,
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
        augment: bool = True,
        train_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size must be an int, 0 <= val_size < training set size; got {val_size!r}")
        check_positive("train_subset", train_subset, optional=True)
        self.save_hyperparameters()
        self.data_dir = os.path.expanduser(str(data_dir))
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.train_subset = train_subset
        self.eval_transform = transforms.Compose(self.preprocessing())
        augmentation = self.augmentation() if augment else []
        self.train_transform = self.eval_transform
        if augmentation:
            self.train_transform = transforms.Compose([*augmentation, *self.preprocessing()])

    # --- per-dataset hooks -------------------------------------------------------------------------------

    def augmentation(self) -> list[Transform]:
        """Training-only augmentation, applied before :meth:`preprocessing` (default: none)."""
        return []

    def preprocessing(self) -> list[Transform]:
        """Transforms of every split, ending in a float tensor in [0, 1] (no normalisation)."""
        return [transforms.ToTensor()]

    def split_kwargs(self, split: str) -> dict[str, Any]:
        """Keyword arguments selecting ``split`` ("train" / "test") in the torchvision dataset."""
        return {"train": split == "train"}

    def make_dataset(self, split: str, transform: Transform | None) -> Dataset | None:
        """The ``(x, y)`` dataset of ``split`` ("train" / "val" / "test"), ``None`` for a split it lacks."""
        if split == "val":
            return None  # torchvision datasets have no validation split: it is carved from train
        return self.DATASET(self.data_dir, transform=transform, download=False, **self.split_kwargs(split))

    def download_to(self, root: str) -> None:
        """Download the train and test files into ``root`` (torchvision's own downloader)."""
        for split in ("train", "test"):
            self.DATASET(root, download=True, **self.split_kwargs(split))

    def files_present(self) -> bool:
        """Whether the train and test files are in ``data_dir`` (tries to load them)."""
        try:
            self.make_dataset("train", None)
            self.make_dataset("test", None)
        except _MISSING_ERRORS:
            return False
        return True

    def expected_location(self) -> str:
        """Where the files are expected, for error messages."""
        return f"{self.EXPECTED} in {os.path.abspath(self.data_dir)}"

    # --- shared logic ------------------------------------------------------------------------------------

    @property
    def dataset_name(self) -> str:
        """Name of the torchvision dataset."""
        return self.DATASET.__name__

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image tensor."""
        return self.IMAGE_SHAPE

    def _not_found(self, reason: str, fix: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.dataset_name} {reason}. Expected {self.expected_location()}. To fix: {fix}."
        )

    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` and its files are missing; otherwise touch nothing.

        The download goes to a temporary folder inside ``data_dir`` and is moved into place only when it
        succeeded. A failed download raises ``FileNotFoundError`` saying where the files were expected.
        """
        if not (self.download and self.DOWNLOADABLE) or self.files_present():
            return
        root = Path(self.data_dir)
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
                self.download_to(tmp)
                for entry in Path(tmp).iterdir():  # move into place, one rename per file
                    target = root / entry.name
                    if entry.is_dir():
                        shutil.copytree(entry, target, dirs_exist_ok=True, copy_function=os.replace)
                    else:
                        os.replace(entry, target)
        except (OSError, RuntimeError) as err:
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            raise self._not_found(
                f"could not be downloaded into {root.resolve()} ({type(err).__name__}: {err})",
                "check the network, or fetch the files elsewhere and point data.data_dir=... at the folder "
                "that holds them (with data.download=false)",
            ) from err

    def _load(self, split: str, transform: Transform) -> Dataset | None:
        """:meth:`make_dataset`, downloading first if needed, with the clear error when files are missing."""
        try:
            return self.make_dataset(split, transform)
        except _MISSING_ERRORS as err:
            if not (self.download and self.DOWNLOADABLE):
                fix = "point data.data_dir=... at the folder that holds it"
                if self.DOWNLOADABLE:
                    fix = f"set data.download=true to download it into data_dir, or {fix}"
                raise self._not_found(f"not found (download={self.download})", fix) from err
        self.prepare_data()  # normally the Trainer has already called it
        return self.make_dataset(split, transform)

    def build_datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """Train (seeded split, optional subset), val (own split or carved from train) and test datasets."""
        train_full = self._load("train", self.train_transform)
        assert train_full is not None
        val = self._load("val", self.eval_transform)
        test = self._load("test", self.eval_transform)
        train_idx = torch.arange(len(train_full))  # type: ignore[arg-type]
        if val is None and self.val_size > 0:
            n = len(train_full)  # type: ignore[arg-type]
            train_idx, val_idx = seeded_split(n, self.val_size, self.seed)
            eval_full: Dataset | None = train_full
            if self.train_transform is not self.eval_transform:
                eval_full = self._load("train", self.eval_transform)
            val = Subset(eval_full, val_idx.tolist())  # type: ignore[arg-type]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        return Subset(train_full, train_idx.tolist()), val, test


class MNISTDataModuleLogic(VisionDataModuleLogic):
    """MNIST (10 classes, 1x28x28, no augmentation).

    ``data_dir`` may use torchvision's layout (``<data_dir>/MNIST/raw/``) or directly hold the four IDX files,
    each plain or ``.gz``; they are read in place.
    """

    DATASET = datasets.MNIST
    NUM_CLASSES = 10
    IMAGE_SHAPE = (1, 28, 28)

    def idx_folder(self) -> Path | None:
        """The folder holding all IDX files: ``<data_dir>/<Name>/raw/`` or ``data_dir`` itself, else None."""
        root = Path(self.data_dir)
        candidates = (root / self.dataset_name / "raw", root)
        return next((d for d in candidates if all(find_idx_file(d, stem) for stem in IDX_FILES)), None)

    def files_present(self) -> bool:
        """Whether the IDX files are in one of the two accepted places (does not read them)."""
        return self.idx_folder() is not None

    def make_dataset(self, split: str, transform: Transform | None) -> Dataset | None:
        """The split read from the IDX files (``None`` for "val")."""
        if split == "val":
            return None
        folder = self.idx_folder()
        if folder is None:
            raise FileNotFoundError(self.expected_location())
        train = split == "train"
        return IDXFolderDataset(folder, train=train, transform=transform, classes=self.DATASET.classes)

    def expected_location(self) -> str:
        """Where the IDX files are expected, for error messages."""
        root = Path(self.data_dir).absolute()
        names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES)
        return f"{names} in {root / self.dataset_name / 'raw'} (torchvision's layout) or directly in {root}"


class FashionMNISTDataModuleLogic(MNISTDataModuleLogic):
    """Fashion-MNIST (10 classes, 1x28x28, no augmentation); reads Debian's ``dataset-fashion-mnist`` too."""

    DATASET = datasets.FashionMNIST


class CIFAR10DataModuleLogic(VisionDataModuleLogic):
    """CIFAR-10 (10 classes, 3x32x32); paper augmentation: reflect-pad 4, random 32 crop, horizontal flip."""

    DATASET = datasets.CIFAR10
    NUM_CLASSES = 10
    IMAGE_SHAPE = (3, 32, 32)
    EXPECTED = "cifar-10-batches-py/ (data_batch_1..5, test_batch)"

    def augmentation(self) -> list[Transform]:
        """Reflect-pad by 4, random 32x32 crop, random horizontal flip."""
        return [
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]


class CIFAR100DataModuleLogic(CIFAR10DataModuleLogic):
    """CIFAR-100 (100 classes, 3x32x32), same augmentation as CIFAR-10."""

    DATASET = datasets.CIFAR100
    NUM_CLASSES = 100
    EXPECTED = "cifar-100-python/ (train, test)"


class SVHNDataModuleLogic(VisionDataModuleLogic):
    """SVHN train/test (10 classes, 3x32x32, no augmentation; the "extra" split is not used).

    torchvision reads the ``.mat`` files with scipy, which must be installed.
    """

    DATASET = datasets.SVHN
    NUM_CLASSES = 10
    IMAGE_SHAPE = (3, 32, 32)
    EXPECTED = "train_32x32.mat and test_32x32.mat"

    def split_kwargs(self, split: str) -> dict[str, Any]:
        """SVHN selects its split by name."""
        return {"split": split}


class ImageFolderDataModuleLogic(VisionDataModuleLogic):
    """Images in class subfolders: ``<data_dir>/train/<class>/*`` and optionally ``val/`` and ``test/``.

    Without ``val/``, ``val_size`` images are carved from ``train/``. Images are loaded as RGB, resized and
    center-cropped to ``image_size`` (training augmentation: random resized crop and horizontal flip).
    Nothing can be downloaded.
    """

    DATASET = datasets.ImageFolder
    EXPECTED = "train/<class>/<image files> (optionally val/ and test/ alike)"
    DOWNLOADABLE = False

    def __init__(self, data_dir: str = "data/", image_size: int = 224, **kwargs: Any) -> None:
        check_positive("image_size", image_size)
        self.image_size = image_size  # needed by the transforms built in super().__init__
        super().__init__(data_dir=data_dir, **kwargs)

    def augmentation(self) -> list[Transform]:
        """Random resized crop to ``image_size`` and horizontal flip."""
        return [transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()]

    def preprocessing(self) -> list[Transform]:
        """Resize the short side to ``image_size``, center crop, to tensor."""
        return [
            transforms.Resize(self.image_size),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
        ]

    def make_dataset(self, split: str, transform: Transform | None) -> Dataset | None:
        """``ImageFolder`` on ``<data_dir>/<split>``; ``None`` for a missing optional val/test folder."""
        folder = Path(self.data_dir) / split
        if split != "train" and not folder.is_dir():
            return None
        return datasets.ImageFolder(str(folder), transform=transform)

    @property
    def num_classes(self) -> int:
        """Number of class subfolders of ``train/``."""
        train = self.train_set
        return len(train.dataset.classes)  # type: ignore[attr-defined]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class VisionDataModule(VisionDataModuleLogic, IndexedDataModule):
    """:class:`VisionDataModuleLogic` on pytorch_lightning (the default namespace)."""


class MNISTDataModule(MNISTDataModuleLogic, VisionDataModule):
    """:class:`MNISTDataModuleLogic` on pytorch_lightning (the default namespace)."""


class FashionMNISTDataModule(FashionMNISTDataModuleLogic, MNISTDataModule):
    """:class:`FashionMNISTDataModuleLogic` on pytorch_lightning (the default namespace)."""


class CIFAR10DataModule(CIFAR10DataModuleLogic, VisionDataModule):
    """:class:`CIFAR10DataModuleLogic` on pytorch_lightning (the default namespace)."""


class CIFAR100DataModule(CIFAR100DataModuleLogic, CIFAR10DataModule):
    """:class:`CIFAR100DataModuleLogic` on pytorch_lightning (the default namespace)."""


class SVHNDataModule(SVHNDataModuleLogic, VisionDataModule):
    """:class:`SVHNDataModuleLogic` on pytorch_lightning (the default namespace)."""


class ImageFolderDataModule(ImageFolderDataModuleLogic, VisionDataModule):
    """:class:`ImageFolderDataModuleLogic` on pytorch_lightning (the default namespace)."""
