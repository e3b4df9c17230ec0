"""``mma-train``: compose a run with Hydra (``conf/train.yaml``), build its objects from ``_target_``, fit.

After lightning-hydra-template (ashleve): :func:`train` does the work on a composed config and returns the
metrics (a sweeper optimises ``cfg.optimized_metric``); :func:`main` is the Hydra entry point behind the
console script. The run directory (Hydra's) receives the resolved config (``config.yaml``), the checkpoints
(``checkpoints/last.ckpt`` and the best by ``val/avg_eps``, the MMA reference's model selection) and the
CSV / TensorBoard logs.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mma_lightning.cli.errors import run_reporting_errors
from mma_lightning.evaluation import atomic
from mma_lightning.namespaces import check_trainer_namespace, lightning_types

log = logging.getLogger(__name__)

CONFIG_PATH = "pkg://mma_lightning.conf"
RESOLVED_CONFIG = "config.yaml"
PACKED_LAUNCHER = "hydra_plugins.mma_lightning_packed.packed_launcher.PackedLauncher"
"""The class of ``hydra/launcher=packed`` (``conf/hydra/launcher/packed.yaml``'s ``_target_``)."""


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.method`` on ``cfg.data`` with ``cfg.trainer``, then (``cfg.test``) test the best checkpoint
    (with ``train=false``: the ``ckpt_path`` checkpoint).

    Resumes from ``cfg.ckpt_path`` when given (Lightning restores weights, optimiser, LR schedule, step count
    and the MMA eps table, a buffer of the module). Returns the last logged metrics of fit and test as floats.
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file to resume from "
                                "(e.g. <run>/checkpoints/last.ckpt)")
    check_run_config(cfg)
    check_preset_norm(cfg)
    if ckpt_path is not None and cfg.get("train", True):
        check_resume_has_steps_left(ckpt_path, cfg.get("trainer") or {})
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.method)
    if not isinstance(module, lightning_types("LightningModule")):
        raise ValueError(f"method must build a LightningModule (method=mma, omma, pgd_at, pgdls, trades or "
                         f"standard), got {type(module).__name__}")
    check_model_fits_data(module, datamodule)
    check_trainer_target(cfg.trainer, module, datamodule)
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True) and not any(
            isinstance(c, lightning_types("callbacks.ProgressBar")) for c in callbacks):
        callbacks.append(default_progress_bar())
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launcher_fits_hydra_mode(trainer)
    check_optimized_metric(cfg.get("optimized_metric"), module, trainer, test=bool(cfg.get("test", False)))
    set_matmul_precision(cfg.get("float32_matmul_precision"), trainer)

    if trainer.is_global_zero:
        save_resolved_config(cfg, Path(cfg.paths.output_dir))
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]

    metrics: dict[str, float] = {}
    summary = None
    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except lightning_types("utilities.exceptions.SIGTERMException"):  # type: ignore[misc]
            # A signal (callbacks.StopOnSignal): last.ckpt is written; no test of a half-trained model.
            log.warning(f"training stopped by a signal at step {trainer.global_step}; resume with "
                        f"ckpt_path={last_checkpoint(trainer) or '<run>/checkpoints/last.ckpt'}")
            return floats(trainer.callback_metrics)
        metrics.update(floats(trainer.callback_metrics))
        summary = run_summary(Path(cfg.paths.output_dir), trainer)  # before test() restores callback states
    if cfg.get("test", False):
        # The best checkpoint of this fit; with train=false, the checkpoint given as ckpt_path.
        weights = best_checkpoint(trainer) if cfg.get("train", True) else ckpt_path
        if weights is None:
            log.warning("no best checkpoint (no validation ran, or no checkpoint callback): testing the "
                        "current weights")
        if cfg.get("train", True):
            limit_test_to_training(cfg.get("test_budget", "auto"), trainer, datamodule)
        trainer.test(module, datamodule=datamodule, ckpt_path=weights)
        metrics.update(floats(trainer.callback_metrics))
    if trainer.is_global_zero and summary is not None:
        log.info(summary)
    return metrics


TEST_BUDGETS = ("auto", None)
MATMUL_PRECISIONS = ("highest", "high", "medium", None)


