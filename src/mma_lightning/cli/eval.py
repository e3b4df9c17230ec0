"""``mma-eval``: evaluate a checkpoint of an ``mma-train`` run on the test split (``conf/eval.yaml``).

The run's data, model and method are rebuilt from the resolved config ``mma-train`` saved in the run directory
(``<run>/config.yaml``, found from ``ckpt_path``), with the changes given as ``+data.<key>=...`` /
``+method.<key>=...``; the checkpoint is loaded by ``trainer.test``, which runs the method's ``test_step``:
clean accuracy, PGD robust accuracy at ``eval_eps`` and the average margin estimate (the MMA reference's
evaluation, Ding et al., ICLR 2020). The metrics are printed and written to ``<eval run>/metrics.json``.

:func:`evaluate` is a short sequence of steps (:func:`load_run_config`, :func:`build_run`,
:func:`run_test_split`, :func:`write_report`), so that further evaluations (per-eps tables, plots) can be
added as steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mma_lightning.cli.errors import run_reporting_errors
from mma_lightning.cli.train import CONFIG_PATH, RESOLVED_CONFIG, floats, write_atomically

log = logging.getLogger(__name__)

REPORT_FILE = "metrics.json"
EVAL_KEYS = ("norm", "eval_eps", "eval_nb_iter", "eval_step_scale", "eval_max_eps", "eval_search_steps")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test ``cfg.ckpt_path`` with the data and method of its training run; returns the ``test/...``
    metrics."""
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(cfg.ckpt_path)!r}: no such checkpoint file (expected e.g. "
                                "<run>/checkpoints/last.ckpt of an mma-train run)")
    run_cfg = load_run_config(ckpt_path, cfg.get("run_config"))
    run_cfg = OmegaConf.merge(run_cfg, {"data": cfg.get("data") or {}, "method": cfg.get("method") or {}})
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_run(run_cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    metrics = run_test_split(trainer, module, datamodule, ckpt_path)
    if trainer.is_global_zero:
        settings = {key: run_cfg.method.get(key) for key in EVAL_KEYS}
        write_report(Path(cfg.paths.output_dir) / REPORT_FILE, ckpt_path, metrics, settings)
    return metrics


def load_run_config(ckpt_path: Path, run_config: str | None = None) -> DictConfig:
    """The resolved config of the run that wrote ``ckpt_path``: ``run_config`` if given, else ``config.yaml``
    next to the checkpoint or one folder up (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
    if run_config is not None:
        candidates = [Path(run_config).expanduser()]
    else:
        candidates = [ckpt_path.parent / RESOLVED_CONFIG, ckpt_path.parent.parent / RESOLVED_CONFIG]
    for path in candidates:
        if path.is_file():
            cfg = OmegaConf.load(path)
            missing = [key for key in ("data", "method") if key not in cfg]
            if missing:
                raise ValueError(f"run config {path} has no {' / '.join(missing)} node: is it the "
                                 "config.yaml of an mma-train run?")
            return cfg  # type: ignore[return-value]
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no training config for ckpt_path={str(ckpt_path)!r}: looked for {looked}; "
                            f"pass run_config=<run>/{RESOLVED_CONFIG}")


def build_run(run_cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The datamodule and the method (with its backbone) described by a run's config."""
    datamodule = instantiate(run_cfg.data)
    module = instantiate(run_cfg.method)
    return datamodule, module


def run_test_split(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                 ckpt_path: Path) -> dict[str, float]:
    """Load ``ckpt_path`` into ``module`` and run the test split: the ``test/...`` metrics as floats."""
    trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt_path))
    return floats(trainer.callback_metrics)


def write_report(path: Path, ckpt_path: Path, metrics: dict[str, float], settings: dict[str, Any]) -> None:
    """Write the metrics, the checkpoint and the attack settings to a JSON file (atomically) and log them."""
    report = {"ckpt_path": str(ckpt_path.resolve()), "attack": settings, "metrics": metrics}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(report, indent=2) + "\n")
    for name, value in metrics.items():
        log.info("%s = %.4f", name, value)
    log.info("metrics written to %s", path)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    """Entry point of ``mma-eval`` (Hydra's command line): :func:`evaluate`."""
    run_reporting_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
