"""The one LightningModule skeleton every training method shares (MMA, PGD-AT, standard, ...).

It owns the backbone, the optimiser plumbing and the robustness validation; a method adds only its
``training_loss``. Validation follows the MMA reference's per-epoch evaluation (Ding et al., ICLR 2020,
Sec. 5 / reference ``mma_training``): PGD at a fixed eval eps, then a bisection along the PGD direction gives
each sample's margin estimate; both numbers come from one :func:`find_margin` call, since the bisection's
first test is the PGD point itself. Metrics are torchmetrics objects, so DDP reduction is right
(docs/lightning-notes.md, item 5): ``val/acc``, ``val/robust_acc``, ``val/avg_eps`` (model selection: max ``val/avg_eps``).

Evaluation under the default ``Trainer()`` (``inference_mode=True``) works: the attacks leave inference mode
for their own gradient computations (docs/lightning-notes.md, item 2), so no ``Trainer`` flag is required.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import TypedDict

from mma_lightning.attacks import find_margin, get_norm
from mma_lightning.attacks.checks import (
    check_batch,
    check_in_box,
    check_labels,
    host_checks,
    host_checks_enabled,
)
from mma_lightning.attacks.context import model_mode
from mma_lightning.attacks.losses import LOSSES
from mma_lightning.attacks.margin import check_search
from mma_lightning.attacks.norms import NORM_NAMES
from mma_lightning.capture import Captured, GraphSettings, check_compile_step, pad_batch
from mma_lightning.methods import resume_point
from mma_lightning.methods.random_state import CHECKPOINT_KEY as RANDOM_STREAMS_KEY
from mma_lightning.methods.random_state import RandomStreams
from mma_lightning.methods.schedules import SCHEDULER_INTERVALS, lightning_scheduler
from mma_lightning.namespaces import ModuleHost, other_namespace_hint

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
EVAL_STAGES = ("val", "test")
STAGE_NAMES = {"val": "validation", "test": "test"}


class SkeletonKwargs(TypedDict, total=False):
    """The settings every method passes on unchanged to :class:`AdversarialModule` (see its Args).

    Methods take them as ``**kwargs: Unpack[SkeletonKwargs]``: typed, and written down once.
    """

    optimizer: OptimizerFactory
    scheduler: SchedulerFactory | None
    scheduler_interval: str
    scheduler_monitor: str | None
    eval_eps: float
    eval_nb_iter: int
    eval_step_scale: float
    eval_max_eps: float | None
    eval_search_steps: int
    eval_search: str
    eval_loss: str
    clip_min: float | None
    clip_max: float | None
    compile: bool | dict[str, Any]
    compile_step: bool | dict[str, Any]
    channels_last: bool
    debug_checks: bool


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with lr 1e-4: the MMA reference's MNIST optimiser."""
    return torch.optim.Adam(params, lr=1e-4)