def set_matmul_precision(precision: str | None, trainer: pl.Trainer) -> None:
    """``torch.set_float32_matmul_precision(precision)`` when the trainer runs on CUDA (``"high"``: TF32
    matmuls, which Lightning recommends on recent GPUs); ``None`` leaves torch's default."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"float32_matmul_precision must be one of {list(MATMUL_PRECISIONS)} (null: torch's "
                         f"default), got {precision!r}")
    if precision is not None and trainer.strategy.root_device.type == "cuda":
        torch.set_float32_matmul_precision(precision)


def check_preset_norm(cfg: DictConfig) -> None:
    """A preset whose eps values are radii of one threat model (its ``preset_norm``, e.g. the paper's
    ``mnist_linf_mma045``) refuses another ``norm=``, which would mix its radii with the other norm's
    defaults (``attack/<data>_<norm>.yaml``). Presets without ``preset_norm`` compose with any norm."""
    preset_norm, norm = cfg.get("preset_norm"), cfg.norm.name
    if preset_norm is None or preset_norm == norm:
        return
    choices = _choices()
    experiment, data = choices.get("experiment", "<this preset>"), choices.get("data", "<data>")
    raise ValueError(f"experiment={experiment} is a {preset_norm} preset (its eps values are {preset_norm} "
                     f"radii) and cannot run with norm={norm}: choose a {norm} preset "
                     f"(experiment={data}_{norm}_...), or drop norm={norm}")


def limit_test_to_training(budget: str | None, trainer: pl.Trainer, datamodule: Any) -> None:
    """``test_budget=auto`` on a CPU: test at most as many images as training saw (``global_step`` x the
    global batch size), so a short run does not spend many times its training time in the test pass (each
    test image costs a PGD attack and a margin search, about a training sample's cost). Only when
    ``trainer.limit_test_batches`` is left at 1.0 (the float: all batches; an int is a batch count the user
    chose, kept and stated in the log); ``test_budget=null`` always tests the whole split."""
    if budget not in TEST_BUDGETS:
        raise ValueError(f"test_budget must be one of {list(TEST_BUDGETS)} (null: the whole test split), "
                         f"got {budget!r}")
    batch_size = getattr(datamodule, "batch_size", None)
    eval_batch_size = getattr(datamodule, "eval_batch_size", None)
    test_set = getattr(datamodule, "test_set", None)
    # Lightning reads an int as a number of batches (1: one batch) and a float as a fraction (1.0: all).
    limit = trainer.limit_test_batches
    left_at_all = isinstance(limit, float) and limit == 1.0
    if isinstance(limit, int) and not isinstance(limit, bool) and eval_batch_size and test_set is not None:
        # A batch count chosen by the user or a preset (quickstart's 4) is kept, and said.
        log.info(f"testing on the first ~{min(limit * eval_batch_size, len(test_set))} of {len(test_set)} test "
                 f"images (trainer.limit_test_batches={limit} batches of {eval_batch_size}); "
                 "trainer.limit_test_batches=1.0 test_budget=null tests all of them")
        return
    if (budget is None or not left_at_all or batch_size is None or eval_batch_size is None
            or test_set is None
            or not isinstance(trainer.accelerator, lightning_types("accelerators.CPUAccelerator"))):
        return
    seen = max(1, trainer.global_step) * batch_size
    if seen >= len(test_set):
        return
    batches = math.ceil(seen / eval_batch_size)
    trainer.limit_test_batches = batches
    log.warning(f"test_budget=auto: testing on the first ~{min(batches * eval_batch_size, len(test_set))} of "
                f"{len(test_set)} test images, as many as training saw ({trainer.global_step} steps x batch "
                f"{batch_size}) on this CPU; test_budget=null tests all of them")


def run_summary(run_dir: Path, trainer: pl.Trainer) -> str:
    """What a run leaves behind: its directory, best and last checkpoint, and how to evaluate it."""
    return "run finished\n" + summary_lines(run_dir, best_checkpoint(trainer), last_checkpoint(trainer))


def summary_lines(run_dir: Path, best: str | None, last: str | None) -> str:
    """A run's directory, best and last checkpoint and the ``mma-eval`` commands for it (a packed run's too)."""
    target = best or last
    lines = [f"run directory:   {run_dir}  (config.yaml, logs)",
             f"best checkpoint: {best or '-'}", f"last checkpoint: {last or '-'}"]
    if target is not None:
        lines += [f"evaluate it:     mma-eval ckpt_path={target}",
                  f"  quick check:   mma-eval ckpt_path={target} evaluation=fast"]
    return "\n".join(lines)


# Trainer settings mma-train's presets set, with the integers Lightning would only reject mid-setup.
TRAINER_INTS = {"max_steps": -1, "max_epochs": -1, "log_every_n_steps": 1, "accumulate_grad_batches": 1,
                "num_sanity_val_steps": -1, "check_val_every_n_epoch": 1}


def default_progress_bar() -> pl.Callback:
    """Lightning's default bar (rich when installed, else tqdm) in its resume-aware form
    (:mod:`mma_lightning.callbacks.progress`)."""
    from mma_lightning.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401
    except ImportError:
        return TQDMProgressBar()
    return RichProgressBar()


def check_resume_has_steps_left(ckpt_path: str | Path, trainer: Any) -> None:
    """``ValueError`` when resuming ``ckpt_path`` would train nothing: its run already reached
    ``trainer.max_steps`` (or ``trainer.max_epochs``). Says how to extend it or evaluate it instead."""
    saved = torch.load(Path(ckpt_path).expanduser(), map_location="cpu", weights_only=False, mmap=True)
    step = int(saved.get("global_step", 0))
    epochs = (saved.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
              .get("completed"))
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if max_steps is not None and 0 <= max_steps <= step:
        reached = f"it trained {step} steps and trainer.max_steps={max_steps}"
        extend = f"raise trainer.max_steps (e.g. trainer.max_steps={2 * max(step, 1)})"
    elif max_epochs is not None and epochs is not None and 0 <= max_epochs <= epochs:
        reached = f"it trained {epochs} epochs and trainer.max_epochs={max_epochs}"
        extend = f"raise trainer.max_epochs (e.g. trainer.max_epochs={2 * max(epochs, 1)})"
    else:
        return
    raise ValueError(f"ckpt_path={str(ckpt_path)!r} is the end of a finished run ({reached}): resuming it would "
                     f"train nothing. To train it longer, {extend}; to evaluate it, mma-eval "
                     f"ckpt_path={ckpt_path}")


def check_whole_checkpoint(path: str | Path, key: str, hint: str) -> None:
    """``ValueError`` naming ``key`` unless ``path`` is a whole ``torch.save`` file (its zip format): a truncated
    or foreign file is refused in one line before any work, not by a pickle traceback mid-run."""
    if not zipfile.is_zipfile(Path(path).expanduser()):
        raise ValueError(f"{key}={str(path)!r} is not a whole checkpoint (torch.save's zip format); a truncated "
                         f"or foreign file? {hint}")


def check_run_config(cfg: DictConfig) -> None:
    """Refuse, naming the key, values of the run's own keys that would fail late or be misread: ``seed``
    (int or null), ``train`` / ``test`` (booleans), ``ckpt_path`` (a whole checkpoint file), and the
    ``trainer`` integers of :data:`TRAINER_INTS`."""
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or null, got {seed!r}")
    for key in ("train", "test"):
        if not isinstance(cfg.get(key, True), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        check_whole_checkpoint(ckpt_path, "ckpt_path", "resume from <run>/checkpoints/last.ckpt")
    trainer = cfg.get("trainer") or {}
    for key, minimum in TRAINER_INTS.items():
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"trainer.{key} must be an integer >= {minimum}"
                             f"{' (-1: no limit)' if minimum == -1 else ''}, got {value!r}")


def check_trainer_target(trainer_cfg: DictConfig, *parts: Any) -> None:
    """A ``trainer._target_`` of the other Lightning namespace than the method's and the data's: the message
    naming the package to use (:func:`~mma_lightning.namespaces.check_trainer_namespace`), before the Trainer
    is built (the other namespace's Trainer would first refuse the checkpoint plugin, in its own words)."""
    try:
        trainer_class = get_class(str(trainer_cfg.get("_target_")))
    except (ImportError, ValueError):  # a target that does not resolve: instantiate's own error says so
        return
    for part in parts:
        check_trainer_namespace(part, trainer_class)


def instantiate_dict(node: DictConfig | None, name: str) -> list[Any]:
    """The objects of a ``name -> {_target_: ...}`` group node (``callbacks``, ``logger``), in order."""
    if node is None:
        return []
    if not isinstance(node, DictConfig):
        raise ValueError(f"{name} must be a mapping name -> {{_target_: ...}}, got {type(node).__name__}")
    objects = []
    for key, conf in node.items():
        if not (isinstance(conf, DictConfig) and "_target_" in conf):
            raise ValueError(f"{name}.{key!s} must be a config with a _target_, got {conf!r}")
        objects.append(instantiate(conf))
    return objects


def check_model_fits_data(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Forward two blank images of the data's shape: a clear error now, not a shape error mid-training."""
    shape = getattr(datamodule, "image_shape", None)
    num_classes = getattr(datamodule, "num_classes", None)
    net = getattr(module, "net", None)
    if shape is None or not isinstance(net, nn.Module):
        return
    choices = _choices()
    model_name = choices.get("model", type(net).__name__)
    data_name = choices.get("data", type(datamodule).__name__)
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            logits = net(torch.zeros(2, *shape))
    except RuntimeError as err:
        raise ValueError(f"model={model_name} does not accept data={data_name} images of shape "
                         f"{tuple(shape)} ({err}); choose a model for these images (e.g. model=lenet5_madry "
                         f"for 1x28x28, model=wrn28_4 for 3x32x32) or a preset (experiment=...)") from None
    finally:
        for m, training in modes.items():
            m.train(training)
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"model={model_name} outputs {logits.shape[-1]} logits but data={data_name} has "
                         f"{num_classes} classes: set dataset.num_classes={num_classes}")


def check_launcher_fits_hydra_mode(trainer: pl.Trainer) -> None:
    """Strategy ``ddp`` re-launches the script with its command line, which inside a Hydra multirun would
    start the whole sweep again per device (docs/lightning-notes.md, item 8): refuse it there, ``ddp_spawn`` works."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    subprocess_launcher = lightning_types("strategies.launchers._SubprocessScriptLauncher")
    if isinstance(trainer.strategy.launcher, subprocess_launcher):
        raise ValueError("trainer.strategy=ddp re-launches mma-train once per device, which a Hydra "
                         "multirun (-m, hparams_search) does not support: use trainer.strategy=ddp_spawn in "
                         "a multirun")


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write ``cfg`` with every interpolation resolved to ``<run_dir>/config.yaml`` (atomically); ``mma-eval``
    rebuilds the run's data, model and method from it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_CONFIG
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    write_atomically(path, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`mma_lightning.evaluation.atomic.write_atomically`)."""
    atomic.write_atomically(path, text.encode())


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """Path of the latest checkpoint written by the run (``StopOnSignal``'s or ``last.ckpt``), if any."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if getattr(callback, "saved_path", None):
            return callback.saved_path
    callback = trainer.checkpoint_callback
    return getattr(callback, "last_model_path", "") or None


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """Path of the best checkpoint of the trainer's ``ModelCheckpoint`` (``None`` if there is none yet)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Logged metrics (tensors) as plain floats."""
    return {key: float(value) for key, value in metrics.items()}


def check_optimized_metric(name: str | None, module: Any, trainer: Any, test: bool) -> None:
    """Before training (a sweep's first trial, not after it): ``optimized_metric`` names a metric this run
    will log: a ``val/`` or ``test/`` metric of the method, from a run that validates at least once
    (``trainer.limit_val_batches`` > 0, ``val_check_interval`` steps within ``max_steps``) or tests."""
    if not name:
        return
    stage, _, metric = str(name).partition("/")
    logged = getattr(module, "eval_metrics", {})
    if stage in ("val", "test") and stage in logged and metric not in logged[stage]:
        raise ValueError(f"optimized_metric={name!r} is not a metric of the method: it logs "
                         f"{sorted(f'{stage}/{m}' for m in logged[stage])}")
    if stage == "test" and not test:
        raise ValueError(f"optimized_metric={name!r} is a test metric but test=false: set test=true or choose a "
                         "val/ metric")
    if stage != "val":
        return
    if trainer.limit_val_batches == 0:
        raise ValueError(f"optimized_metric={name!r} needs a validation but trainer.limit_val_batches=0")
    interval, max_steps = trainer.val_check_interval, trainer.max_steps
    if (trainer.check_val_every_n_epoch is None and isinstance(interval, int) and max_steps is not None
            and 0 <= max_steps < interval):
        raise ValueError(f"optimized_metric={name!r} is never logged: the run validates every {interval} steps "
                         f"(trainer.val_check_interval) but trains {max_steps} (trainer.max_steps); set "
                         f"trainer.val_check_interval={max_steps} or fewer")


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """``metrics[name]`` for a sweeper (``None`` when no metric is asked for); a clear error if absent."""
    if not name:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)} "
                         "(does the run validate at least once? see trainer.val_check_interval)")
    return metrics[name]


def _choices() -> dict[str, str]:
    """Hydra's group choices of this run (``{}`` outside a Hydra app)."""
    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def register_packed_launcher() -> None:
    """Register ``hydra/launcher=packed``'s class with Hydra's plugin registry. Hydra finds plugins by scanning
    the ``hydra_plugins`` namespace package, which setuptools' editable install (``pip install -e .``) hides from
    that scan (``RuntimeError: Unknown plugin class``); registering the class works with every install."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(get_class(PACKED_LAUNCHER))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's command line: :func:`train`, then ``cfg.optimized_metric``."""
    return run_reporting_errors(lambda: metric_value(train(cfg), cfg.get("optimized_metric")))


def main() -> float | None:
    """Entry point of ``mma-train``: :func:`register_packed_launcher`, then Hydra's command line
    (:func:`hydra_main`)."""
    register_packed_launcher()
    return hydra_main()


if __name__ == "__main__":
    main()
