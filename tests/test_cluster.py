"""Beyond one machine: the submitit launcher configs (hydra/launcher=slurm, hydra/launcher=local) and the
multi-node trainer (trainer=multinode); a real two-job multirun through submitit's local executor on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

BIN = Path(sys.executable).parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
# experiment=quickstart made tiny: 100 training images, 2 steps, 2 PGD steps, no test pass.
TINY = ["experiment=quickstart", "data.train_subset=100", "data.val_size=50", "data.eval_batch_size=50",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "attack.nb_iter=2", "attack.eval_nb_iter=2",
        "method.search_steps=2", "method.eval_search_steps=2", "logger=csv", "test=false"]


def compose_hydra(*overrides: str):
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=unused", *overrides],
                       return_hydra_config=True)


def test_slurm_launcher_config_is_the_plugins_with_our_defaults() -> None:
    cfg = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.signal_delay_s) == ("gpu", 2, 1,
                                                                                                   120)


def test_local_launcher_config() -> None:
    launcher = compose_hydra("hydra/launcher=local").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher") and launcher.gpus_per_node == 0


def test_multinode_trainer_reads_the_node_count_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    trainer = OmegaConf.to_container(compose_hydra("trainer=multinode").trainer, resolve=True)
    assert (trainer["num_nodes"], trainer["strategy"], trainer["devices"]) == (1, "ddp", "auto")
    monkeypatch.setenv("SLURM_NNODES", "4")
    assert compose_hydra("trainer=multinode").trainer.num_nodes == 4
    assert compose_hydra("trainer=multinode", "trainer.num_nodes=2").trainer.num_nodes == 2


@pytest.mark.slow  # two training processes started by submitit: ~50 s on 2 cores
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_two_job_multirun_through_the_submitit_local_launcher(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([str(BIN / "mma-train"), "-m", "hydra/launcher=local", *TINY, "seed=0,1",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seeds = [yaml.safe_load((sweep / job / "config.yaml").read_text())["seed"] for job in ("0", "1")]
    assert seeds == [0, 1]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    # each job ran as its own submitit job: a folder of logs per job id, with the job's result pickle
    job_dirs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
    assert len(job_dirs) == 2 and all(list(d.glob("*_result.pkl")) for d in job_dirs)
