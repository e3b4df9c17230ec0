"""``hydra/launcher=packed``: a multirun's ``mma-train`` jobs trained in packs, several runs per process.

A Hydra launcher receives every job of a sweep at once (``launch(job_overrides, initial_job_idx)``), so it can
group them: jobs whose composed configs agree on everything but the settings that change no shape
(:func:`mma_lightning.packing.train.pack_key`: seed, radii, clean-loss weight, learning rate, weight decay) are
trained ``pack_size`` at a time by :func:`mma_lightning.packing.train.train_pack`. Each job still gets its own
directory, set up by Hydra's ``run_job`` as with the basic launcher (``.hydra/``, the job's log), and the outputs
of a separate run. Jobs that cannot be packed (another architecture or norm, several devices, no partner) run one
after another as the basic launcher runs them. The log says which jobs were packed.

This module lives in the ``hydra_plugins`` namespace package, where Hydra looks for plugins; it imports only
Hydra when Hydra scans it, and the training code when it launches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

TRAIN_MODULE = "mma_lightning.cli.train"


def _resolved(cfg: DictConfig) -> DictConfig:
    """A job's config with every interpolation resolved while Hydra's job context is set (its output dir)."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


class PackedLauncher(Launcher):
    """Runs a sweep's packable ``mma-train`` jobs ``pack_size`` at a time in one process, the others alone.

    Args:
        pack_size: the most runs trained together (>= 1; 1 runs every job alone).
    """

    def __init__(self, pack_size: int = 4) -> None:
        if isinstance(pack_size, bool) or not isinstance(pack_size, int) or pack_size < 1:
            raise ValueError(f"hydra.launcher.pack_size must be an integer >= 1, got {pack_size!r}")
        self.pack_size = pack_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep what ``launch`` needs (as Hydra's basic launcher)."""
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _run(self, task: Callable[[Any], Any], config: DictConfig) -> JobReturn:
        assert self.hydra_context is not None
        return run_job(hydra_context=self.hydra_context, task_function=task, config=config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Compose every job, group the packable ones, train each group as packs, the rest one by one."""
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs: list[tuple[int, Sequence[str], DictConfig]] = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            jobs.append((idx, overrides, sweep_config))

        packs, alone = self._group(jobs)
        log.info(f"Launching {len(jobs)} jobs: {len(packs)} pack(s) of up to {self.pack_size} runs, "
                 f"{len(alone)} alone")
        for pack in packs:
            log.info(f"\tpacked #{', #'.join(str(idx) for idx, _, _ in pack)} : "
                     + " | ".join(" ".join(filter_overrides(overrides)) for _, overrides, _ in pack))
        results: dict[int, JobReturn] = {}
        for idx, overrides, config in alone:
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            results[idx] = self._run(self.task_function, config)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for pack in packs:
            for idx, ret in zip((idx for idx, _, _ in pack), self._launch_pack(pack, sweep_dir)):
                results[idx] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [results[idx] for idx, _, _ in jobs]

    def _group(self, jobs: list[tuple[int, Sequence[str], DictConfig]]
               ) -> tuple[list[list[tuple[int, Sequence[str], DictConfig]]], list[tuple[int, Sequence[str], DictConfig]]]:
        """Packs of up to ``pack_size`` jobs with equal pack keys; the jobs left alone (with the reason logged)."""
        if getattr(self.task_function, "__module__", None) != TRAIN_MODULE:
            log.warning(f"hydra/launcher=packed packs mma-train's runs only; this app's {len(jobs)} jobs run one "
                        "after another")
            return [], list(jobs)
        from mma_lightning.packing.train import pack_key, unpackable_reason

        groups: dict[str, list[tuple[int, Sequence[str], DictConfig]]] = {}
        alone = []
        for job in jobs:
            HydraConfig.instance().set_config(job[2])  # its ${hydra:...} values resolve (run_job sets it again)
            task_config = job[2].copy()
            with open_dict(task_config):
                del task_config["hydra"]  # the job's own settings, not Hydra's
            reason = unpackable_reason(task_config)
            if reason is not None:
                log.info(f"\t#{job[0]} runs alone: {reason}")
                alone.append(job)
                continue
            groups.setdefault(pack_key(task_config), []).append(job)
        packs = []
        for group in groups.values():
            for start in range(0, len(group), self.pack_size):
                chunk = group[start:start + self.pack_size]
                if len(chunk) == 1:
                    log.info(f"\t#{chunk[0][0]} runs alone: no other job of the sweep shares its shapes")
                    alone.append(chunk[0])
                else:
                    packs.append(chunk)
        alone.sort(key=lambda job: job[0])
        return packs, alone

    def _launch_pack(self, pack: list[tuple[int, Sequence[str], DictConfig]], sweep_dir: Path) -> list[JobReturn]:
        """Set up every job of ``pack`` as Hydra does (its directory, ``.hydra/``, its resolved config), then
        train them together; each job's return is its ``optimized_metric`` as ``mma-train``'s would be."""
        from mma_lightning.cli.errors import run_reporting_errors
        from mma_lightning.cli.train import metric_value
        from mma_lightning.packing.train import train_pack

        prepared = [self._run(_resolved, config) for _, _, config in pack]
        failed = [ret for ret in prepared if ret.status != JobStatus.COMPLETED]
        if failed:
            return prepared
        cfgs = [ret.return_value for ret in prepared]
        pack_dir = sweep_dir / ("pack-" + "-".join(str(idx) for idx, _, _ in pack))
        try:
            metrics = run_reporting_errors(lambda: train_pack(cfgs, pack_dir), remove_run_dir=False)
            values = [metric_value(m, cfg.get("optimized_metric")) for m, cfg in zip(metrics, cfgs)]
            status = JobStatus.COMPLETED
        except Exception as err:  # noqa: BLE001 - every job of the pack fails with it, as a job failure in Hydra
            values, status = [err] * len(pack), JobStatus.FAILED
        return [JobReturn(overrides=ret.overrides, cfg=ret.cfg, hydra_cfg=ret.hydra_cfg, working_dir=ret.working_dir,
                          task_name=ret.task_name, status=status, _return_value=value)
                for ret, value in zip(prepared, values)]
