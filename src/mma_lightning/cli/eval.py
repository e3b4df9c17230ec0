"""``mma-eval``: evaluate one or several checkpoints of ``mma-train`` runs on the test split
(``conf/eval.yaml``).

Each run's data, model and method are rebuilt from the resolved config ``mma-train`` saved in its run
directory (``<run>/config.yaml``, found from the checkpoint), with the changes given as ``+data.<key>=...`` /
``+method.<key>=...``, and the checkpoint's weights are loaded. A released model of the paper
(``model_file=... model_source=robustbench|mma_training``, :func:`mma_lightning.models.load_pretrained`) goes
the same way, with its data and norm from ``data=<name> norm=<name>`` (``mma-train``'s groups; the method
around it is ``released_method``) or from ``run_config=``: the only difference is that the model is built by
``load_pretrained`` instead of loading a checkpoint's weights into the run's model. Per model, on one device:

- optionally (``test_step``; default: on with the paper's protocol, off with ``evaluation=fast``) the
  method's own ``test_step`` through ``trainer.test`` on the same test points as the robustness evaluation:
  clean accuracy, PGD robust accuracy at ``eval_eps`` and the average margin, the numbers ``mma-train`` logs
  (``metrics.json``);
- the robustness evaluation built from the ``evaluation`` group
  (:func:`mma_lightning.evaluation.evaluate_model`, by default the MMA paper's protocol, Ding et al.,
  ICLR 2020) over an eps grid chosen by the run's dataset and norm unless given.

All evaluations go into one report (:func:`mma_lightning.evaluation.write_report`): ``results.json``,
``results.md`` (one comparison table), ``robust_accuracy.png`` (one curve per checkpoint) and ``margins.png``.
Every input (each config key) is checked before the first evaluation, and every file is written atomically
after the last one; the command's last line is the sanity checks' verdict. Finished batches and checkpoints
are kept in ``cache_dir``, so a run stopped half-way and started again does not redo them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from mma_lightning.cli.errors import run_reporting_errors
from mma_lightning.cli.train import (
    CONFIG_PATH,
    RESOLVED_CONFIG,
    check_model_fits_data,
    check_whole_checkpoint,
    floats,
    write_atomically,
)
from mma_lightning.evaluation import (
    DEFAULT_STEP_FRACTION,
    EPS_GRIDS,
    MNIST_LINF_STEP_FRACTION,
    ModelEvaluation,
    eps_grid,
    write_report,
)
from mma_lightning.evaluation.batches import device_batch_size
from mma_lightning.evaluation.cache import cache_key, data_fingerprint
from mma_lightning.evaluation.evaluate import check_evaluation_settings
from mma_lightning.evaluation.identity import model_identity
from mma_lightning.evaluation.protocol import check_eps_grid, grid_name
from mma_lightning.evaluation.report import ROBUSTBENCH_FIELDS, ROBUSTBENCH_MEASURED, eps_index, verdict_line
from mma_lightning.evaluation.robustness import check_norm
from mma_lightning.models.pretrained import PAPER_INFO, SOURCES, architecture_name, load_pretrained
from mma_lightning.namespaces import without_namespace_hint

log = logging.getLogger(__name__)

REPORT_FILE = "metrics.json"
EVAL_KEYS = ("norm", "eval_eps", "eval_nb_iter", "eval_step_scale", "eval_max_eps", "eval_search_steps")
# The data of a run (the class name of its `data._target_`) -> the family of its preset eps grids.
GRID_FAMILIES = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "mnist", "mnist5k_datamodule": "mnist",
                 "CIFAR10DataModule": "cifar10"}
# The eps of a RobustBench model_info entry by (grid family, norm): RobustBench's for CIFAR10, the paper's
# headline radius for MNIST.
MODEL_INFO_EPS = {("cifar10", "linf"): 8 / 255, ("cifar10", "l2"): 0.5, ("mnist", "linf"): 0.3,
                  ("mnist", "l2"): 2.0}


@dataclass
class Checkpoint:
    """One model to evaluate: its file, its label, its run's config and the protocol's radii; for a released
    model (``model_file``) also its layout and the model :func:`load_pretrained` built from the file; for a
    checkpoint trained outside ``mma-train`` the model built from ``model=`` with the checkpoint's weights
    (``released``, no ``source``) and the checkpoint's step and epoch (``saved``)."""

    path: Path
    name: str
    run_cfg: DictConfig
    norm: str
    eps_grid: tuple[float, ...]
    step_fraction: float | None
    protocol_step_fraction: float
    source: str | None = None
    released: nn.Module | None = None
    saved: dict[str, Any] | None = None


