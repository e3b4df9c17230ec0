"""``MMAModule`` and the datamodules under Lightning's ``LightningCLI``, configured from one YAML file, with each
namespace's CLI (``pytorch_lightning.cli`` / ``lightning.pytorch.cli``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

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
