"""``mma-train``'s runs trained as one pack: the composed configs of several runs in, each run's own outputs out.

:func:`train_pack` is :func:`mma_lightning.cli.train.train` for N runs whose configs differ only in settings that
change no shape (:func:`pack_key`): it builds every run's datamodule and method as a separate run would (after
``seed_everything(seed)`` of that run), trains them as one :class:`~mma_lightning.packing.PackedModule`, and
leaves in every run's directory what a separate run leaves: ``config.yaml``, ``checkpoints/`` (the best by
``val/avg_eps`` and ``last.ckpt``, each loadable alone), the CSV / TensorBoard logs and the end-of-run summary.
The pack's own directory holds the pack's ``checkpoints/last.ckpt`` (resume the pack from it with
``ckpt_path=``). The Hydra launcher :mod:`mma_lightning.packing.launcher` groups a sweep's jobs and calls it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mma_lightning.cli.checkpoint import BestAndLastCheckpoint
from mma_lightning.cli.train import (
    check_model_fits_data,
    check_preset_norm,
    check_run_config,
    floats,
    instantiate_dict,
    limit_test_to_training,
    save_resolved_config,
    set_matmul_precision,
    summary_lines,
)
from mma_lightning.namespaces import lightning_types
from mma_lightning.packing.callbacks import RunCallback
from mma_lightning.packing.checkpoint import RunCheckpoint
from mma_lightning.packing.data import PackedDataModule
from mma_lightning.packing.logger import RunLogger
from mma_lightning.packing.module import PackedModule

log = logging.getLogger(__name__)

PACKABLE_KEYS = ("seed", "attack.max_eps", "attack.min_eps", "attack.eps", "method.max_eps", "method.min_eps",
                 "method.eps", "method.clean_loss_coeff", "optimizer.lr", "optimizer.weight_decay",
                 "method.optimizer.lr", "method.optimizer.weight_decay", "data.seed", "paths.output_dir",
                 "trainer.default_root_dir", "callbacks.model_checkpoint.dirpath", "tags", "hydra", "ckpt_path")
"""Config keys whose values may differ between the runs of a pack (each run's own: seed, radii, clean-loss
weight, learning rate, weight decay, and its directories); any other difference keeps runs apart."""
PACK_CALLBACKS = ("stop_on_signal",)
"""The callbacks of the runs' configs that act on the whole pack (taken from the first run's config)."""
REPLACED_CALLBACKS = ("model_checkpoint", "nonfinite")
"""The callbacks of a run's config that a pack does its own way: each run's checkpoints
(:class:`~mma_lightning.packing.RunCheckpoint`, from ``model_checkpoint``'s settings) and the non-finite guard (a
run that goes non-finite stops alone). Every other callback of a run's config watches that run alone
(:class:`~mma_lightning.packing.RunCallback`: margin plots, the learning-rate monitor, the robustness check)."""


def _comparable(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved and flattened (``a.b.c -> value``) without :data:`PACKABLE_KEYS`, its own directory
    written ``<output_dir>`` wherever a value holds it (a run's logs and checkpoints go to its own directory)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    output_dir = str(OmegaConf.select(cfg, "paths.output_dir", default="") or "")
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        key = prefix[:-1]
        if any(key == p or key.startswith(p + ".") for p in PACKABLE_KEYS):
            return
        if output_dir and isinstance(node, str) and output_dir in node:
            node = node.replace(output_dir, "<output_dir>")
        flat[key] = node

    walk(resolved, "")
    return flat


def pack_key(cfg: DictConfig) -> str:
    """What must be equal for runs to share a pack: the resolved config without :data:`PACKABLE_KEYS`."""
    return repr(sorted((k, repr(v)) for k, v in _comparable(cfg).items()))


def unpackable_reason(cfg: DictConfig) -> str | None:
    """Why a run cannot join a pack whatever its partners (``None``: it can)."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if trainer.get("num_nodes", 1) not in (1, None) or (devices not in (1, "1", None, "auto")):
        return "it trains on several devices (a pack trains on one)"
    if not cfg.get("train", True):
        return "train=false (nothing to train)"
    for name, node in (cfg.get("callbacks") or {}).items():
        if str((node or {}).get("_target_", "")).endswith("EarlyStopping"):
            return f"callbacks.{name} stops training early on the run's own metric (a pack's runs train to one end)"
    return None


