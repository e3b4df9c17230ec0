"""Several training runs of one method and architecture trained together as one stacked model.

One MMA run at the paper's batch size leaves a GPU mostly idle (``docs/gpu-measurements.md``: the step is
launch-bound at batch 128, and batch 512 gives 3.4x the images per second). :class:`PackedModule` trains N runs
of a sweep (seeds, radii, clean-loss weights, learning rates) in one process and one step: each run keeps its own
backbone, optimiser state, learning rate, eps table, random streams and data order (its own datamodule), and the
step runs them all at once with ``torch.func``: the runs' weights are stacked (``torch.stack``, so gradients flow
back to each run's own parameters) and the method's :meth:`~mma_lightning.methods.base.AdversarialModuleLogic.step_loss`
(clean forward, AN-PGD, margin search, loss: the whole step) is ``vmap``-ed over the runs, the backbone being
``torch.func.functional_call`` of one template with each run's weights. The attacks run batched over the runs
(per-run radii and per-sample eps are tensors), with their usual contract: verified points, no host sync, no side
effects. BatchNorm keeps per-run running statistics (stacked buffers, copied back after each step).

Outside the vmapped step everything is each run's own, eagerly: its random draws (AN-PGD's random start from its
generator, seeded from its own seed), its eps-table lookup and update, its metrics (logged as ``run<i>/<name>``),
its validation on its own split. The runs' optimisers are merged into one optimiser with one parameter group per
run group (same class; learning rate and weight decay may differ), so Lightning's automatic optimisation, LR
schedule, checkpointing and resume work unchanged; updates are elementwise per parameter, hence the same as N
separate optimisers.

A run whose loss turns non-finite stops alone: its loss is left out of the pack's (no sync: a device-side
record), the pack reads the records every ``log_every_n_steps`` steps and before every checkpoint, and from then
on the run's updates, eps table and checkpoints stop, with a warning naming it; the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from mma_lightning.attacks.checks import check_in_box, host_checks
from mma_lightning.callbacks.nonfinite import NonFiniteError
from mma_lightning.capture import Captured, GraphSettings
from mma_lightning.methods.base import AdversarialModuleLogic, _unpack
from mma_lightning.methods.random_state import CHECKPOINT_KEY as RANDOM_STREAMS_KEY
from mma_lightning.methods.schedules import lightning_scheduler
from mma_lightning.namespaces import ModuleHost

log = logging.getLogger(__name__)

PACKABLE_HPARAMS = ("max_eps", "min_eps", "clean_loss_coeff", "eps")
"""Method settings that may differ between the runs of a pack (besides seed, learning rate and weight decay):
they change no shape. Every other setting must be the same in every run."""
PACKABLE_OPTIMIZER_SETTINGS = ("lr", "weight_decay", "initial_lr")
PACK_STATE_KEY = "mma_pack"
BATCHINGS = ("auto", "vmap", "loop")


class RunNet:
    """The pack's template backbone with one run's weights (``torch.func.functional_call``): the model the
    method's step and its attacks see inside ``vmap``. ``modules()`` and ``train()`` are the template's, so the
    attacks' mode switches (eval-mode PGD) apply as they do to a backbone of its own. A plain class, not an
    ``nn.Module`` (its weights are arguments of the step, not state)."""

    def __init__(self, template: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        self.template = template
        self.weights = (params, buffers)

    def __call__(self, x: Tensor) -> Tensor:
        """The template's forward with this run's parameters and buffers."""
        return cast(Tensor, functional_call(self.template, self.weights, (x,)))

    def modules(self) -> Any:
        """The template's modules (their ``training`` flags are the pack's)."""
        return self.template.modules()

    def parameters(self) -> Any:
        """The template's parameters (the attacks leave them alone under ``torch.func``)."""
        return self.template.parameters()

    def train(self, mode: bool = True) -> RunNet:
        """Set the template's mode."""
        self.template.train(mode)
        return self

    @property
    def training(self) -> bool:
        """The template's mode."""
        return self.template.training