def evaluate(cfg: DictConfig) -> list[ModelEvaluation]:
    """Evaluate the checkpoints of ``cfg`` (``ckpt_path`` or ``ckpt_paths``, or the released ``model_file``)
    and write the report into the eval run directory (with ``model_info.enabled``, each model's RobustBench
    fields in ``results.json``); returns the evaluations in the order of the checkpoints."""
    device, run_test_step = check_command_settings(cfg)
    checkpoints = plan_checkpoints(cfg)
    info_eps = model_info_eps(cfg.get("model_info"), checkpoints)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    evaluator: Callable[..., ModelEvaluation] = instantiate(cfg.evaluation)
    trainer: pl.Trainer | None = None
    if run_test_step:
        # The test points are the robustness evaluation's (evaluation.max_samples), not the trainer's limit.
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                              limit_test_batches=1.0)
        if trainer.world_size != 1:
            raise ValueError(f"mma-eval runs on one device: trainer.devices must be 1 (got a world size of "
                             f"{trainer.world_size})")
    cache_dir = cfg.get("cache_dir")
    evaluations, tested = [], []
    robustbench: dict[str, tuple[float, dict[str, Any]]] = {}
    for ckpt in checkpoints:
        evaluation, metrics = evaluate_checkpoint(ckpt, evaluator, trainer, device,
                                                  max_samples=cfg.evaluation.get("max_samples"),
                                                  cache_dir=cache_dir, batch_size=cfg.get("eval_batch_size"))
        evaluations.append(evaluation)
        if info_eps is not None:
            robustbench[ckpt.name] = (info_eps, model_info_fields(cfg.model_info, evaluation))
        if metrics is not None:
            settings = {key: ckpt.run_cfg.method.get(key) for key in EVAL_KEYS}
            tested.append({"name": ckpt.name, "ckpt_path": str(ckpt.path), "attack": settings,
                           "num_samples": evaluation.pgd.num_samples,
                           "samples_sha256": evaluation.data_info.get("samples_sha256"), "metrics": metrics})
    out_dir = Path(cfg.paths.output_dir)
    paths = write_report(evaluations, out_dir, title=cfg.get("title") or "Robustness evaluation",
                         robustbench=robustbench if info_eps is not None else None)
    if tested:
        write_test_metrics(out_dir / REPORT_FILE, tested)
    log.info("report written to %s and %s", paths.results_json, paths.table_markdown)
    verdict = verdict_line(evaluations)
    if any(e.flagged for e in evaluations):
        log.warning("%s", verdict)
    else:
        log.info("%s", verdict)
    return evaluations


COMMAND_KEYS = ("seed", "device", "test_step", "title", "names", "cache_dir", "run_config", "model_file",
                "model_source", "eval_batch_size")


def check_command_settings(cfg: DictConfig) -> tuple[torch.device, bool]:
    """Check every setting of the command before any work, each error naming its key and the allowed
    values: the ``evaluation`` node (:func:`check_evaluation_settings`, keys as ``evaluation.<key>``), the
    device, ``test_step``, ``seed``. Returns the device and whether to run the methods' ``test_step``."""
    evaluation = OmegaConf.to_container(cfg.evaluation, resolve=True)
    assert isinstance(evaluation, dict)
    settings = {str(k): v for k, v in evaluation.items()
                if not str(k).startswith("_")}
    try:
        check_evaluation_settings({k: v for k, v in settings.items() if k != "eps_grid"})
    except ValueError as err:
        raise ValueError(f"evaluation.{err}") from None
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or null, got {seed!r}")
    test_step = cfg.get("test_step")
    if test_step is not None and not isinstance(test_step, bool):
        raise ValueError(f"test_step must be true, false or null (on unless evaluation=fast), got "
                         f"{test_step!r}")
    if test_step is None:
        test_step = settings.get("protocol") != "fast"
    name = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device must be null (cuda when available, else cpu) or a torch device such as "
                         f"cpu, cuda, cuda:1, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here: use device=cpu or device=null")
    if not isinstance(cfg.get("cache_dir"), (str, type(None))):
        raise ValueError(f"cache_dir must be a folder or null (no cache), got {cfg.get('cache_dir')!r}")
    batch_size = cfg.get("eval_batch_size")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"eval_batch_size must be auto (on a GPU the largest that fits its memory, on a CPU the "
                         f"run's data.eval_batch_size) or a positive integer, got {batch_size!r}")
    return device, bool(test_step)