class AdversarialModuleLogic(ModuleHost):
    """Shared skeleton: ``net`` + optimiser + robustness validation; subclasses define ``training_loss``.

    Batches are ``(x, y)`` or ``(x, y, index)`` with ``x`` in the box ``[clip_min, clip_max]`` (normalisation
    belongs inside ``net``), so every eps is in input units.

    Args:
        net: any ``nn.Module`` mapping a batch to logits.
        norm: threat model, ``"linf"`` or ``"l2"``.
        optimizer: ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``).
        scheduler: optional ``optimizer -> LRScheduler``, stepped every ``scheduler_interval``; or a factory
            returning Lightning's scheduler config (a dict with ``"scheduler"``, e.g.
            :func:`~mma_lightning.methods.schedules.scheduler_config`), whose keys win.
        scheduler_interval: ``"step"`` or ``"epoch"`` (a validation metric's monitor needs ``"epoch"``).
        scheduler_monitor: the metric a scheduler such as ``ReduceLROnPlateau`` steps on (e.g. ``"val/acc"``,
            ``"val/avg_eps"``); ``None``: none.
        eval_eps: the fixed eps of the validation PGD (reference: 0.3 MNIST Linf, 8/255 CIFAR10 Linf).
        eval_nb_iter: validation PGD steps; step size ``eval_step_scale * eval_eps / eval_nb_iter``.
        eval_max_eps: upper end of the validation margin search (default :meth:`default_eval_max_eps`).
        eval_search_steps: bisection steps of the validation margin search.
        eval_search: the validation margin search, ``"bisection"`` (reference) or ``"refined"``
            (:func:`~mma_lightning.attacks.find_margin`; default budget).
        eval_loss: the validation PGD objective, summed over the batch: ``"slm"`` (the reference's model
            selection: soft logit margin at ``eval_eps``), or ``"ce"``, ``"lm"``, ``"cw"``.
        clip_min, clip_max: the data box (``None`` for both: no box). The first batch of each stage is
            checked against it (:func:`~mma_lightning.attacks.checks.check_in_box`): inputs normalised
            outside the model stop with the two fixes.
        compile: ``torch.compile`` the backbone in place (``net.compile()``; state-dict keys unchanged):
            ``True`` for the defaults, or a dict of ``torch.compile`` keyword arguments. Off by default
            (docs/lightning-notes.md, item 7); every forward of the step keeps its batch shape, so after warm-up nothing
            recompiles.
        compile_step: capture the whole training step (clean forward, attacks, margin search, loss) and the
            validation's attack: ``torch.compile(fullgraph=True, dynamic=False)`` of :meth:`step_loss` and
            :func:`evaluation_outputs`, on CUDA with ``mode="reduce-overhead"`` (CUDA graphs;
            :mod:`mma_lightning.capture`). ``True``, or a dict of ``torch.compile`` arguments. Outside the graph,
            eagerly: the random draws (from the module's generator, so exact resume holds), the eps table's
            lookup and update, the metrics and logs, and on each stage's first batch the value checks
            (:meth:`check_batch_values`). A training batch of another size than the first is skipped (one
            warning; the library's loaders drop the short last batch), an evaluation batch is padded.
        channels_last: store the backbone's 4-D weights and every 4-D input batch in ``channels_last``
            memory format (faster convolutions under bf16 on recent GPUs).
        debug_checks: run the attacks' value checks (finite inputs, label range, radii, the box: one host sync
            each) on every batch; by default only on the first batch of each stage (training, val, test),
            so a steady-state step never waits for the device.
    """

    train_stat_names: tuple[str, ...] = ()
    """Per-sample training statistics a method logs as ``train/<name>`` (see :meth:`log_train_stat`)."""

    def __init__(
        self,
        net: nn.Module,
        norm: str = "linf",
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str | None = None,
        eval_eps: float = 0.3,
        eval_nb_iter: int = 20,
        eval_step_scale: float = 2.5,
        eval_max_eps: float | None = None,
        eval_search_steps: int = 10,
        eval_search: str = "bisection",
        eval_loss: str = "slm",
        clip_min: float | None = 0.0,
        clip_max: float | None = 1.0,
        compile: bool | dict[str, Any] = False,
        compile_step: bool | dict[str, Any] = False,
        channels_last: bool = False,
        debug_checks: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if str(norm).lower() not in NORM_NAMES:
            raise ValueError(f"norm must be one of {list(NORM_NAMES)}, got {norm!r}")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {list(SCHEDULER_INTERVALS)}, "
                             f"got {scheduler_interval!r}")
        if scheduler_monitor is not None and (not isinstance(scheduler_monitor, str) or not scheduler_monitor):
            raise ValueError(f"scheduler_monitor must be a metric name (e.g. 'val/acc') or None, "
                             f"got {scheduler_monitor!r}")
        if not eval_eps > 0:
            raise ValueError(f"eval_eps must be > 0, got {eval_eps!r}")
        check_search(eval_search, 3, 4, name="eval_search")
        if eval_loss not in LOSSES:
            raise ValueError(f"eval_loss must be one of {list(LOSSES)}, got {eval_loss!r}")
        if eval_max_eps is not None and eval_max_eps < eval_eps:
            raise ValueError(f"eval_max_eps must be >= eval_eps ({eval_eps}), got {eval_max_eps!r}")
        if not isinstance(compile, (bool, Mapping)):  # a Hydra DictConfig is a Mapping
            raise ValueError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
        check_compile_step(compile_step)
        hint = other_namespace_hint(self)
        if hint is not None:
            warnings.warn(hint, stacklevel=2)
        # Factories are kept as attributes: hparams must stay picklable (a lambda would be dropped from them).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        # LightningCLI hands save_hyperparameters the parsed arguments only, without the defaults of the
        # ``**kwargs: Unpack[SkeletonKwargs]`` keys left unset: complete them from this call's values.
        arguments = locals()
        for key in SkeletonKwargs.__annotations__:
            if key not in ("optimizer", "scheduler") and key not in self.hparams:
                self.hparams[key] = arguments[key]
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compile is not False:
            net.compile(**({} if compile is True else dict(compile)))
        self.net = net
        self._host_checked: set[str] = set()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.norm = get_norm(norm).name
        self.random_streams = RandomStreams()
        self._resume_point: resume_point.ResumePoint | None = None
        self.eval_max_eps = float(eval_max_eps if eval_max_eps is not None else self.default_eval_max_eps())
        # nan_strategy="disable": torchmetrics' NaN filter reads the values on the host (a sync per update).
        self.train_stats = nn.ModuleDict({name: MeanMetric(nan_strategy="disable")
                                          for name in self.train_stat_names})
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({name: MeanMetric(nan_strategy="disable")
                                   for name in ("acc", "robust_acc", "avg_eps", "loss")}) for stage in EVAL_STAGES}
        )
        option = {} if compile_step is True else compile_step  # kept as given: a DictConfig stays picklable
        if isinstance(option, Mapping) and has_dropout(net):  # inductor's own masks would fail the check
            option = {**option, "exact_random": True}
        # The method's step_loss (one function per method, shared by every instance: a sweep's trials replay
        # one graph) and the evaluation's outputs (one function for every method).
        self._train_graph = (Captured(type(self).step_loss, option, "training step", net_arg=1)
                             if compile_step is not False else None)
        self._eval_graph = (Captured(evaluation_outputs, option, "evaluation attack", net_arg=0)
                            if compile_step is not False else None)
        self._captured_batch: dict[str, int] = {}  # the batch size each stage's graph takes
        self._skip_warned: set[str] = set()

    def default_eval_max_eps(self) -> float:
        """Upper end of the validation margin search when ``eval_max_eps`` is not given: ``4 * eval_eps``."""
        return 4 * self.hparams.eval_eps

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the backbone."""
        return self.net(x)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits of ``x`` for ``trainer.predict``: batches ``(x, y)``, ``(x, y, index)``, ``(x,)`` or a bare ``x``
        (Lightning's default ``predict_step`` would hand the whole tuple to :meth:`forward`)."""
        x = batch[0] if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3 else batch
        if not isinstance(x, Tensor):
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise ValueError("predict batches must be x, (x,), (x, y) or (x, y, index) with x a tensor, got "
                             f"{type(batch).__name__}{length}")
        return self(self.as_input(x))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, with ``net=<your backbone>`` when the class takes ``net``: a
        checkpoint holds the backbone's weights, not how to build it (``net`` is left out of the hyperparameters),
        so ``MMAModule.load_from_checkpoint(path, net=Backbone())``."""
        import inspect

        parameter = inspect.signature(cls).parameters.get("net")
        if "net" not in kwargs and parameter is not None and parameter.default is inspect.Parameter.empty:
            raise ValueError(f"{cls.__name__}.load_from_checkpoint needs the backbone: pass net=<your backbone>, "
                             f"e.g. {cls.__name__}.load_from_checkpoint({str(checkpoint_path)!r}, net=Backbone()) "
                             "(the checkpoint holds its weights, not how to build it)")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Warn when a project's subclass derives from this library's ``pytorch_lightning`` class in a process on
        ``lightning.pytorch`` (:func:`~mma_lightning.namespaces.other_namespace_hint`): LightningCLI and a
        ``lightning.Trainer`` refuse such a class before any of its code runs."""
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("mma_lightning."):
            hint = other_namespace_hint(cls)
            if hint is not None:
                warnings.warn(hint, stacklevel=2)

    def setup(self, stage: str) -> None:
        """Log every setting to the Trainer's loggers (``hparams.yaml``) as the checkpoint holds them: the
        hyperparameters as ``__init__`` completed them (LightningCLI passes only the parsed arguments)."""
        import copy

        self._log_hyperparams = True
        self._hparams_initial = copy.deepcopy(self._hparams)

    @property
    def captures(self) -> dict[str, Captured]:
        """With ``compile_step``, the captured functions by stage (``"train"``, ``"eval"``): each says whether
        it runs captured or fell back to eager (``state``, ``fallback_reason``) and its first call's time."""
        graphs = {"train": self._train_graph, "eval": self._eval_graph}
        return {k: v for k, v in graphs.items() if v is not None}

    def settings(self, x: Tensor | None = None) -> GraphSettings:
        """The settings a step reads (``hparams`` with the resolved ``norm`` and ``eval_max_eps``); given ``x``
        (as every step gives it, eager or captured), the swept values as tensors on its device and of its dtype
        (:class:`GraphSettings`): one computation whether captured or not."""
        values = {**self.hparams, "norm": self.norm, "eval_max_eps": self.eval_max_eps}
        return GraphSettings(values) if x is None else GraphSettings.on_device(values, x.device, x.dtype)

    def on_fit_start(self) -> None:
        """With ``compile_step``, refuse a SyncBatchNorm backbone (``Trainer(sync_batchnorm=True)``): its
        all-reduce of batch statistics cannot be captured in one graph."""
        if self._train_graph is not None and any(isinstance(m, nn.SyncBatchNorm) for m in self.net.modules()):
            raise ValueError("compile_step cannot capture SyncBatchNorm (trainer.sync_batchnorm=true): its "
                             "all-reduce of batch statistics breaks the captured graph; set "
                             "trainer.sync_batchnorm=false (each device's own batch statistics) or "
                             "method.compile_step=false")

    # --- training -----------------------------------------------------------------------------------------
    def step_inputs(self, x: Tensor, y: Tensor, index: Tensor | None) -> dict[str, Any]:
        """What one training step needs besides the batch, made eagerly before it: random draws from the
        module's generator, table lookups (a captured step cannot hold them). None here."""
        return {}

    def step_loss(self, net: nn.Module, hp: Any, x: Tensor, y: Tensor,
                  inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's training step as a function of tensors: ``(loss, outputs)``, where ``outputs`` holds
        every per-sample statistic of :attr:`train_stat_names` (and whatever :meth:`record_step` needs).

        ``net`` is the backbone and ``hp`` the settings (:meth:`settings`: the swept numbers are tensors). No logging, no table updates, no generator, no host reads, nothing of ``self`` but constant
        attributes (``self.norm``): with ``compile_step`` this function is compiled whole (``fullgraph=True``),
        once for every instance of the method.
        """
        raise NotImplementedError

    def record_step(self, index: Tensor | None, outputs: dict[str, Tensor]) -> None:
        """After the step, eagerly: log ``train/<name>`` for every statistic of :attr:`train_stat_names`."""
        for name in self.train_stat_names:
            self.log_train_stat(name, outputs[name])

    def training_loss(self, x: Tensor, y: Tensor, index: Tensor | None) -> Tensor:
        """The method's scalar training loss for one batch: :meth:`step_inputs`, :meth:`step_loss` (with
        ``compile_step``: through the captured graph, after :meth:`check_batch_values`) and :meth:`record_step`."""
        inputs = self.step_inputs(x, y, index)
        settings = self.settings(x)
        if self._train_graph is None:
            loss, outputs = self.step_loss(self.net, settings, x, y, inputs)
        else:
            self.check_batch_values(x, y)
            loss, outputs = self._train_graph(
                x.device, (self, self.net, settings, x, y, inputs),
                eager=lambda: self.step_loss(self.net, settings, x, y, inputs),
                restore=self.net, params=[p for p in self.net.parameters() if p.requires_grad])
        self.record_step(index, outputs)
        return loss

    def check_batch_values(self, x: Tensor, y: Tensor) -> None:
        """With ``compile_step``, the value checks the eager attacks make on a stage's first batch (finite
        inputs, labels within the model's logits), made before the graph, which cannot read values; a no-op
        outside the first batch (unless ``debug_checks``). The label check forwards one sample in eval mode."""
        if not host_checks_enabled():
            return
        check_batch(x, y)
        with torch.no_grad(), model_mode(self.net, train=False):
            check_labels(y, self.net(x[:1]).shape[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One scalar loss for Lightning's automatic optimisation (docs/lightning-notes.md, item 1); ``None`` (the batch is
        skipped) for a batch whose size the captured step does not take."""
        x, y, index = _unpack(batch)
        if not self._fits_captured_batch("train", x.shape[0]):
            return None
        with self.host_checks_for("train"):
            check_in_box(x, self.hparams.clip_min, self.hparams.clip_max, "training")
            loss = self.training_loss(self.as_input(x), y, index)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _fits_captured_batch(self, stage: str, size: int) -> bool:
        """``compile_step``: the first batch of ``stage`` fixes the graph's batch size; a training batch of
        another size is skipped (warned once), since a new shape would compile a new graph."""
        if self._train_graph is None:
            return True
        captured = self._captured_batch.setdefault(stage, size)
        if size == captured:
            return True
        if stage not in self._skip_warned:
            self._skip_warned.add(stage)
            warnings.warn(f"compile_step: a training batch of {size} samples is skipped (the captured step takes "
                          f"{captured}); use a loader with drop_last=True (the library's datamodules drop the short "
                          "last batch)", stacklevel=2)
        return False

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Lightning's ``self.log``; a run of a pack (:class:`mma_lightning.packing.PackedModule`) logs through
        the pack instead, as ``run<i>/<name>``, so that each run's metrics reach its own loggers."""
        pack = self.__dict__.get("_pack_host")
        if pack is None:
            super().log(name, value, *args, **kwargs)
        else:
            host, prefix = pack
            host.log(prefix + name, value, *args, **{**kwargs, "add_dataloader_idx": False})

    def log_train_stat(self, name: str, value: Tensor) -> None:
        """Log ``train/<name>``, a per-sample statistic averaged by its torchmetrics ``MeanMetric``."""
        metric = cast(MeanMetric, self.train_stats[name])
        metric(value.detach().float())
        if self._trainer is not None:  # also usable outside a Trainer (Fabric, a manual loop, a benchmark)
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, prog_bar=name in ("acc", "avg_eps"))

    @property
    def attack_generator(self) -> torch.Generator:
        """The training attacks' random source (on the module's device), saved in every checkpoint."""
        return self.random_streams.generator(self.device, self.global_rank)

    # --- exact resume: every random stream in the checkpoint (methods.random_state) ------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the end of a step that may be ``fit``'s last, record the fit loop's state and the random streams:
        a checkpoint saved after ``fit`` returns is written from them (:mod:`~mma_lightning.methods.resume_point`)."""
        if resume_point.may_end_fit(self.trainer):
            self._resume_point = resume_point.ResumePoint(self.trainer.global_step, self.trainer.fit_loop.state_dict(),
                                                          self.random_streams.state())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add every rank's random streams (attacks, torch, numpy, Python) to the checkpoint; after ``fit``
        returned, the loop state and streams of its last step (:func:`resume_point.apply`)."""
        streams = resume_point.apply(checkpoint, self._trainer, self._resume_point)
        checkpoint[RANDOM_STREAMS_KEY] = self.random_streams.gathered_state(streams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue this rank's random streams when resuming a fit (loading weights alone changes none); warn
        when the checkpoint is one saved after ``fit`` that cannot resume exactly."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting:
            resume_point.warn_if_inexact(checkpoint)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        self.random_streams.restore(checkpoint.get(RANDOM_STREAMS_KEY), self.global_rank, world_size,
                                    restore_global=fitting)

    # --- evaluation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        """Restart the validation attacks' random stream (a validation depends on the weights alone)."""
        self.random_streams.restart_eval()

    def on_test_epoch_start(self) -> None:
        """Restart the test attacks' random stream, as for validation."""
        self.random_streams.restart_eval()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Clean accuracy, PGD robust accuracy at ``eval_eps`` and the average margin estimate; returns the
        per-sample margin estimates (Lightning hands them to callbacks' ``on_validation_batch_end``)."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same measures as validation, logged as ``test/...``."""
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y, _ = _unpack(batch)
        x = self.as_input(x)
        n = x.shape[0]
        hp = self.hparams
        if self._eval_graph is not None:
            self._captured_batch.setdefault("eval", n)  # the first evaluation batch fixes the graph's size
        noise_generator = self.random_streams.eval_generator(self.device)
        with self.host_checks_for(stage):
            check_in_box(x, hp.clip_min, hp.clip_max, STAGE_NAMES[stage])
            if self._eval_graph is None:
                noise = get_norm(self.norm).start_noise(x, noise_generator, boxed=hp.clip_min is not None)
                outputs = evaluation_outputs(self.net, self.settings(x), x, y, noise)
            else:
                self.check_batch_values(x, y)
                x, y = pad_batch(x, y, self._captured_batch["eval"])  # copies of row 0, left out below
                noise = get_norm(self.norm).start_noise(x, noise_generator, boxed=hp.clip_min is not None)
                with torch.inference_mode(False):  # the graph takes normal tensors (attacks.context)
                    x, y = x.clone(), y.clone()
                    noise = tuple(t.clone() for t in noise)
                    settings = self.settings(x)
                    outputs = self._eval_graph(
                        x.device, (self.net, settings, x, y, noise), restore=self.net,
                        eager=lambda: evaluation_outputs(self.net, settings, x, y, noise))
        metrics = cast(dict[str, MeanMetric], self.eval_metrics[stage])
        for name, metric in metrics.items():
            metric.update(outputs[name][:n])  # the batch's own rows, not the padding
            self.log(f"{stage}/{name}", metric, prog_bar=name != "loss")
        return outputs["avg_eps"][:n].detach()

    # --- host checks and memory format -------------------------------------------------------------------
    def host_checks_for(self, stage: str) -> AbstractContextManager[None]:
        """The attacks' value checks (host syncs) for the first batch of ``stage``, or always with
        ``debug_checks`` (see :func:`mma_lightning.attacks.checks.host_checks`)."""
        enabled = self.hparams.debug_checks or stage not in self._host_checked
        self._host_checked.add(stage)
        return host_checks(enabled)

    def as_input(self, x: Tensor) -> Tensor:
        """``x`` in the backbone's memory format (``channels_last`` for 4-D batches when that option is on)."""
        if self.hparams.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # --- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Optimiser from the factory; the scheduler (if any) stepped per ``scheduler_interval``, on
        ``scheduler_monitor`` when it names one (:func:`~mma_lightning.methods.schedules.lightning_scheduler`)."""
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        config = lightning_scheduler(self.scheduler_factory(optimizer), self.hparams.scheduler_interval,
                                     self.hparams.get("scheduler_monitor"))
        return {"optimizer": optimizer, "lr_scheduler": config}


def has_dropout(net: nn.Module) -> bool:
    """Whether ``net`` holds a dropout layer with ``p > 0`` (its masks come from the global random stream)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())


def evaluation_outputs(net: nn.Module, hp: Any, x: Tensor, y: Tensor, noise: tuple[Tensor, ...]
                       ) -> dict[str, Tensor]:
    """Per-sample ``acc``, ``robust_acc`` (PGD at ``eval_eps``), ``avg_eps`` (the margin estimate) and ``loss``
    (clean CE) of one evaluation batch (the reference's per-epoch evaluation), as a function of tensors (captured
    with ``compile_step``, one graph for every method); ``hp``: the module's settings
    (:meth:`AdversarialModuleLogic.settings`), ``noise``: PGD's random start, drawn from the evaluation generator."""
    logits = net(x)
    res = find_margin(net, x, y, hp.norm, init_eps=hp.eval_eps, max_eps=hp.eval_max_eps,
                      nb_iter=hp.eval_nb_iter, search_steps=hp.eval_search_steps, loss=hp.eval_loss,
                      step_scale=hp.eval_step_scale, clip_min=hp.clip_min, clip_max=hp.clip_max,
                      clean_logits=logits, search=hp.eval_search, start_noise=noise)
    # PGD at eval_eps succeeded iff the bisection's bracket ends at or below eval_eps.
    robust = ~res.success | (res.eps > hp.eval_eps)
    return {"acc": (logits.argmax(1) == y).float(), "robust_acc": robust.float(), "avg_eps": res.eps,
            "loss": F.cross_entropy(logits.float(), y, reduction="none")}


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y)`` or ``(x, y, index)`` -> ``(x, y, index or None)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("batches must be (x, y) or (x, y, index) tuples, "
                         f"got {type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class AdversarialModule(AdversarialModuleLogic, pl.LightningModule):
    """:class:`AdversarialModuleLogic` on pytorch_lightning (the default namespace)."""