def _differences(runs: Sequence[AdversarialModuleLogic]) -> dict[str, list[Any]]:
    """The settings whose values differ between ``runs``, each with every run's value."""
    first = dict(runs[0].hparams)
    keys = set(first).union(*(dict(r.hparams) for r in runs[1:]))
    return {k: [r.hparams.get(k) for r in runs] for k in sorted(keys)
            if any(r.hparams.get(k) != first.get(k) for r in runs[1:])}


def check_packable(runs: Sequence[AdversarialModuleLogic]) -> list[str]:
    """``ValueError`` unless ``runs`` can train as one pack: one method class, one norm, backbones with the
    same parameter and buffer names and shapes, and no differing setting outside :data:`PACKABLE_HPARAMS`.
    Returns the names of the packable settings that differ (they enter the step as per-run tensors)."""
    if not runs:
        raise ValueError("runs must hold at least one module, got none")
    for i, run in enumerate(runs):
        if not isinstance(run, AdversarialModuleLogic):
            raise ValueError(f"runs[{i}] must be a method module of mma_lightning (MMAModule, PGDATModule, ...), "
                             f"got {type(run).__name__}")
        if type(run) is not type(runs[0]):
            raise ValueError(f"the runs of a pack must use one method: runs[0] is {type(runs[0]).__name__}, "
                             f"runs[{i}] is {type(run).__name__}")
    shapes = {k: (v.shape, v.dtype) for k, v in runs[0].net.state_dict().items()}
    for i, run in enumerate(runs[1:], start=1):
        if {k: (v.shape, v.dtype) for k, v in run.net.state_dict().items()} != shapes:
            raise ValueError(f"the runs of a pack must share one architecture: runs[{i}]'s backbone "
                             f"({type(run.net).__name__}) has other weights than runs[0]'s "
                             f"({type(runs[0].net).__name__})")
    differing = _differences(runs)
    unpackable = {k: v for k, v in differing.items() if k not in PACKABLE_HPARAMS}
    if unpackable:
        raise ValueError(f"the runs of a pack may differ only in {list(PACKABLE_HPARAMS)} (and seed, learning rate, "
                         f"weight decay); they differ in {unpackable} (one value per run): train those apart")
    for k, values in differing.items():
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{k} must be a number in every run of a pack, got {values}")
    return list(differing)


