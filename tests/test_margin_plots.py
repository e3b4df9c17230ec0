"""MarginPlots: the eps table's and the validation margins' histograms after each validation, to TensorBoard
and as PNGs next to the checkpoints, from what the module computed anyway (no extra attack)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from mma_lightning import MMAModule
from mma_lightning.data import TensorDataModule
from mma_lightning.evaluation import MarginPlots


def blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    noise = 0.1 * torch.randn(n, 1, 4, 4, generator=g)
    x = (0.5 + 0.3 * (y.view(-1, 1, 1, 1).float() - 1) + noise).clamp(0, 1)
    return x, y


class CountingMargins(MarginPlots):
    """Counts the histograms it logs and the margins they hold."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.sizes.append(int(sum(m.numel() for m in self._margins)))
        super().on_validation_epoch_end(trainer, pl_module)


def test_histograms_and_pngs_after_each_validation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = blobs(72)
    dm = TensorDataModule(x[:48], y[:48], x_val=x[48:], y_val=y[48:], batch_size=8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    module = MMAModule(net, max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=3, eval_eps=0.05,
                       eval_nb_iter=2, eval_search_steps=3, optimizer=partial(torch.optim.Adam, lr=1e-2))
    plots = CountingMargins(bins=10)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/avg_eps", mode="max")
    board = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[plots, ckpt], logger=board,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer.fit(module, datamodule=dm)
    # two validations (the sanity check draws nothing), each over all 24 validation samples
    assert plots.sizes == [24, 24]
    pngs = sorted((tmp_path / "margins").glob("margins-step*.png"))  # beside the checkpoint folder
    assert [p.name for p in pngs] == ["margins-step000006.png", "margins-step000012.png"]
    assert plots.last_png == pngs[-1] and pngs[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(board.log_dir, size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    assert {"margins/val", "margins/eps_table"} <= set(events.Tags()["histograms"])
    assert "margins/distributions" in events.Tags()["images"]
    table = events.Histograms("margins/eps_table")[-1].histogram_value
    assert table.num == 48 and table.max <= 0.2 + 1e-6  # the whole eps table, within [0, max_eps]


def test_bad_bins_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bins must be a positive int"):
        MarginPlots(bins=0)


def test_the_eps_table_panel_draws_the_seen_samples_and_names_the_spikes() -> None:
    """Early in training most of the table is unvisited zeros: only the visited samples are drawn; the
    spikes at 0 (misclassified) and at the search cap are named in each panel."""
    from mma_lightning.evaluation.margin_plots import margin_distributions_figure
    from mma_lightning.methods.eps_store import EpsStore

    store = EpsStore(1000)
    store.update(torch.arange(10), torch.tensor([0.0, 0.0, 0.1, 0.2, 0.3, 0.3, 0.315, 0.315, 0.315, 0.05]))
    assert int(store.seen.sum()) == 10
    margins = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2, 0.6, 0.6])
    fig = margin_distributions_figure(margins, store.eps, seen=store.seen, eval_eps=0.1, margin_max=0.6,
                                      table_max=0.3)
    val, table = fig.axes
    assert table.get_title() == "MMA eps table (10 of 1000 seen, mean 0.1895)"
    assert sum(p.get_height() for p in table.patches) == 10  # the seen samples only, the cap's bin included
    val_labels = [t.get_text() for t in val.get_legend().get_texts()]
    assert val_labels == ["eval eps 0.1", "at 0: 3 misclassified", "at 0.6: 2 with no boundary below the search cap"]
    table_labels = [t.get_text() for t in table.get_legend().get_texts()]
    assert table_labels == ["at 0: 2 misclassified", "at 0.315: 3 with no boundary below the search cap"]


def test_a_checkpoint_without_the_seen_mask_loads() -> None:
    from mma_lightning.methods.eps_store import EpsStore

    store = EpsStore()
    store.load_state_dict({"eps": torch.tensor([0.0, 0.2, 0.0, 0.1])})  # saved before ``seen`` existed
    assert store.seen.tolist() == [False, True, False, True]