def train_pack(cfgs: Sequence[DictConfig], pack_dir: Path, names: Sequence[str] | None = None
               ) -> list[dict[str, float]]:
    """Fit the runs ``cfgs`` (composed ``mma-train`` configs that agree on :func:`pack_key`) as one pack, then
    test each run's best checkpoint (``test=true``); returns each run's metrics as a separate run would."""
    if not cfgs:
        raise ValueError("cfgs must hold at least one run config, got none")
    flat = [_comparable(cfg) for cfg in cfgs]
    differing = sorted(k for k in set().union(*flat) if any(f.get(k) != flat[0].get(k) for f in flat))
    if differing:
        raise ValueError("the runs of a pack may differ only in " + ", ".join(PACKABLE_KEYS[:10]) +
                         f"; these runs also differ in {differing}")
    for cfg in cfgs:
        check_run_config(cfg)
        check_preset_norm(cfg)
        reason = unpackable_reason(cfg)
        if reason is not None:
            raise ValueError(f"this run cannot be packed: {reason}")
    names = list(names) if names is not None else [f"run{i}" for i in range(len(cfgs))]
    first = cfgs[0]
    runs, datamodules = [], []
    for cfg in cfgs:
        if cfg.get("seed") is not None:
            pl.seed_everything(cfg.seed, workers=True)
        datamodules.append(instantiate(cfg.data))
        runs.append(instantiate(cfg.method))
    check_model_fits_data(runs[0], datamodules[0])
    pack = PackedModule(runs, seeds=[cfg.get("seed") for cfg in cfgs], names=names)
    datamodule = PackedDataModule(datamodules)

    callbacks: list[Any] = [BestAndLastCheckpoint(dirpath=str(pack_dir / "checkpoints"), save_top_k=0,
                                                  save_last=True)]
    loggers: list[Any] = []
    progress_bars = lightning_types("callbacks.ProgressBar")
    for i, (cfg, name) in enumerate(zip(cfgs, names)):
        checkpoint = cfg.get("callbacks", {}).get("model_checkpoint")
        if checkpoint is not None:
            options = OmegaConf.to_container(checkpoint, resolve=True)
            assert isinstance(options, dict)
            options.pop("_target_", None)
            if options.get("monitor"):
                options["monitor"] = f"{name}/{options['monitor']}"
            if options.get("filename"):  # the metrics it names are the run's: {val/avg_eps} -> {run0/val/avg_eps}
                options["filename"] = re.sub(r"\{([^}:]*/[^}:]*)", "{" + name + r"/\1", str(options["filename"]))
            callbacks.append(RunCheckpoint(run=i, **{str(k): v for k, v in options.items()}))
        for logger in instantiate_dict(cfg.get("logger"), "logger"):
            loggers.append(RunLogger(logger, prefix=f"{name}/"))
        watching = _callbacks(cfg, lambda key: key not in PACK_CALLBACKS + REPLACED_CALLBACKS)
        callbacks += [RunCallback(c, run=i) for c in watching if not isinstance(c, progress_bars)]
    own = _callbacks(first, lambda key: key in PACK_CALLBACKS)
    own += [c for c in _callbacks(first, lambda key: key not in PACK_CALLBACKS + REPLACED_CALLBACKS)
            if isinstance(c, progress_bars)]  # a progress bar in the config shows the pack's progress
    trainer: pl.Trainer = instantiate(first.trainer, callbacks=callbacks + own, logger=loggers or False,
                                      default_root_dir=str(pack_dir))
    set_matmul_precision(first.get("float32_matmul_precision"), trainer)
    if trainer.is_global_zero:
        pack_dir.mkdir(parents=True, exist_ok=True)
        for cfg in cfgs:
            save_resolved_config(cfg, Path(cfg.paths.output_dir))
        for i, cfg in enumerate(cfgs):
            for logger in loggers:
                if logger.prefix == f"{names[i]}/":
                    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    resume = pack_dir / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(pack, datamodule=datamodule, ckpt_path=first.get("ckpt_path"))
    except lightning_types("utilities.exceptions.SIGTERMException"):  # type: ignore[misc]
        # A signal (callbacks.stop_on_signal): the pack's last.ckpt is written; no test of half-trained runs.
        log.warning(f"the pack stopped by a signal at step {trainer.global_step}; resume it with the same command "
                    f"and ckpt_path={resume}")
        return [_run_metrics(trainer.callback_metrics, name) for name in names]
    metrics = [_run_metrics(trainer.callback_metrics, name) for name in names]
    run_checkpoints = [c for c in trainer.callbacks if isinstance(c, RunCheckpoint)]  # type: ignore[attr-defined]
    summaries = [_summary(Path(cfg.paths.output_dir), run_checkpoints, i) for i, cfg in enumerate(cfgs)]
    if first.get("test", False):
        for i, run in enumerate(pack.runs):  # each run's best weights, as a separate run tests them
            best = next((c.best_model_path for c in run_checkpoints if c.run == i and c.best_model_path), None)
            if best:
                run.load_state_dict(torch.load(best, map_location=pack.device, weights_only=False)["state_dict"])
        limit_test_to_training(first.get("test_budget", "auto"), trainer, datamodules[0])
        trainer.test(pack, datamodule=datamodule)
        for i, name in enumerate(names):
            metrics[i].update(_run_metrics(trainer.callback_metrics, name))
    if trainer.is_global_zero:
        stopped = ", ".join(names[i] for i in sorted(pack.stopped)) or "none"
        log.info(f"pack of {len(cfgs)} runs finished (stopped after a non-finite loss: {stopped}); resume the "
                 f"pack with ckpt_path={resume}\n" + "\n".join(summaries))
    return metrics


def _callbacks(cfg: DictConfig, keep: Callable[[str], bool]) -> list[Any]:
    """The callbacks of ``cfg.callbacks`` whose key ``keep`` accepts, instantiated in order."""
    node = cfg.get("callbacks") or {}
    return instantiate_dict(OmegaConf.create({k: v for k, v in node.items() if keep(str(k))}), "callbacks")


def _run_metrics(metrics: dict[str, Any], name: str) -> dict[str, float]:
    """Run ``name``'s metrics, without its prefix."""
    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in floats(metrics).items() if k.startswith(prefix)}


def _summary(run_dir: Path, checkpoints: Sequence[RunCheckpoint], i: int) -> str:
    """Run ``i``'s end-of-run summary, as a separate run's (:func:`mma_lightning.cli.train.summary_lines`)."""
    own = next((c for c in checkpoints if c.run == i), None)
    return summary_lines(run_dir, (own.best_model_path or None) if own else None,
                         (own.last_model_path or None) if own else None)
