"""``compile=True``: the backbone under ``torch.compile`` trains and validates without recompiling.

Every forward of a step (clean, PGD steps, search forwards, mixed batch) and of validation keeps the full
batch's shape; the variants dynamo needs (train / eval mode, with / without autograd, input gradient or not)
are all met in the first training step and the first validation pass. After that warm-up, further steps and
train/eval switches must not compile anything new: counted with ``torch._dynamo``'s counters. The backend is
``"eager"`` (dynamo's tracing and guards, no code generation), so the test stays fast on CPU; the guards, and
so the recompiles, are the same under inductor.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch._dynamo.utils import counters

from mma_lightning import MMAModule, PGDATModule
from mma_lightning.data import TensorDataModule
from mma_lightning.methods.base import AdversarialModule

FAST_EVAL = dict(eval_eps=0.1, eval_nb_iter=2, eval_search_steps=2)
EAGER = {"backend": "eager"}


def conv_net() -> nn.Module:
    """A tiny CNN with BatchNorm, so train and eval mode are different graphs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def compiled_counts() -> tuple[int, int]:
    """(graphs compiled, frames dynamo compiled) so far."""
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


class CountsAfterFirstValidation(pl.Callback):
    """Records the compile counters once the first training step and the first validation pass ran."""

    def __init__(self) -> None:
        self.after_warmup: tuple[int, int] | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.after_warmup is None:
            self.after_warmup = compiled_counts()


MODULES = {
    "mma": lambda: MMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2, compile=EAGER,
                             **FAST_EVAL),
    "omma": lambda: MMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2,
                              clean_loss_coeff=0.0, compile=EAGER, **FAST_EVAL),
    "pgd_at": lambda: PGDATModule(conv_net(), eps=0.1, nb_iter=2, compile=EAGER, **FAST_EVAL),
}


@pytest.mark.parametrize("method", sorted(MODULES))
def test_no_recompiles_after_warmup_across_steps_and_train_eval_switches(method: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    module: AdversarialModule = MODULES[method]()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = TensorDataModule(x, y, val_size=32, batch_size=16)  # 2 train and 2 val batches of 16 per epoch
    counts = CountsAfterFirstValidation()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, val_check_interval=1, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[counts])
    trainer.fit(module, data)
    assert counts.after_warmup is not None and counts.after_warmup[0] >= 2  # train and eval graphs at least
    # 6 steps, 6 validation passes, 3 epochs after the warm-up: nothing new compiled.
    assert compiled_counts() == counts.after_warmup, (compiled_counts(), counts.after_warmup)
    print(f"{method}: {counts.after_warmup[0]} graphs after warm-up, {compiled_counts()[0]} at the end")
    # the module's state dict keys are the backbone's own (compiled in place: no "_orig_mod." prefix)
    assert all("_orig_mod" not in k for k in module.state_dict())


def test_compiled_backbone_trains_under_the_lightning_namespace_trainer() -> None:
    """The same option on ``mma_lightning.lightning.MMAModule`` with a ``lightning.pytorch.Trainer``."""
    L = pytest.importorskip("lightning.pytorch")
    from mma_lightning.lightning import MMAModule as LightningMMAModule
    from mma_lightning.lightning.data import TensorDataModule as LightningTensorDataModule

    torch._dynamo.reset()
    counters.clear()
    module = LightningMMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2, compile=EAGER,
                                **FAST_EVAL)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, LightningTensorDataModule(x, y, val_size=16, batch_size=16))
    assert trainer.global_step == 3 and compiled_counts()[0] >= 2


def test_compile_must_be_a_bool_or_torch_compile_arguments() -> None:
    with pytest.raises(ValueError, match="compile must be a bool or a dict of torch.compile arguments"):
        PGDATModule(conv_net(), compile="inductor")


def test_attack_freezes_parameters_only_while_it_runs() -> None:
    """pgd runs with frozen parameters (a compiled backward then computes the input gradient alone) and gives
    every parameter its own requires_grad flag back (a layer the user froze stays frozen); no .grad."""
    from mma_lightning.attacks import pgd

    net = conv_net()
    net[0].weight.requires_grad_(False)
    seen: list[bool] = []
    net[4].register_forward_pre_hook(lambda m, args: seen.append(m.weight.requires_grad))
    pgd(net, torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0]), eps=0.1, nb_iter=2)
    assert seen == [False, False]
    assert [p.requires_grad for p in net.parameters()] == [False] + [True] * (len(list(net.parameters())) - 1)
    assert all(p.grad is None for p in net.parameters())
