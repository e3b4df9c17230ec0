"""Pictures of the margins while training, at no extra attack cost: after each validation, the histogram of
MMA's per-sample eps table (the margin each training sample was last trained at) and of the validation margin
estimates (the bisection margins the validation step computes anyway), so a user sees the margins grow
(Ding et al., ICLR 2020, Sec. 3: MMA maximises the per-sample margin).

Logged to every TensorBoard logger as histograms (``margins/eps_table``, ``margins/val``) and one figure
(``margins/distributions``), and written as ``margins/margins-step<step>.png`` beside the checkpoint folder
(``<run>/margins/`` for ``mma-train``; the checkpoint folder holds checkpoints only).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure  # no pyplot: no display or global figure state needed
from matplotlib.patches import Patch
from torch import Tensor

from mma_lightning.evaluation.atomic import write_atomically
from mma_lightning.namespaces import CallbackHost, lightning_types


class MarginPlotsLogic(CallbackHost):
    """After each validation (not the sanity check), the eps-table and validation-margin histograms.

    The validation margins are the per-sample outputs of the module's ``validation_step`` (a 1-D tensor, as
    :class:`~mma_lightning.methods.AdversarialModule` returns), gathered over all ranks; the eps table is
    ``pl_module.eps_store.eps`` when the module has one (MMA), the same on every rank.

    Args:
        bins: histogram bins over ``[0, max]`` (``max``: the module's ``max_eps`` for the table and
            ``eval_max_eps`` for the validation margins, when present).
        png: also write the figure as ``margins-step<global_step>.png`` in a ``margins`` folder beside the
            checkpoint folder (in the trainer's ``default_root_dir`` without a checkpoint callback).
        tag: prefix of the TensorBoard tags.
    """

    def __init__(self, bins: int = 30, png: bool = True, tag: str = "margins") -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        self.bins = bins
        self.png = png
        self.tag = tag
        self._margins: list[Tensor] = []
        self.last_png: Path | None = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start collecting this validation's margins."""
        self._margins = []

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """Keep the batch's per-sample margins (on the device: no host sync here)."""
        if torch.is_tensor(outputs) and outputs.dim() == 1:
            self._margins.append(outputs.detach())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Gather the margins, then (rank zero) log the histograms and the figure, and write the PNG."""
        if trainer.sanity_checking or not self._margins:
            return
        margins = pl_module.all_gather(torch.cat(self._margins)).flatten().float().cpu()
        self._margins = []
        store = getattr(pl_module, "eps_store", None)
        table = store.eps.detach().float().cpu() if store is not None and len(store) else None
        seen = getattr(store, "seen", None) if table is not None else None
        seen = seen.detach().cpu() if seen is not None else None
        if not trainer.is_global_zero:
            return
        hparams = getattr(pl_module, "hparams", {})
        fig = margin_distributions_figure(margins, table, bins=self.bins, seen=seen,
                                          eval_eps=hparams.get("eval_eps"),
                                          margin_max=getattr(pl_module, "eval_max_eps", None),
                                          table_max=hparams.get("max_eps"), step=trainer.global_step)
        board_type = lightning_types("loggers.TensorBoardLogger")
        for board in (lg for lg in trainer.loggers if isinstance(lg, board_type)):
            writer = board.experiment  # type: ignore[attr-defined]
            writer.add_histogram(f"{self.tag}/val", margins, global_step=trainer.global_step)
            if table is not None:
                visited = table if seen is None else table[seen]
                if visited.numel():
                    writer.add_histogram(f"{self.tag}/eps_table", visited, global_step=trainer.global_step)
            writer.add_figure(f"{self.tag}/distributions", fig, global_step=trainer.global_step, close=False)
        if self.png:
            callback = trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None)
            folder = (Path(dirpath).parent if dirpath else Path(trainer.default_root_dir)) / "margins"
            self.last_png = _save_png(fig, folder / f"margins-step{trainer.global_step:06d}.png")
        fig.clear()


def margin_distributions_figure(margins: Tensor, table: Tensor | None, *, bins: int = 30,
                                eval_eps: float | None = None, margin_max: float | None = None,
                                table_max: float | None = None, step: int | None = None,
                                seen: Tensor | None = None) -> Figure:
    """Histograms of the validation margin estimates and (when given) of MMA's eps table, side by side.

    The table panel draws the samples visited so far (``seen``; all when ``None``): early in training most
    entries are unvisited zeros. Each panel names its two spikes: at 0 the misclassified samples (margin 0:
    the reference stores 0 for a wrong sample), at the top the samples whose search found no boundary below
    its cap (the validation search's ``margin_max``; the training search's ``1.05 * max_eps``)."""
    panels = 2 if table is not None else 1
    fig = Figure(figsize=(5.5 * panels, 3.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    values = margins.numpy()
    top = max(float(margin_max or 0.0), float(values.max(initial=0.0)), 1e-12)
    ax.hist(values, bins=np.linspace(0.0, top, bins + 1), color="tab:blue")
    if eval_eps is not None:
        ax.axvline(eval_eps, color="black", linestyle="--", label=f"eval eps {eval_eps:.4g}")
    _name_spikes(ax, values, top, capped=margin_max is not None)
    ax.set(title=f"validation margins (n={values.size}, mean {values.mean():.4g})", xlabel="margin estimate",
           ylabel="samples")
    if table is not None:
        ax = axes[1]
        eps = (table if seen is None else table[seen]).numpy()
        top = max(float(table_max or 0.0), float(eps.max(initial=0.0)), 1e-12)
        ax.hist(eps, bins=np.linspace(0.0, top, bins + 1), color="tab:orange")
        _name_spikes(ax, eps, top, capped=True)
        visited = f"{eps.size} of {table.numel()} seen" if seen is not None else f"n={eps.size}"
        mean = f", mean {eps.mean():.4g}" if eps.size else ""
        ax.set(title=f"MMA eps table ({visited}{mean})", xlabel="training eps", ylabel="samples")
    if step is not None:
        fig.suptitle(f"step {step}")
    return fig


def _name_spikes(ax: Any, values: np.ndarray, top: float, capped: bool) -> None:
    """A legend naming the spike at 0 (misclassified) and, for a capped search, the one at the cap."""
    handles, labels = ax.get_legend_handles_labels()
    at_zero = int((values <= 0).sum())
    if at_zero:
        handles.append(Patch(color="none"))
        labels.append(f"at 0: {at_zero} misclassified")
    at_cap = int((values >= top * (1 - 1e-6)).sum()) if capped else 0
    if at_cap:
        handles.append(Patch(color="none"))
        labels.append(f"at {top:.3g}: {at_cap} with no boundary below the search cap")
    if handles:
        ax.legend(handles, labels, loc="upper center", fontsize="x-small")


def _save_png(fig: Figure, path: Path) -> Path:
    """Write the PNG whole or not at all (:func:`~mma_lightning.evaluation.atomic.write_atomically`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())
    return path


# The pytorch_lightning class: the namespace-free logic above on pytorch_lightning's base class
# (mma_lightning.lightning.evaluation builds the lightning.pytorch one from the same logic class).
class MarginPlots(MarginPlotsLogic, pl.Callback):
    """:class:`MarginPlotsLogic` on pytorch_lightning (the default namespace)."""