def model_info_eps(model_info: DictConfig | None, checkpoints: Sequence[Checkpoint]) -> float | None:
    """The eps of the RobustBench ``model_info`` entries (``None``: ``model_info.enabled`` is false), checked
    with the node's keys and flag before any evaluation: ``model_info.eps`` (a number or ``"k/255"``) or the
    default of the checkpoints' data and norm (:data:`MODEL_INFO_EPS`), on their eps grid."""
    node = dict(model_info or {})
    enabled = node.pop("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"model_info.enabled must be true or false, got {enabled!r}")
    descriptive = [f for f in ROBUSTBENCH_FIELDS if f not in ROBUSTBENCH_MEASURED or f == "eps"]
    unknown = sorted(str(k) for k in set(node) - set(descriptive))
    if unknown:
        raise ValueError(f"model_info.{unknown[0]} is not a setting: model_info holds enabled and RobustBench's "
                         f"descriptive fields {descriptive} (dataset, clean_acc and autoattack_acc are measured)")
    if not enabled:
        return None
    first = checkpoints[0]
    eps = node.get("eps")
    if eps is None:
        family = GRID_FAMILIES.get(str(first.run_cfg.data.get("_target_", "?")).rsplit(".", 1)[-1])
        if family is None or (family, first.norm) not in MODEL_INFO_EPS:
            raise ValueError(f"model_info.eps=null: no default eps for this data and norm {first.norm}: set "
                             f"model_info.eps to one of the eps grid {list(first.eps_grid)}")
        eps = MODEL_INFO_EPS[(family, first.norm)]
    value = parse_eps(eps)
    if value is None or eps_index(first.eps_grid, value) is None:
        raise ValueError(f"model_info.eps={eps} is not on the evaluation's eps grid {list(first.eps_grid)}: "
                         "set model_info.eps to one of them (a number or k/255), or change evaluation.eps_grid")
    return value


def parse_eps(eps: Any) -> float | None:
    """An eps given as a number or as ``"k/255"`` (``None`` when it is neither)."""
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        return float(eps)
    if isinstance(eps, str) and eps.count("/") == 1:
        num, den = eps.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def model_info_fields(model_info: DictConfig, evaluation: ModelEvaluation) -> dict[str, Any]:
    """The descriptive RobustBench fields of one evaluated model: the MMA paper's for a released model
    (:data:`PAPER_INFO`), the architecture of its model, ``additional_data: false`` and
    ``number_forward_passes: 1`` (true of every model this package trains or loads), each replaced by
    ``model_info``'s when given."""
    fields: dict[str, Any] = {"additional_data": False, "number_forward_passes": 1,
                              "architecture": evaluation.model_info.get("architecture")}
    if evaluation.model_info.get("model_source") is not None:
        fields.update(PAPER_INFO)
    given = OmegaConf.to_container(model_info, resolve=True)
    assert isinstance(given, dict)
    fields.update({str(k): v for k, v in given.items() if k not in ("enabled", "eps") and v is not None})
    return fields


def plan_checkpoints(cfg: DictConfig) -> list[Checkpoint]:
    """The checkpoints of ``cfg`` (or its released model, :func:`plan_released`) with their run configs,
    labels and radii; every input error is raised here, before any evaluation."""
    if cfg.get("model_file") is not None or cfg.get("model_source") is not None:
        return [plan_released(cfg)]
    paths = checkpoint_paths(cfg.get("ckpt_path"), cfg.get("ckpt_paths"))
    for path in paths:
        check_whole_checkpoint(path, "ckpt_path" if cfg.get("ckpt_path") is not None else "ckpt_paths",
                               "evaluate a checkpoint that a run finished writing, e.g. "
                               "<run>/checkpoints/last.ckpt")
    if model_given(cfg) or released_groups(cfg) != (False, False):
        return plan_outside(cfg, paths)
    if cfg.get("run_config") is not None and len(paths) > 1:
        raise ValueError("run_config applies to one checkpoint (ckpt_path=...); with ckpt_paths each run's "
                         f"{RESOLVED_CONFIG} is found from its checkpoint")
    changes = {"data": cfg.get("data") or {}, "method": cfg.get("method") or {}}
    run_files = [find_run_config(path, cfg.get("run_config")) for path in paths]
    run_cfgs = [cast(DictConfig, OmegaConf.merge(load_run_config(path), changes)) for path in run_files]
    defaults = [default_name(file, run_cfg) for file, run_cfg in zip(run_files, run_cfgs)]
    names = checkpoint_names(cfg.get("names"), paths, defaults)
    checkpoints = [Checkpoint(path, name, run_cfg, *run_protocol(run_cfg, cfg.evaluation))
                   for path, name, run_cfg in zip(paths, names, run_cfgs)]
    check_comparable(checkpoints)
    return checkpoints


# What a checkpoint trained outside mma-train (or a released model) needs from the command line.
OUTSIDE_HINT = ("model=<name> (one of {models}) or +model._target_=<class> (+model.<argument>=...), "
                "data=<name> (one of {data}) and norm=<name> (one of {norms})")


def model_given(cfg: DictConfig) -> bool:
    """Whether a model was given (``model=<name>`` or ``+model._target_=<class>``): the backbone of a checkpoint
    trained outside ``mma-train``."""
    return "_target_" in (cfg.get("model") or {})


def outside_hint() -> str:
    """The options that evaluate a checkpoint trained outside ``mma-train``, with their choices."""
    return OUTSIDE_HINT.format(models=config_options("model"), data=config_options("data"),
                               norms=config_options("norm"))


def plan_outside(cfg: DictConfig, paths: Sequence[Path]) -> list[Checkpoint]:
    """Checkpoints of a LightningModule trained outside ``mma-train`` (an ``MMAModule`` in one's own Lightning
    project, say): no run config, so, as for a released model, the data and norm come from ``data=`` /
    ``norm=`` (with ``released_method``'s test_step) and the backbone from ``model=`` or a ``_target_``
    override, its weights the checkpoint's ``net.*`` (the module's ``net``). Every input error is raised here,
    one message naming everything that is missing."""
    if cfg.get("run_config") is not None:
        raise ValueError("give a checkpoint's run either as run_config=<an mma-train run's config.yaml> or as "
                         "model=<name> data=<name> norm=<name> (a checkpoint trained outside mma-train), not "
                         f"both, got run_config={cfg.get('run_config')!r}")
    data, norm = released_groups(cfg)
    missing = [part for part, given in (("model", model_given(cfg)), ("data", data), ("norm", norm))
               if not given]
    if missing:
        raise ValueError(f"ckpt_path: a checkpoint trained outside mma-train is evaluated with its model, data "
                         f"and norm given here; missing: {', '.join(missing)}. Add {outside_hint()}, e.g. "
                         "model=lenet5_madry data=fashion_mnist norm=linf")
    run_cfg = released_run_config(cfg)
    model = str(cfg.model._target_)
    checkpoints = []
    for path in paths:
        net = instantiate(cfg.model)
        if not isinstance(net, nn.Module):
            raise ValueError(f"model._target_={model} must build a torch.nn.Module, got {type(net).__name__}")
        saved = load_backbone(net, path, model)
        datamodule, module = build_run(run_cfg, net=net)
        check_model_fits_data(module, datamodule)
        checkpoints.append((path, net, saved))
    names = checkpoint_names(cfg.get("names"), paths, [model.rsplit(".", 1)[-1]] * len(paths))
    planned = [Checkpoint(path, name, run_cfg, *run_protocol(run_cfg, cfg.evaluation), released=net,
                          saved={key: saved.get(key) for key in ("global_step", "epoch")})
               for (path, net, saved), name in zip(checkpoints, names)]
    check_comparable(planned)
    return planned


def load_backbone(net: nn.Module, path: Path, model: str) -> dict[str, Any]:
    """Load the backbone weights of a Lightning checkpoint (its ``net.*`` keys, the module's ``net``, as in
    every method of this package) into ``net``, strictly; returns the checkpoint."""
    saved = read_checkpoint(path)
    state = saved["state_dict"]
    weights = {key[len("net."):]: value for key, value in state.items() if key.startswith("net.")}
    if not weights:
        prefixes = sorted({key.split(".", 1)[0] for key in state})
        raise ValueError(f"ckpt_path: {path} holds no backbone weights net.* (a method of this package keeps its "
                         f"model as .net); its state_dict keys start with {prefixes}")
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"ckpt_path: the weights of {path} do not fit model._target_={model} ({first}): "
                         "give the model the checkpoint was trained with, model=<name> or "
                         "+model._target_=<class> with its arguments") from None
    return saved