class PackedModuleLogic(ModuleHost):
    """N runs of one method (each a module of its own: ``MMAModule(...)``, ...) trained as one model.

    Batches are lists of N batches, one per run (:class:`~mma_lightning.packing.data.PackedDataModule`); the
    validation and test loaders are the runs' own, in run order (dataloader ``i`` is run ``i``'s). Metrics are
    logged as ``<name>/<metric>`` (``run0/val/avg_eps``, ...); :class:`~mma_lightning.packing.RunCheckpoint`
    and :class:`~mma_lightning.packing.RunLogger` give each run its own checkpoints and logs.

    Args:
        runs: the runs' modules, built as for separate runs (same class, norm and architecture; they may differ
            in :data:`PACKABLE_HPARAMS`, and their optimiser factories in learning rate and weight decay).
        seeds: each run's seed (its attacks' random stream starts from it, as a separate run's does from
            ``seed_everything``); default: the process's seed for all.
        names: each run's metric prefix (default ``run0``, ``run1``, ...).
        batching: how the step runs the runs: ``"vmap"`` (one batched step over stacked weights: one launch per
            pass for all runs; eval-mode BatchNorm has no ``vmap`` batching rule, so the attacks' forwards of a
            BatchNorm backbone loop over the runs inside it), ``"loop"`` (each run's own step one after another,
            in one process and with the captured step in one graph), or ``"auto"`` (default): ``"loop"``, on
            every device, until a GPU measurement of ``benchmarks/packed.py`` shows ``vmap`` ahead (on a CPU
            batching the runs' convolutions as grouped convolutions is slower than running them apart).
    """

    first_bad_step: Tensor

    def __init__(self, runs: Sequence[AdversarialModuleLogic], seeds: Sequence[int | None] | None = None,
                 names: Sequence[str] | None = None, batching: str = "auto") -> None:
        super().__init__()
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {list(BATCHINGS)}, got {batching!r}")
        self.batching = batching
        self.per_run_hparams = check_packable(runs)
        n = len(runs)
        names = list(names) if names is not None else [f"run{i}" for i in range(n)]
        seeds = list(seeds) if seeds is not None else [None] * n
        if len(names) != n or len(set(names)) != n or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"names must be {n} distinct non-empty strings (one per run), got {names!r}")
        if len(seeds) != n:
            raise ValueError(f"seeds must hold one seed per run ({n}), got {seeds!r}")
        self.runs = nn.ModuleList(runs)
        self.names = names
        for run, name, seed in zip(runs, names, seeds):
            run.__dict__["_pack_host"] = (self, f"{name}/")  # not a submodule: a back reference for run.log
            run.random_streams.seed = seed
        for key in self.per_run_hparams:
            self.register_buffer(f"hp_{key}", torch.tensor([float(r.hparams[key]) for r in runs]), persistent=False)
        self.register_buffer("first_bad_step", torch.full((n,), -1, dtype=torch.long))
        self.stopped: set[int] = set()
        self._groups: list[int] = []  # parameter groups per run in the merged optimiser
        option = runs[0].hparams.get("compile_step", False)  # the same in every run (check_packable)
        self._graphs = {"vmap": Captured(self._stacked_fn, option, "packed step"),
                        "loop": Captured(self._looped_fn, option, "packed step")
                        } if option is not False else None
        self._param_names = [k for k, _ in runs[0].net.named_parameters()]
        self._buffer_names = [k for k, _ in runs[0].net.named_buffers()]

    @property
    def members(self) -> list[AdversarialModuleLogic]:
        """The runs' modules, in run order."""
        return cast(list[AdversarialModuleLogic], list(self.runs))

    @property
    def template(self) -> nn.Module:
        """The backbone whose structure every run shares (the first run's; its own weights are not used)."""
        return self.members[0].net

    def forward(self, x: Tensor) -> Tensor:
        """Logits of every run for one batch ``x``: ``[N, batch, classes]``."""
        return torch.stack([run(x) for run in self.members])

    # --- the stacked step --------------------------------------------------------------------------------
    def stacked_weights(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every run's parameters and buffers stacked along a new first dimension (parameters through
        ``torch.stack``, so a loss of the stacked step differentiates into each run's own parameters)."""
        nets = [dict(run.net.named_parameters()) for run in self.members]
        bufs = [dict(run.net.named_buffers()) for run in self.members]
        params = {k: torch.stack([p[k] for p in nets]) for k in self._param_names}
        buffers = {k: torch.stack([b[k] for b in bufs]) for k in self._buffer_names}
        return params, buffers

    def _run_step(self, params: dict[str, Tensor], buffers: dict[str, Tensor], hp: dict[str, Tensor], x: Tensor,
                  y: Tensor, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        net = RunNet(self.template, params, buffers)
        first = self.members[0]
        return first.step_loss(cast(nn.Module, net), GraphSettings(first.settings().values, hp), x, y, inputs)

    def _stacked_fn(self, params: dict[str, Tensor], buffers: dict[str, Tensor], hp: dict[str, Tensor], x: Tensor,
                    y: Tensor, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        buffers = {k: b.clone() for k, b in buffers.items()}  # updated in place by BatchNorm, returned: no input
        losses, outputs = vmap(self._run_step, randomness="different")(params, buffers, hp, x, y, inputs)
        return losses, outputs, buffers  # of the graph is mutated (CUDA graphs refuse mutated inputs)

    def _looped_fn(self, xs: list[Tensor], ys: list[Tensor], inputs: list[dict[str, Any]]
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        results = [run.step_loss(run.net, run.settings(x), x, y, i) for run, x, y, i in zip(self.members, xs, ys, inputs)]
        return (torch.stack([loss for loss, _ in results]),
                {k: torch.stack([out[k] for _, out in results]) for k in results[0][1]})

    def batching_on(self, device: torch.device) -> str:
        """The batching the step uses on ``device`` (``"auto"``: ``"loop"``)."""
        return "loop" if self.batching == "auto" else self.batching

    def pack_step(self, xs: list[Tensor], ys: list[Tensor], inputs: list[dict[str, Any]]
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every run's step: ``(losses [N], outputs {name: [N, B]})`` from each run's batch and eager inputs,
        by :meth:`batching_on`'s batching; with the runs' ``compile_step`` captured whole
        (:class:`~mma_lightning.capture.Captured`: one graph, CUDA graphs on a GPU), as a separate run's step is."""
        device = xs[0].device
        with host_checks(False):  # the step reads no values (each run's first batch is checked before it)
            if self.batching_on(device) == "loop":
                if self._graphs is None:
                    return self._looped_fn(xs, ys, inputs)
                return cast(tuple[Tensor, dict[str, Tensor]], self._graphs["loop"](
                    device, (xs, ys, inputs), eager=lambda: self._looped_fn(xs, ys, inputs), restore=self,
                    params=[p for p in self.parameters() if p.requires_grad]))
            stacked = tree_map(lambda *ts: torch.stack(ts), *inputs) if inputs[0] else inputs[0]
            return self.stacked_step(torch.stack(xs), torch.stack(ys), stacked)

    def stacked_step(self, x: Tensor, y: Tensor, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``vmap`` batching: ``x [N, B, ...]``, ``y [N, B]``, ``inputs`` stacked likewise ->
        ``(losses [N], outputs {name: [N, B]})``; BatchNorm's running statistics are written back to each run."""
        params, buffers = self.stacked_weights()
        hp = {k: getattr(self, f"hp_{k}").to(x.dtype) for k in self.per_run_hparams}
        with host_checks(False):  # a vmapped step reads no values (the first batch is checked before it)
            if self._graphs is None:
                losses, outputs, buffers = self._stacked_fn(params, buffers, hp, x, y, inputs)
            else:
                losses, outputs, buffers = self._graphs["vmap"](
                    x.device, (params, buffers, hp, x, y, inputs), restore=self,
                    eager=lambda: self._stacked_fn(params, buffers, hp, x, y, inputs),
                    params=[p for p in self.parameters() if p.requires_grad])
        with torch.no_grad():
            for i, run in enumerate(self.members):
                for k, b in run.net.named_buffers():
                    b.copy_(buffers[k][i])
        return losses, outputs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step of every run: each run's eager inputs (random starts, eps lookups), the
        stacked step, each run's eps-table update and logs; the loss is the sum of the live runs' losses."""
        runs = self.members
        if not isinstance(batch, (list, tuple)) or len(batch) != len(runs):
            raise ValueError(f"a pack of {len(runs)} runs takes a list of {len(runs)} batches per step "
                             "(PackedDataModule's training loader), got "
                             f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")
        xs, ys, indices, inputs = [], [], [], []
        for run, run_batch in zip(runs, batch):
            x, y, index = _unpack(run_batch)
            x = run.as_input(x)
            with run.host_checks_for("train"):
                check_in_box(x, run.hparams.clip_min, run.hparams.clip_max, "training")
                inputs.append(run.step_inputs(x, y, index))
                run.check_batch_values(x, y)
            xs.append(x)
            ys.append(y)
            indices.append(index)
        losses, outputs = self.pack_step(xs, ys, inputs)
        self.last_losses = losses.detach()  # each run's loss, for its callbacks' batch hooks (RunCallback)

        step = torch.full((), self.global_step, dtype=torch.long, device=losses.device)
        finite = torch.isfinite(losses.detach())
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step)
        live = finite & (self.first_bad_step < 0)
        for i, (run, name) in enumerate(zip(runs, self.names)):
            if i in self.stopped:
                continue
            run.record_step(indices[i], {k: v[i] for k, v in outputs.items()})
            self.log(f"{name}/train/loss", losses[i].detach(), prog_bar=len(runs) <= 2)
        if self._trainer is not None:
            every = max(1, int(self.trainer.log_every_n_steps))  # type: ignore[attr-defined]
            if self.global_step % every == 0:
                self.check_runs(f"step {self.global_step}")
        return torch.where(live, losses, torch.zeros_like(losses)).sum()

    # --- a run that goes non-finite stops alone ----------------------------------------------------------
    def check_runs(self, when: str) -> None:
        """Read the device-side record of non-finite losses (one host sync) and stop every run that has one:
        a warning names it; its updates, eps table, logs and checkpoints stop. All runs stopped: an error."""
        bad = self.first_bad_step.tolist()
        for i, step in enumerate(bad):
            if step >= 0 and i not in self.stopped:
                self.stopped.add(i)
                log.warning(f"{self.names[i]} ({self.describe_run(i)}): non-finite training loss at step {step} "
                            f"(checked at {when}); this run stops, its last checkpoints are its last good ones; "
                            f"{len(self.runs) - len(self.stopped)} other run(s) go on")
        if len(self.stopped) == len(self.runs):
            raise NonFiniteError(f"every run of the pack had a non-finite training loss (first at steps "
                                 f"{dict(zip(self.names, bad))}, checked at {when}): resume from the last good "
                                 "checkpoints with a lower learning rate")

    def describe_run(self, i: int) -> str:
        """``seed=..., max_eps=...``: what sets run ``i`` apart."""
        run = self.members[i]
        parts = [f"seed={run.random_streams.seed}"] + [f"{k}={run.hparams[k]}" for k in self.per_run_hparams]
        return ", ".join(parts)

    def on_after_backward(self) -> None:
        """Stopped runs get no update (their gradients are dropped: the optimiser leaves them alone)."""
        for i in self.stopped:
            for p in self.members[i].parameters():
                p.grad = None

    def on_train_epoch_end(self) -> None:
        """Look for non-finite runs at every epoch end."""
        self.check_runs("the end of the epoch")

    # --- hooks forwarded to every run ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Attach every run to the pack's trainer (its step count, device and rank are the runs'), and give each
        run's own loggers (a :class:`~mma_lightning.packing.RunLogger` with the run's prefix) its settings, as a
        run that trains alone logs them (``hparams.yaml``)."""
        for run in self.members:
            run.trainer = self.trainer  # type: ignore[assignment]
        for logger in self.trainer.loggers:
            for run, name in zip(self.members, self.names):
                if getattr(logger, "prefix", None) == f"{name}/":
                    logger.log_hyperparams(dict(run.hparams))

    def on_train_start(self) -> None:
        """Each run's own start (MMA sizes its eps table from the data)."""
        for run in self.members:
            run.on_train_start()

    def on_validation_epoch_start(self) -> None:
        """Each run restarts its validation attacks' random stream."""
        for run in self.members:
            run.on_validation_epoch_start()

    def on_test_epoch_start(self) -> None:
        """Each run restarts its test attacks' random stream."""
        for run in self.members:
            run.on_test_epoch_start()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        """Run ``dataloader_idx``'s validation on its own split, logged as ``run<i>/val/...``."""
        if dataloader_idx in self.stopped:
            return None
        return cast(Tensor, self.members[dataloader_idx]._eval_step(batch, "val"))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Run ``dataloader_idx``'s test measures, logged as ``run<i>/test/...``."""
        self.members[dataloader_idx]._eval_step(batch, "test")

    # --- optimisation: the runs' optimisers merged, one parameter group per run group ------------------
    def configure_optimizers(self) -> Any:
        """The runs' optimisers (their own factories) merged into one of the same class; the first run's
        scheduler factory (all runs must have the same one) on it, each group keeping its own learning rate."""
        runs = self.members
        optimizers = [run.optimizer_factory(run.net.parameters()) for run in runs]
        first = optimizers[0]
        settings = {k: v for k, v in first.defaults.items() if k not in PACKABLE_OPTIMIZER_SETTINGS}
        for i, opt in enumerate(optimizers[1:], start=1):
            other = {k: v for k, v in opt.defaults.items() if k not in PACKABLE_OPTIMIZER_SETTINGS}
            if type(opt) is not type(first) or other != settings:
                raise ValueError(f"the runs of a pack may differ in learning rate and weight decay only: "
                                 f"{self.names[0]}'s optimiser is {type(first).__name__}{settings}, "
                                 f"{self.names[i]}'s {type(opt).__name__}{other}")
        self._groups = [len(opt.param_groups) for opt in optimizers]
        for opt in optimizers[1:]:
            for group in opt.param_groups:
                first.add_param_group(group)
        factories = {repr(run.scheduler_factory) for run in runs}
        if len(factories) > 1:
            raise ValueError(f"the runs of a pack must share one LR schedule, got {sorted(factories)}")
        if runs[0].scheduler_factory is None:
            return first
        config = lightning_scheduler(runs[0].scheduler_factory(first), runs[0].hparams.scheduler_interval,
                                     runs[0].hparams.get("scheduler_monitor"))
        if "monitor" in config:
            raise ValueError(f"a scheduler that steps on a metric (monitor {config['monitor']!r}) would step every "
                             "run of a pack on one run's metric: train runs with such a scheduler apart")
        return {"optimizer": first, "lr_scheduler": config}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """The trainer's gradient clipping applied to each run apart (a norm over the pack would mix runs)."""
        if not gradient_clip_val:
            return
        for run in self.members:
            params = [p for p in run.parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def run_param_groups(self, i: int) -> slice:
        """Where run ``i``'s parameter groups sit in the merged optimiser's ``param_groups``."""
        if not self._groups:
            raise RuntimeError("the pack's optimiser is not configured yet (configure_optimizers)")
        start = sum(self._groups[:i])
        return slice(start, start + self._groups[i])

    def run_optimizer_state(self, i: int) -> dict[str, Any] | None:
        """Run ``i``'s share of the merged optimiser's state, as its own optimiser's ``state_dict``."""
        if not self._groups or self._trainer is None or not self.trainer.optimizers:
            return None
        full = self.trainer.optimizers[0].state_dict()
        groups = full["param_groups"][self.run_param_groups(i)]
        ids = [p for g in groups for p in g["params"]]
        renumber = {old: new for new, old in enumerate(ids)}
        return {"state": {renumber[k]: v for k, v in full["state"].items() if k in renumber},
                "param_groups": [{**g, "params": [renumber[p] for p in g["params"]]} for g in groups]}

    # --- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The pack's checkpoint: the process streams and every run's attack stream, and the stopped runs."""
        self.check_runs("a checkpoint")
        runs = self.members
        checkpoint[RANDOM_STREAMS_KEY] = runs[0].random_streams.gathered_state()
        checkpoint[PACK_STATE_KEY] = {"names": list(self.names), "stopped": sorted(self.stopped),
                                      "attack_streams": [run.random_streams.state()["attack"] for run in runs]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue every run's attack stream (and, when fitting, the process streams)."""
        runs = self.members
        runs[0].on_load_checkpoint(checkpoint)
        state = checkpoint.get(PACK_STATE_KEY)
        if state is None:
            return
        if len(state["attack_streams"]) != len(runs):
            raise ValueError(f"the checkpoint holds a pack of {len(state['attack_streams'])} runs, this pack has "
                             f"{len(runs)}")
        self.stopped = set(state["stopped"])
        for run, attack in zip(runs, state["attack_streams"]):
            run.random_streams.load_state({"attack": attack}, restore_global=False)

    def run_checkpoint(self, i: int) -> dict[str, Any] | None:
        """Run ``i`` alone as a Lightning checkpoint its own class loads (``MMAModule.load_from_checkpoint``,
        ``mma-eval``): its weights and eps table, settings, step, random stream and optimiser state; ``None``
        for a stopped run (no checkpoint after a non-finite loss)."""
        self.check_runs("a checkpoint")
        if i in self.stopped:
            return None
        run = self.members[i]
        return {"state_dict": run.state_dict(), "hyper_parameters": dict(run.hparams),
                "epoch": self.current_epoch, "global_step": self.global_step,
                "pytorch-lightning_version": pl.__version__, RANDOM_STREAMS_KEY: [run.random_streams.state()],
                "optimizer_states": [s for s in [self.run_optimizer_state(i)] if s is not None],
                PACK_STATE_KEY: {"name": self.names[i], "run": i, "runs": len(self.runs)}}


# The pytorch_lightning class: the namespace-free logic above on pytorch_lightning's LightningModule
# (mma_lightning.lightning.packing has it on lightning.pytorch's).
class PackedModule(PackedModuleLogic, pl.LightningModule):
    """:class:`PackedModuleLogic` on pytorch_lightning (the default namespace)."""
