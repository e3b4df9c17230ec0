"""A Lightning callback that tracks robustness during training: a cheap version of the evaluation protocol
every N epochs, logged as scalars (any logger: TensorBoard, CSV, ...) and, for TensorBoard, as figures of the
robust-accuracy curve and the margin histogram (the quantity MMA training maximises; Ding et al., ICLR 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import nn

from mma_lightning.evaluation.batches import EvalData, check_positive_int
from mma_lightning.evaluation.margins import MarginEstimates, estimate_margins
from mma_lightning.evaluation.plots import margin_histogram_figure, robust_accuracy_figure
from mma_lightning.evaluation.protocol import check_eps_grid
from mma_lightning.evaluation.robustness import (
    RobustnessResult,
    check_losses,
    check_norm,
    check_step_fraction,
    robust_accuracy,
)
from mma_lightning.namespaces import CallbackHost, lightning_types


class RobustnessCallbackLogic(CallbackHost):
    """Every ``every_n_epochs`` training epochs, PGD robust accuracy over ``eps_grid`` and margin estimates on
    the first ``max_samples`` validation points.

    Logged (``prefix`` = ``"robust"``): ``robust/clean_acc``, ``robust/acc@<eps>`` per eps,
    ``robust/avg_robust_acc``, and with ``margins``: ``robust/margin_mean``, ``robust/margin_median``. With a
    ``TensorBoardLogger``, also the figures ``robust/curve`` and ``robust/margins``. The latest results stay
    in :attr:`last_result` and :attr:`last_margins`.

    Args:
        eps_grid: radii of the check (e.g. ``MNIST_LINF_EPS``).
        every_n_epochs: run after every N-th training epoch.
        max_samples: number of validation points (cheap by default).
        norm: threat model; default the module's ``norm`` attribute (``AdversarialModule`` has one).
        data: evaluation data (as :func:`robust_accuracy`); default the trainer's validation dataloader.
        nb_iter, restarts, losses, step_fraction: the PGD attack (cheaper than the paper's protocol);
            ``step_fraction=None`` fits the step to ``nb_iter`` (:func:`fit_step_fraction`), so the cheap
            attack still reaches the ball's surface.
        margins: also estimate per-sample margins (one search from the middle eps, ``margin_nb_iter`` steps,
            over ``[0, margin_max_eps]``, default twice the largest eps).

    The attacked network is ``pl_module.net`` when the module has one (``AdversarialModule``), else the
    module itself.
    The data box is the module's ``hparams.clip_min / clip_max`` when present, else ``[0, 1]``.
    """

    def __init__(
        self,
        eps_grid: Sequence[float],
        every_n_epochs: int = 1,
        max_samples: int = 256,
        *,
        norm: str | None = None,
        data: EvalData | None = None,
        nb_iter: int = 20,
        restarts: int = 1,
        losses: Sequence[str] = ("ce",),
        step_fraction: float | None = None,
        margins: bool = True,
        margin_max_eps: float | None = None,
        margin_nb_iter: int = 20,
        margin_search_steps: int = 10,
        batch_size: int = 256,
        seed: int = 0,
        prefix: str = "robust",
    ) -> None:
        super().__init__()
        self.eps_grid = check_eps_grid(eps_grid)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("max_samples", max_samples)
        check_positive_int("nb_iter", nb_iter)
        check_positive_int("restarts", restarts)
        check_positive_int("margin_nb_iter", margin_nb_iter)
        check_positive_int("margin_search_steps", margin_search_steps)
        self.norm = None if norm is None else check_norm(norm)
        self.losses = check_losses(losses)
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.data = data
        self.nb_iter = nb_iter
        self.restarts = restarts
        self.step_fraction = None if step_fraction is None else check_step_fraction("step_fraction",
                                                                                  step_fraction)
        self.margins = margins
        self.margin_max_eps = 2 * self.eps_grid[-1] if margin_max_eps is None else margin_max_eps
        self.margin_nb_iter = margin_nb_iter
        self.margin_search_steps = margin_search_steps
        self.batch_size = batch_size
        self.seed = seed
        self.prefix = prefix
        self.last_result: RobustnessResult | None = None
        self.last_margins: MarginEstimates | None = None

    def _data(self, trainer: pl.Trainer) -> EvalData:
        if self.data is not None:
            return self.data
        loaders = trainer.val_dataloaders
        datamodule = getattr(trainer, "datamodule", None)
        if loaders is None and datamodule is not None:
            loaders = datamodule.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError("RobustnessCallback needs data: pass data=... or give the Trainer "
                             "validation data")
        return loaders

    def _norm(self, pl_module: pl.LightningModule) -> str:
        norm = self.norm or getattr(pl_module, "norm", None)
        if norm is None:
            raise ValueError("RobustnessCallback needs norm='linf' or 'l2' (the module has no `norm` "
                             "attribute)")
        return check_norm(norm)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the check after every ``every_n_epochs``-th epoch and log it."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        net: nn.Module = getattr(pl_module, "net", pl_module)
        hparams: Any = getattr(pl_module, "hparams", {})
        box = {"clip_min": hparams.get("clip_min", 0.0), "clip_max": hparams.get("clip_max", 1.0)}
        norm, data = self._norm(pl_module), self._data(trainer)
        common: dict[str, Any] = {"batch_size": self.batch_size, "max_samples": self.max_samples,
                                  "seed": self.seed}
        result = robust_accuracy(net, data, norm, self.eps_grid, nb_iter=self.nb_iter, restarts=self.restarts,
                                 losses=self.losses, step_fraction=self.step_fraction, **box, **common)
        metrics = {f"{self.prefix}/clean_acc": result.clean_accuracy,
                   f"{self.prefix}/avg_robust_acc": result.avg_robust_accuracy}
        metrics.update({f"{self.prefix}/acc@{eps:.4g}": acc for eps, acc in zip(result.eps_grid,
                                                                                result.robust_accuracy)})
        estimates = None
        if self.margins:
            start = min(self.eps_grid[len(self.eps_grid) // 2], self.margin_max_eps)
            estimates = estimate_margins(net, data, norm, self.margin_max_eps, init_eps=start,
                                         nb_iter=self.margin_nb_iter, search_steps=self.margin_search_steps,
                                         losses=self.losses[:1], **box, **common)
            summary = estimates.summary()
            metrics.update({f"{self.prefix}/margin_mean": summary.mean,
                            f"{self.prefix}/margin_median": summary.median})
        for name, value in metrics.items():  # the same on every rank: the outcomes were gathered
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self.last_result, self.last_margins = result, estimates
        if trainer.is_global_zero:
            self._log_figures(trainer, result, estimates)

    def _log_figures(self, trainer: pl.Trainer, result: RobustnessResult,
                     estimates: MarginEstimates | None) -> None:
        board_type = lightning_types("loggers.TensorBoardLogger")
        boards = [lg for lg in trainer.loggers if isinstance(lg, board_type)]
        if not boards:
            return
        epoch = f"epoch {trainer.current_epoch}"
        figures = {f"{self.prefix}/curve": robust_accuracy_figure({epoch: result})}
        if estimates is not None:
            figures[f"{self.prefix}/margins"] = margin_histogram_figure({epoch: estimates}, self.eps_grid)
        for board in boards:
            for tag, fig in figures.items():
                board.experiment.add_figure(tag, fig, global_step=trainer.global_step,  # type: ignore[attr-defined]
                                            close=False)


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class RobustnessCallback(RobustnessCallbackLogic, pl.Callback):
    """:class:`RobustnessCallbackLogic` on pytorch_lightning (the default namespace)."""
