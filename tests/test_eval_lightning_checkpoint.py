"""``mma-eval`` on the checkpoint a Lightning project writes (``lightning_logs/.../epoch=0-step=2.ckpt``): the file
given as it is, positionally or as ``ckpt_path=`` (the ``=`` in its name quoted for Hydra by the command); the
data group's validation split left out (only the test split is evaluated, so a group's ``val_size`` of 5000 does
not meet a small training set); no hint about a Lightning namespace the user did not use."""

from __future__ import annotations

import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from mma_lightning.cli import eval as eval_cli
from mma_lightning.cli.eval import quote_paths

L = pytest.importorskip("lightning.pytorch")


class TinyRGB(nn.Module):
    """A user's backbone for 3x8x8 images, 2 classes (``+model._target_=test_eval_lightning_checkpoint.TinyRGB``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_quote_paths_makes_lightning_checkpoint_names_safe_for_hydra(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    monkeypatch.chdir(tmp_path)
    for name in ("epoch=4-step=550.ckpt", "epoch=5-step=660.ckpt"):
        (tmp_path / name).touch()
    assert quote_paths(["epoch=4-step=550.ckpt", "data=mnist"]) == ["ckpt_path='epoch=4-step=550.ckpt'", "data=mnist"]
    assert quote_paths(["epoch=4-step=550.ckpt", "epoch=5-step=660.ckpt"]) == [
        "ckpt_paths=['epoch=4-step=550.ckpt','epoch=5-step=660.ckpt']"]
    quoted = quote_paths(["ckpt_path=runs/epoch=4-step=550.ckpt", "ckpt_paths=[a/epoch=1.ckpt,b/step=2.ckpt]",
                          "ckpt_path='already=quoted.ckpt'", "evaluation=fast"])
    parsed = [o.value() for o in OverridesParser.create().parse_overrides(quoted)]
    assert parsed == ["runs/epoch=4-step=550.ckpt", ["a/epoch=1.ckpt", "b/step=2.ckpt"], "already=quoted.ckpt",
                      "fast"]


def lightning_checkpoint(root: Path) -> Path:
    """Two MMA steps of ``mma_lightning.lightning.MMAModule`` in a ``lightning.Trainer``; the default
    ``ModelCheckpoint``'s file."""
    from mma_lightning.lightning import MMAModule
    from mma_lightning.lightning.data import TensorDataModule

    g = torch.Generator().manual_seed(0)
    data = TensorDataModule(torch.rand(8, 3, 8, 8, generator=g), torch.arange(8) % 2, batch_size=4)
    module = MMAModule(TinyRGB(), max_eps=0.2, nb_iter=1, search_steps=2, optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=data)
    (path,) = (root / "checkpoints").glob("*.ckpt")
    return path


def image_folder(root: Path) -> Path:
    """``train/`` with 6 images and ``test/`` with 4, two classes, 8x8 RGB PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for split, n in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("form", ["positional", "ckpt_path"])
def test_mma_eval_takes_a_lightning_checkpoint_as_lightning_names_it(form: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = lightning_checkpoint(tmp_path / "run")
    assert ckpt.name == "epoch=0-step=2.ckpt"
    folder = image_folder(tmp_path / "images")
    monkeypatch.chdir(ckpt.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delitem(sys.modules, "mma_lightning.lightning")  # the user's process: lightning.pytorch only
    given = ckpt.name if form == "positional" else f"ckpt_path={ckpt.name}"
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "mma-eval", given, "+model._target_=test_eval_lightning_checkpoint.TinyRGB", "data=image_folder",
        f"data.data_dir={folder}", "data.image_size=8", "data.num_workers=0", "dataset.num_classes=2", "norm=linf",
        "evaluation=fast", "evaluation.eps_grid=[0.1,0.2]", "evaluation.max_samples=4", "evaluation.nb_iter=2",
        "evaluation.margins=false", "evaluation.sanity=false", "evaluation.progress=false", "cache_dir=null",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eval_cli.main()
    assert (out / "results.json").is_file()
    hints = [str(w.message) for w in caught if "is a pytorch_lightning class" in str(w.message)]
    assert hints == []