def released_groups(cfg: DictConfig) -> tuple[bool, bool]:
    """Whether the ``data`` and the ``norm`` groups were chosen (``data=<name>``, ``norm=<name>``), as for a
    released model; ``+data.<key>=...`` changes alone are not a choice."""
    data = cfg.get("data") or {}
    return "_target_" in data, cfg.get("norm") is not None


def plan_released(cfg: DictConfig) -> Checkpoint:
    """The released model of ``model_file`` / ``model_source`` as a :class:`Checkpoint`: its run config (the
    data and method) from ``data=`` / ``norm=`` or ``run_config``, its model built by :func:`load_pretrained`
    and checked to fit the data, its label (``names`` or the file's name) and radii. Every input error is
    raised here, naming its key, before any evaluation."""
    if cfg.get("ckpt_path") is not None or cfg.get("ckpt_paths") is not None:
        raise ValueError("give either a released model (model_file=<file> model_source=<layout>) or "
                         "checkpoints (ckpt_path / ckpt_paths), not both, got "
                         f"model_file={cfg.get('model_file')!r}, ckpt_path={cfg.get('ckpt_path')!r} and "
                         f"ckpt_paths={cfg.get('ckpt_paths')!r}")
    source = cfg.get("model_source")
    if source not in SOURCES:
        raise ValueError(f"model_source must be one of {list(SOURCES)} (the layout of model_file: robustbench "
                         "for RobustBench's Ding2020MMA.pt, mma_training for the authors' "
                         f"trained_models/*/model_best.pt), got {source!r}")
    file = cfg.get("model_file")
    if file is None:
        raise ValueError(f"model_source={source!r} needs the released model's file: model_file=<file>")
    path = Path(str(file)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model_file: {str(file)!r}: no such file (expected a released model, e.g. "
                                "Ding2020MMA.pt or trained_models/<name>/model_best.pt)")
    run_cfg = released_run_config(cfg)
    net = load_pretrained(path, source)
    datamodule, module = build_run(run_cfg, net=net)
    check_model_fits_data(module, datamodule)
    default = path.stem if source == "robustbench" or not path.parent.name else path.parent.name
    (name,) = checkpoint_names(cfg.get("names"), [path], [default])
    return Checkpoint(path, name, run_cfg, *run_protocol(run_cfg, cfg.evaluation), source=source,
                      released=net)


def released_run_config(cfg: DictConfig) -> DictConfig:
    """The run config (``data`` and ``method`` nodes) of a released model: ``data=`` / ``norm=`` with
    ``released_method``, or ``run_config`` (an ``mma-train`` run's config.yaml), with the ``method`` changes
    (and the ``data`` changes for a ``run_config``)."""
    chosen = released_groups(cfg)
    run_config = cfg.get("run_config")
    if run_config is not None:
        if any(chosen):
            raise ValueError("give a released model's data and norm either as data=<name> norm=<name> or as "
                             f"run_config=<file>, not both, got run_config={run_config!r}")
        path = Path(str(run_config)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"run_config: {str(run_config)!r}: no such file (an mma-train run's "
                                    f"<run>/{RESOLVED_CONFIG})")
        changes = {"data": cfg.get("data") or {}, "method": cfg.get("method") or {}}
        return OmegaConf.merge(load_run_config(path), changes)  # type: ignore[return-value]
    if not all(chosen):
        missing = " and ".join(key for key, given in zip(("data", "norm"), chosen) if not given)
        raise ValueError(f"model_file: the released model's {missing} is missing: add data=<name> norm=<name> "
                         f"(data one of {config_options('data')}, norm one of {config_options('norm')}), e.g. "
                         "data=mnist norm=linf, or run_config=<an mma-train run's config.yaml>")
    method = OmegaConf.merge(OmegaConf.to_container(cfg.released_method, resolve=True), cfg.get("method") or {})
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if isinstance(data, dict) and "val_size" in data:
        # Only the test split is evaluated: no validation split carved from the training set (a group's
        # val_size, e.g. 5000, need not fit a small dataset's training set).
        data["val_size"] = 0
    return OmegaConf.create({"data": data, "method": method})


def config_options(group: str) -> list[str]:
    """The options of one of the package's config groups (``conf/<group>/*.yaml``)."""
    import mma_lightning.conf

    folder = Path(mma_lightning.conf.__file__).parent / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def checkpoint_paths(ckpt_path: str | None, ckpt_paths: Sequence[str] | None) -> list[Path]:
    """The checkpoint files to evaluate: ``ckpt_path`` or ``ckpt_paths`` (exactly one given), each a file."""
    if (ckpt_path is None) == (ckpt_paths is None):
        raise ValueError("give the checkpoint to evaluate as ckpt_path=<file> or several to compare as "
                         f"ckpt_paths=[<file>,<file>] (exactly one of the two), got ckpt_path={ckpt_path!r} "
                         f"and ckpt_paths={ckpt_paths!r}; or a released model as model_file=<file> "
                         f"model_source=<{' | '.join(SOURCES)}> data=<name> norm=<name>")
    if ckpt_paths is not None and (not isinstance(ckpt_paths, (list, ListConfig)) or not ckpt_paths):
        raise ValueError(f"ckpt_paths must be a non-empty list of checkpoint files, got {ckpt_paths!r}")
    given = [str(ckpt_path)] if ckpt_path is not None else [str(p) for p in ckpt_paths or []]
    key = "ckpt_path" if ckpt_path is not None else "ckpt_paths"
    for path in given:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{key}: {path!r}: no such checkpoint file (expected e.g. "
                                    "<run>/checkpoints/last.ckpt of an mma-train run)")
    if len(set(given)) != len(given):
        raise ValueError(f"ckpt_paths must not repeat a checkpoint, got {given}")
    return [Path(p).expanduser() for p in given]


def find_run_config(ckpt_path: Path, run_config: str | None = None) -> Path:
    """The resolved config of the run that wrote ``ckpt_path``: ``run_config`` if given, else ``config.yaml``
    next to the checkpoint or one folder up (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
    if run_config is not None:
        candidates = [Path(run_config).expanduser()]
    else:
        candidates = [ckpt_path.parent / RESOLVED_CONFIG, ckpt_path.parent.parent / RESOLVED_CONFIG]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no training config for ckpt_path={str(ckpt_path)!r}: looked for {looked}; "
                            f"pass run_config=<run>/{RESOLVED_CONFIG}, or, for a checkpoint trained outside "
                            f"mma-train, {outside_hint()}")


def load_run_config(path: Path) -> DictConfig:
    """A run's resolved config (:func:`find_run_config`), checked to hold ``data`` and ``method`` nodes."""
    cfg = OmegaConf.load(path)
    missing = [key for key in ("data", "method") if key not in cfg]
    if missing:
        raise ValueError(f"run config {path} has no {' / '.join(missing)} node: is it the "
                         "config.yaml of an mma-train run? For a checkpoint trained outside mma-train, drop "
                         f"run_config and give {outside_hint()}")
    return cfg  # type: ignore[return-value]


def default_name(run_config: Path, run_cfg: DictConfig) -> str:
    """``"<experiment>/<method>"`` of a run from Hydra's record of its group choices (``.hydra/hydra.yaml``
    beside its config), ``"<method>"`` without an experiment; else the method's class name."""
    record = run_config.parent / ".hydra" / "hydra.yaml"
    choices = OmegaConf.load(record).hydra.runtime.choices if record.is_file() else {}
    method = choices.get("method") or str(run_cfg.method.get("_target_", "model")).rsplit(".", 1)[-1]
    experiment = choices.get("experiment")
    return f"{experiment}/{method}" if experiment else str(method)


def checkpoint_names(names: Sequence[str] | None, paths: Sequence[Path],
                     defaults: Sequence[str]) -> list[str]:
    """The labels of the checkpoints: ``names`` (one per checkpoint, distinct) or the defaults; a default
    shared by several checkpoints gets the suffix ``@<file stem>`` (``@<run dir>/<file stem>`` when the stems
    are alike too)."""
    if names is not None:
        names = [names] if isinstance(names, str) else [str(n) for n in names]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise ValueError(f"names must give one distinct label per checkpoint ({len(paths)}), got {names}")
        return names
    labels = list(defaults)
    for default, count in Counter(defaults).items():
        if count == 1:
            continue
        shared = [i for i, d in enumerate(defaults) if d == default]
        stems = [paths[i].stem for i in shared]
        if len(set(stems)) < len(stems):
            stems = [f"{paths[i].parent.parent.name}/{paths[i].stem}" for i in shared]
        for i, stem in zip(shared, stems):
            labels[i] = f"{default}@{stem}"
    return labels


def run_protocol(run_cfg: DictConfig,
                 evaluation: DictConfig) -> tuple[str, tuple[float, ...], float | None, float]:
    """``(norm, eps grid, step fraction, protocol step fraction)`` of a run: the run's norm;
    ``evaluation.eps_grid`` (a list or a preset name) or the paper's grid for the run's dataset and norm;
    ``evaluation.step_fraction`` (``None``: fitted to ``evaluation.nb_iter``) and the release script's step
    fraction for the data (``eps / 40`` for MNIST-like Linf, ``eps / 4`` otherwise)."""
    norm = check_norm(run_cfg.method.get("norm"))
    data = str(run_cfg.data.get("_target_", "?")).rsplit(".", 1)[-1]
    family = GRID_FAMILIES.get(data)
    grid = evaluation.get("eps_grid")
    if grid is None:
        if family is None:
            raise ValueError(f"evaluation.eps_grid=null: no preset eps grid for the data {data} (presets for "
                             f"{', '.join(sorted(GRID_FAMILIES))}); set evaluation.eps_grid to one of "
                             f"{sorted(EPS_GRIDS)} or a list of eps, e.g. evaluation.eps_grid=[0.01,0.02]")
        grid = f"{family}-{norm}"
    if isinstance(grid, str):
        try:
            grid = eps_grid(grid_name(grid))
        except ValueError:
            raise ValueError(f"evaluation.eps_grid must be one of {sorted(EPS_GRIDS)}, a list of eps > 0 or "
                             f"null, got {grid!r}") from None
    if not isinstance(grid, (list, tuple, ListConfig)):
        raise ValueError(f"evaluation.eps_grid must be one of {sorted(EPS_GRIDS)}, a list of eps > 0 or "
                         f"null, got {grid!r}")
    grid = check_eps_grid(list(grid), name="evaluation.eps_grid")
    fraction = evaluation.get("step_fraction")
    if fraction is not None and (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                                 or not fraction > 0):
        raise ValueError(f"evaluation.step_fraction must be a number > 0 or null (fitted to nb_iter), got "
                         f"{fraction!r}")
    protocol = MNIST_LINF_STEP_FRACTION if (family, norm) == ("mnist", "linf") else DEFAULT_STEP_FRACTION
    return norm, grid, None if fraction is None else float(fraction), protocol


def check_comparable(checkpoints: Sequence[Checkpoint]) -> None:
    """Checkpoints of one comparison must share the norm and the eps grid (one table, one plot)."""
    for attr, fix in (("norm", "evaluate them in separate mma-eval calls"),
                      ("eps_grid", "set evaluation.eps_grid to compare them on one grid")):
        values = {getattr(c, attr) for c in checkpoints}
        if len(values) > 1:
            found = ", ".join(f"{c.name}: {getattr(c, attr)}" for c in checkpoints)
            raise ValueError(f"ckpt_paths: the checkpoints of one comparison must share one {attr}, got "
                             f"{found}; {fix}")


def evaluate_checkpoint(ckpt: Checkpoint, evaluator: Callable[..., ModelEvaluation],
                        trainer: pl.Trainer | None, device: torch.device, *, max_samples: int | None = None,
                        cache_dir: str | None = None, batch_size: int | str | None = "auto"
                        ) -> tuple[ModelEvaluation, dict[str, float] | None]:
    """Rebuild the run of ``ckpt``, load its weights (a released model: the method around the model
    :func:`load_pretrained` built), run the method's ``test_step`` (with a ``trainer``) and the robustness
    evaluation on the same test points (the first ``max_samples`` of the test split)."""
    datamodule, module = build_run(ckpt.run_cfg, net=ckpt.released)
    saved = (ckpt.saved or {}) if ckpt.released is not None else load_weights(module, ckpt.path)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    if not loader:
        raise ValueError(f"{ckpt.name}: the run's data has no test split to evaluate")
    loader = with_device_batch_size(loader, getattr(module, "net", module), device, batch_size)
    metrics = None
    if trainer is not None:
        metrics = cached_test_split(trainer, module, first_points(loader, max_samples), ckpt, cache_dir)
    net = getattr(module, "net", module).to(device).eval()
    hp = ckpt.run_cfg.method
    architecture = architecture_name(getattr(net, "_orig_mod", net))
    if ckpt.source is not None:
        model_info = {"model_file": str(ckpt.path.resolve()), "model_source": ckpt.source,
                      "method": hp.get("_target_"), "architecture": architecture}
    else:
        model_info = {"ckpt_path": str(ckpt.path.resolve()), "method": hp.get("_target_"),
                      "architecture": architecture, "global_step": saved.get("global_step"),
                      "epoch": saved.get("epoch")}
    data_info = {"dataset": getattr(datamodule, "dataset_name", ckpt.run_cfg.data.get("_target_")),
                 "split": "test", "data_dir": ckpt.run_cfg.data.get("data_dir")}
    log.info("evaluating %s (%s) on %s", ckpt.name, ckpt.path, device)
    evaluation = evaluator(model=net, data=loader, norm=ckpt.norm, eps_grid=ckpt.eps_grid, name=ckpt.name,
                           step_fraction=ckpt.step_fraction,
                           protocol_step_fraction=ckpt.protocol_step_fraction,
                           dataset=getattr(datamodule, "dataset_name", None) or GRID_FAMILIES.get(
                               str(ckpt.run_cfg.data.get("_target_", "?")).rsplit(".", 1)[-1]),
                           clip_min=hp.get("clip_min", 0.0), clip_max=hp.get("clip_max", 1.0),
                           model_info=model_info, data_info=data_info, cache_dir=cache_dir)
    return evaluation, metrics


def with_device_batch_size(loader: DataLoader, net: torch.nn.Module, device: torch.device,
                           batch_size: int | str | None) -> DataLoader:
    """The test loader with the evaluation's batch size: ``batch_size`` when given as a number; ``"auto"``: on a
    GPU the largest that fits its memory (:func:`~mma_lightning.evaluation.batches.device_batch_size`; large
    batches keep the card busy), on a CPU the run's own (``data.eval_batch_size``)."""
    if batch_size is None or (batch_size == "auto" and device.type != "cuda"):
        return loader
    if batch_size == "auto":
        example = loader.dataset[0][0]
        batch_size = device_batch_size(net.to(device).eval(), torch.as_tensor(example))
    if batch_size == loader.batch_size:
        return loader
    return DataLoader(loader.dataset, batch_size=int(batch_size), num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def first_points(loader: DataLoader, max_samples: int | None) -> DataLoader:
    """``loader`` over only the first ``max_samples`` points of its dataset (``loader`` itself for all), in
    the same order, batch size, workers and collate function: the robustness evaluation's points."""
    if max_samples is None or max_samples >= len(loader.dataset):  # type: ignore[arg-type]
        return loader
    return DataLoader(Subset(loader.dataset, range(max_samples)), batch_size=loader.batch_size,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


def build_run(run_cfg: DictConfig,
              net: nn.Module | None = None) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The datamodule and the method described by a run's config, with its own backbone or ``net``."""
    datamodule = instantiate(run_cfg.data)
    with without_namespace_hint():  # mma-eval runs its own pytorch_lightning Trainer
        module = instantiate(run_cfg.method) if net is None else instantiate(run_cfg.method, net=net)
    return datamodule, module


def load_weights(module: pl.LightningModule, ckpt_path: Path) -> dict[str, Any]:
    """Load the ``state_dict`` of a Lightning checkpoint into ``module`` (strict); returns the checkpoint."""
    saved = read_checkpoint(ckpt_path)
    module.load_state_dict(saved["state_dict"])
    return saved


def read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    """A Lightning checkpoint file's contents; one ``ValueError`` naming the file for one that cannot be read
    (a truncated or foreign file) or holds no ``state_dict``."""
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling raises anything; the file is what to fix
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} cannot be read as a checkpoint ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else '-'}); a truncated or "
                         "foreign file? evaluate <run>/checkpoints/last.ckpt of a run") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} is not a Lightning checkpoint (no state_dict)")
    return saved


