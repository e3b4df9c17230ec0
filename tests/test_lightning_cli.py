"""``MMAModule`` and the datamodules under Lightning's ``LightningCLI``, configured from one YAML file, with each
namespace's CLI (``pytorch_lightning.cli`` / ``lightning.pytorch.cli``); an ``(x, y)`` datamodule wrapped from the
command line or with ``with_index(MyDataModule)``, the logged hyperparameters, reload and predict."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("jsonargparse")

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMESPACES = {"pytorch_lightning": ("pytorch_lightning.cli", "mma_lightning", "mma_lightning.data"),
              "lightning": ("lightning.pytorch.cli", "mma_lightning.lightning", "mma_lightning.lightning.data")}

# What a user writes: the typed __init__ arguments, the backbone and the optimiser factory by class_path.
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  limit_val_batches: 1
  val_check_interval: 2
  num_sanity_val_steps: 0
  inference_mode: false
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  net:
    class_path: mma_lightning.models.LeNet5Madry
  norm: linf
  max_eps: 0.2
  min_eps: 0.02
  nb_iter: 2
  search_steps: 2
  eval_eps: 0.1
  eval_nb_iter: 2
  eval_search_steps: 2
  optimizer:
    class_path: torch.optim.Adam
    init_args:
      lr: 0.001
data:
  data_dir: {data_dir}
  download: false
  val_size: 50
  batch_size: 25
  train_subset: 100
  num_workers: 0
"""


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_mma_module_and_datamodule_fit_under_lightning_cli(namespace: str, tmp_path: Path) -> None:
    if namespace == "lightning":
        pytest.importorskip("lightning")
    cli_module, package, data = (importlib.import_module(name) for name in NAMESPACES[namespace])
    config = tmp_path / "mma.yaml"
    config.write_text(CONFIG.format(data_dir=FASHION))
    cli = cli_module.LightningCLI(package.MMAModule, data.FashionMNISTDataModule,
                                  args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
                                  save_config_kwargs={"overwrite": True})
    module = cli.model
    assert type(module) is package.MMAModule and cli.trainer.global_step == 2
    assert module.hparams.max_eps == 0.2 and module.norm == "linf"
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)
    assert len(module.eps_store) == 100  # the eps table, sized from the datamodule's training split
    # every setting is an hparam (LightningCLI passes only the parsed arguments; the skeleton adds its defaults)
    assert module.hparams.clip_min == 0.0 and module.hparams.scheduler_interval == "step"
    assert "val/avg_eps" in cli.trainer.callback_metrics


# An (x, y) project under LightningCLI (Lightning's backbone_image_classifier example, in small): its datamodule
# wrapped by WithIndexDataModule from the command line or by with_index(MyDataModule) in Python.
class Backbone(nn.Module):
    """The example's MLP, on 4x4 images."""

    def __init__(self, hidden_dim: int = 8) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, hidden_dim), nn.Linear(hidden_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x.view(x.size(0), -1))))


class PairsLogic:
    """An (x, y) datamodule with its own batch size: 40 training, 16 validation / test / predict images."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.arange(56) % 3
        x = (0.3 * y.view(-1, 1, 1, 1) + 0.2 * torch.rand(56, 1, 4, 4, generator=g)).clamp(0, 1)
        self.train, self.test = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)

    test_dataloader = predict_dataloader = val_dataloader


class Pairs(PairsLogic, pl.LightningDataModule):
    """:class:`PairsLogic` on pytorch_lightning."""


if importlib.util.find_spec("lightning") is not None:
    import lightning.pytorch as L

    class LightningPairs(PairsLogic, L.LightningDataModule):
        """:class:`PairsLogic` on lightning.pytorch."""

PAIRS = {"pytorch_lightning": "Pairs", "lightning": "LightningPairs"}
TINY = ["--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--model.net={__name__}.Backbone", "--model.max_eps=0.2", "--model.nb_iter=1", "--model.search_steps=2",
        "--model.eval_eps=0.1", "--model.eval_nb_iter=1", "--model.eval_search_steps=2"]


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_lightning_cli_wraps_an_xy_datamodule_given_by_class_path(namespace: str, tmp_path: Path) -> None:
    """``--data=<package>.data.WithIndexDataModule --data.datamodule=<class path>``: the inner datamodule is
    built from its class path and its own arguments, then fit, test and predict run."""
    if namespace == "lightning":
        pytest.importorskip("lightning")
    cli_module, package, data = (importlib.import_module(name) for name in NAMESPACES[namespace])
    cli = cli_module.LightningCLI(
        package.MMAModule, args=["fit", *TINY, f"--data={data.__name__}.WithIndexDataModule",
                                 f"--data.datamodule={__name__}.{PAIRS[namespace]}",
                                 "--data.datamodule.init_args.batch_size=8", f"--trainer.default_root_dir={tmp_path}"],
        save_config_kwargs={"overwrite": True})
    inner = cli.datamodule.datamodule
    assert type(cli.datamodule) is data.WithIndexDataModule and type(inner).__name__ == PAIRS[namespace]
    assert inner.batch_size == 8 and cli.trainer.global_step == 2 and len(cli.model.eps_store) == 40
    assert cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"] >= 0
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert [tuple(p.shape) for p in predictions] == [(8, 3), (8, 3)]  # logits of x, from (x, y) batches


def test_with_index_of_a_datamodule_class_for_lightning_cli(tmp_path: Path) -> None:
    """``LightningCLI(MMAModule, with_index(MyDataModule))``: ``--data.<argument>`` are MyDataModule's; the logged
    hyperparameters are the checkpoint's; ``load_from_checkpoint`` asks for the backbone by name."""
    pytest.importorskip("lightning")
    from lightning.pytorch.cli import LightningCLI

    from mma_lightning.lightning import MMAModule
    from mma_lightning.lightning.data import WithIndexDataModule, with_index

    indexed = with_index(LightningPairs)
    assert issubclass(indexed, WithIndexDataModule) and with_index(indexed) is indexed
    cli = LightningCLI(MMAModule, indexed, args=["fit", *TINY, "--data.batch_size=5",
                                                 f"--trainer.default_root_dir={tmp_path}"],
                       save_config_kwargs={"overwrite": True})
    assert type(cli.datamodule.datamodule) is LightningPairs and cli.datamodule.datamodule.batch_size == 5
    (ckpt,) = Path(cli.trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    logged = yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())
    assert logged == dict(saved) and logged["eval_eps"] == 0.1 and logged["clip_min"] == 0.0
    with pytest.raises(ValueError, match=r"MMAModule.load_from_checkpoint needs the backbone: pass "
                                         r"net=<your backbone>"):
        MMAModule.load_from_checkpoint(ckpt)
    loaded = MMAModule.load_from_checkpoint(ckpt, net=Backbone())
    x = torch.rand(4, 1, 4, 4)
    assert torch.equal(loaded.predict_step((x, torch.zeros(4)), 0), cli.model.net(x))
    assert torch.equal(loaded.predict_step(x, 0), loaded.predict_step([x], 0))
    with pytest.raises(ValueError, match=r"predict batches must be x, \(x,\), \(x, y\) or \(x, y, index\) with x "
                                         r"a tensor, got dict"):
        loaded.predict_step({"x": x}, 0)
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    assert set(test[0]) == {"test/acc", "test/robust_acc", "test/avg_eps", "test/loss"}
