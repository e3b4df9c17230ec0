"""Each run of a pack gets its own logs, as if it had trained alone.

A pack logs every run's metrics under the run's prefix (``run0/train/loss``, ``run1/val/avg_eps``, ...).
:class:`RunLogger` wraps any Lightning logger of one run (its CSV or TensorBoard logger, writing into the run's
directory) and hands it only that run's metrics, with the prefix taken off: the run's ``metrics.csv`` and event
files hold ``train/loss``, ``val/avg_eps``, ... as a separate run's do.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from pytorch_lightning.loggers import Logger


class RunLoggerLogic:
    """A run's logger inside a pack: ``logger`` receives the metrics named ``<prefix><name>`` as ``<name>``
    (plus ``epoch``); everything else (hyperparameters, saving, finalising, its directories) is ``logger``'s."""

    def __init__(self, logger: Any, prefix: str) -> None:
        if not prefix:
            raise ValueError("prefix must name the run's metrics (e.g. 'run0/'), got an empty string")
        super().__init__()
        self.logger = logger
        self.prefix = prefix

    @property
    def name(self) -> str | None:
        """The wrapped logger's name."""
        return self.logger.name

    @property
    def version(self) -> int | str | None:
        """The wrapped logger's version."""
        return self.logger.version

    @property
    def save_dir(self) -> str | None:
        """The wrapped logger's folder."""
        return self.logger.save_dir

    @property
    def log_dir(self) -> str | None:
        """The wrapped logger's log folder."""
        return getattr(self.logger, "log_dir", None)

    @property
    def experiment(self) -> Any:
        """The wrapped logger's experiment object."""
        return self.logger.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """This run's metrics, without the prefix."""
        own = {k[len(self.prefix):]: v for k, v in metrics.items() if k.startswith(self.prefix)}
        if own:
            if "epoch" in metrics:
                own["epoch"] = metrics["epoch"]
            self.logger.log_metrics(own, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters go to the wrapped logger as they are (each run logs its own config)."""
        self.logger.log_hyperparams(params, *args, **kwargs)

    def save(self) -> None:
        """Save the wrapped logger."""
        self.logger.save()

    def finalize(self, status: str) -> None:
        """Finalise the wrapped logger."""
        self.logger.finalize(status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Tell the wrapped logger, when the checkpoint is this run's."""
        self.logger.after_save_checkpoint(checkpoint_callback)


class RunLogger(RunLoggerLogic, Logger):
    """:class:`RunLoggerLogic` on pytorch_lightning's ``Logger`` (the default namespace)."""