def cached_test_split(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader, ckpt: Checkpoint,
                      cache_dir: str | None) -> dict[str, float]:
    """:func:`run_test_split`, or its metrics from ``cache_dir`` when a previous run tested the same weights
    on the same points with the same settings (keyed by their fingerprints, written atomically)."""
    if cache_dir is None:
        return run_test_split(trainer, module, loader)
    fingerprint = data_fingerprint(loader, torch.device("cpu"), batch_size=loader.batch_size or 256,
                                   max_samples=None)
    settings = OmegaConf.to_container(ckpt.run_cfg.method, resolve=True)
    key = cache_key(stage="test_step", model=model_identity(module)["state_sha256"], data=fingerprint,
                    method=settings)
    path = Path(cache_dir) / f"test_step-{key[:32]}.json"
    if path.is_file():
        log.info("%s: test_step finished before with the same weights, points and settings: reusing %s",
                 ckpt.name, path)
        return json.loads(path.read_text())
    metrics = run_test_split(trainer, module, loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(metrics))
    return metrics


def run_test_split(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader) -> dict[str, float]:
    """Run the method's ``test_step`` over ``loader`` with the loaded weights: the ``test/...`` metrics."""
    trainer.test(module, dataloaders=loader)
    return floats(trainer.callback_metrics)


def write_test_metrics(path: Path, tested: list[dict[str, Any]]) -> None:
    """Write each checkpoint's ``test_step`` metrics with its attack settings to a JSON file (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"checkpoints": tested}, indent=2) + "\n")
    for entry in tested:
        for name, value in entry["metrics"].items():
            log.info("%s: %s = %.4f", entry["name"], name, value)
    log.info("test_step metrics written to %s", path)


# Keys whose values are file paths: a value with "=" (Lightning's epoch=4-step=550.ckpt) is quoted for Hydra.
PATH_KEYS = ("ckpt_path", "ckpt_paths", "model_file", "run_config")


def quote_paths(args: Sequence[str]) -> list[str]:
    """Command-line arguments with checkpoint paths as Hydra's override parser takes them: bare checkpoint files
    (``mma-eval lightning_logs/version_0/checkpoints/epoch=4-step=550.ckpt model=...``) become ``ckpt_path=...``
    (several: ``ckpt_paths=[...]``), and a path holding ``=`` given to :data:`PATH_KEYS` is quoted (Hydra's
    parser stops at the second ``=`` otherwise); everything else is kept as written."""
    files = [arg for arg in args if not arg.startswith("-") and Path(arg).expanduser().is_file()]
    others = [_quoted_value(arg) for arg in args if arg not in files]
    if len(files) == 1:
        return [f"ckpt_path={_quote(files[0])}", *others]
    if files:
        return [f"ckpt_paths=[{','.join(_quote(f) for f in files)}]", *others]
    return others


def _quoted_value(arg: str) -> str:
    """``key=value`` with ``value`` quoted when ``key`` is one of :data:`PATH_KEYS` (each element of a list)."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in PATH_KEYS or "=" not in value:
        return arg
    if value.startswith("[") and value.endswith("]"):
        return f"{key}=[{','.join(_quote(v) for v in value[1:-1].split(','))}]"
    return f"{key}={_quote(value)}"


def _quote(path: str) -> str:
    """``path`` as a quoted Hydra string (already quoted, or holding both kinds of quotes: as it is)."""
    if path[:1] in ("'", '"') or ("'" in path and '"' in path):
        return path
    quote = '"' if "'" in path else "'"
    return f"{quote}{path}{quote}"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's command line: :func:`evaluate`."""
    cache_dir = cfg.get("cache_dir")
    kept = (f"; the finished batches are kept in cache_dir={cache_dir}: the same command goes on from them"
            if cache_dir else "; nothing was written (cache_dir=null keeps no finished batches)")
    run_reporting_errors(lambda: evaluate(cfg), command="mma-eval", interrupted=kept)


def main() -> None:
    """Entry point of ``mma-eval``: the arguments with their checkpoint paths made safe for Hydra
    (:func:`quote_paths`), then Hydra's command line (:func:`hydra_main`)."""
    sys.argv[1:] = quote_paths(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
