"""MMA training as a LightningModule (Ding et al., "MMA Training: Direct Input Space Margin Maximization
through Adversarial Training", ICLR 2020, arXiv 1812.02637).

One training step, as the reference ``mma_training`` does it (docs/mma-algorithm.md, "One training step"):

1. clean forward of the whole batch, ``L_clean`` = mean cross-entropy;
2. a row is "correct" iff its soft logit margin SLM < 0 (stricter than argmax == y);
3. for the correct rows, AN-PGD from each sample's remembered eps, ``max(min_eps, stored eps)``, then a
   bisection over ``[0, 1.05 * max_eps]`` gives eps* and the boundary point (:func:`find_margin`);
4. forward of the mixed batch (boundary points for correct rows, clean points for the others);
5. ``L_mma = (sum_{correct, eps* < max_eps} CE(boundary) + sum_{wrong} CE(clean)) / B``;
6. loss ``(1 - c) * L_mma + c * L_clean``, c = ``clean_loss_coeff`` (1/3 "MMA", 0 "OMMA");
7. store eps* for the correct rows and 0 for the others.

The whole update is the one scalar returned by ``training_step``: no model copy, no manual optimisation.
The search is batched over the full batch with masks, so DDP ranks always run the same collectives.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from mma_lightning.attacks import find_margin, get_norm, soft_logit_margin
from mma_lightning.attacks.checks import check_positive_int
from mma_lightning.attacks.losses import SUCCESS_TESTS
from mma_lightning.attacks.margin import check_search
from mma_lightning.methods.base import AdversarialModule, AdversarialModuleLogic, SkeletonKwargs
from mma_lightning.methods.eps_store import EpsStore

SEARCH_UPPER_FACTOR = 1.05  # the reference searches [0, 1.05 * d_max]


class MMAModuleLogic(AdversarialModuleLogic):
    """Max-Margin Adversarial training around any backbone; training batches are ``(x, y, index)``.

    Example:
        >>> import torch
        >>> from mma_lightning import MMAModule
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        >>> module = MMAModule(net, norm="linf", max_eps=0.45, min_eps=0.1, nb_iter=40, eval_eps=0.3)
        >>> module.hparams.clean_loss_coeff
        0.3333333333333333

    Args:
        net: the backbone, inputs in ``[clip_min, clip_max]`` (normalisation inside it), outputs logits.
        norm: ``"linf"`` or ``"l2"``.
        max_eps: d_max, the hinge: samples with eps* >= d_max leave the margin loss ("MMA-d").
        min_eps: the smallest starting eps of AN-PGD (reference: 0.1 MNIST Linf, 0.005 CIFAR10 Linf).
        nb_iter: PGD steps K of the margin search (reference: 40 MNIST, 10 CIFAR10).
        search_steps: bisection steps S (reference: 10).
        clean_loss_coeff: c in ``(1 - c) * L_mma + c * L_clean``; 1/3 is MMA, 0 is OMMA.
        step_scale: PGD step size ``step_scale * eps / nb_iter`` (reference: 2.5).
        attack_success: ``"slm"`` (reference: SLM >= 0 during training) or ``"argmax"``.
        search_train_mode: run the bisection in train mode as the reference does (BatchNorm statistics of
            the batch; running stats updated by every search forward). Default: eval mode.
        search: the margin search after AN-PGD, ``"bisection"`` (the reference; the paper presets) or
            ``"refined"`` (tighter margins for a small extra cost; see :func:`~mma_lightning.attacks.find_margin`).
        root_steps, refine_steps: the ``"refined"`` search's budget (root-finder forwards along the PGD ray;
            forward/backward steps after it: one linearised boundary step, then FMN steps);
            ``root_steps=5, refine_steps=0`` is the cheap budget (the
            root-finder alone, half the bisection's search forwards).
        num_train_samples: size of the eps table; by default taken from the datamodule's
            ``num_train_samples`` or the training dataset's length when training starts.
        **kwargs: the shared settings (optimizer, scheduler, eval_*, box) of ``AdversarialModule``;
            ``eval_max_eps`` defaults to the training search's upper end ``1.05 * max_eps``.
    """

    train_stat_names = ("acc", "clean_loss", "avg_eps", "hinged_frac", "correct_frac")

    def __init__(
        self,
        net: nn.Module,
        norm: str = "linf",
        max_eps: float = 0.45,
        min_eps: float = 0.1,
        nb_iter: int = 40,
        search_steps: int = 10,
        clean_loss_coeff: float = 1.0 / 3.0,
        step_scale: float = 2.5,
        attack_success: str = "slm",
        search_train_mode: bool = False,
        search: str = "bisection",
        root_steps: int = 3,
        refine_steps: int = 6,
        num_train_samples: int | None = None,
        **kwargs: Unpack[SkeletonKwargs],
    ) -> None:
        if not (0 < min_eps <= max_eps):
            raise ValueError(f"min_eps and max_eps must satisfy 0 < min_eps <= max_eps, "
                             f"got min_eps={min_eps!r}, max_eps={max_eps!r}")
        if not 0.0 <= clean_loss_coeff <= 1.0:
            raise ValueError(f"clean_loss_coeff must be in [0, 1] (1/3: MMA, 0: OMMA), got {clean_loss_coeff!r}")
        if attack_success not in SUCCESS_TESTS:
            raise ValueError(f"attack_success must be one of {list(SUCCESS_TESTS)}, got {attack_success!r}")
        check_positive_int("nb_iter", nb_iter)
        check_positive_int("search_steps", search_steps)
        check_search(search, root_steps, refine_steps, search_train_mode)
        if search_train_mode and kwargs.get("compile_step", False) is not False:
            raise ValueError("compile_step needs search_train_mode=False: the reference's train-mode search "
                             "forwards the correctly classified rows only, a batch of data-dependent size that "
                             "a captured graph cannot hold")
        if num_train_samples is not None and num_train_samples < 1:
            raise ValueError(f"num_train_samples must be a positive integer or None, got {num_train_samples!r}")
        super().__init__(net, norm=norm, **kwargs)
        self.eps_store = EpsStore(num_train_samples or 0)
        self._index_checked = False

    def default_eval_max_eps(self) -> float:
        """The validation margin search spans the training search: ``max(eval_eps, 1.05 * max_eps)``."""
        return max(self.hparams.eval_eps, SEARCH_UPPER_FACTOR * self.hparams.max_eps)

    # --- the eps table's size: from the data, or from a checkpoint (EpsStore resizes itself on load) ----
    def on_train_start(self) -> None:
        """Size the eps table from the training data (kept as is when restored from a checkpoint)."""
        n = self.hparams.num_train_samples or _num_train_samples(self.trainer)
        if len(self.eps_store) == 0:
            self.eps_store.resize(n)
        elif len(self.eps_store) != n:
            raise ValueError(f"the eps table holds {len(self.eps_store)} samples but the training set has {n}: "
                             "num_train_samples must match the training data of the checkpoint")

    # --- the MMA step ---------------------------------------------------------------------------------------
    def step_inputs(self, x: Tensor, y: Tensor, index: Tensor | None) -> dict[str, Any]:
        """Before the step (eagerly): each sample's starting eps from the eps table, ``max(min_eps, stored)``
        (reference step 3a), and AN-PGD's random start drawn from the module's generator."""
        if index is None:
            raise ValueError("MMAModule needs training batches (x, y, index) (each sample's index keys its eps): "
                             "wrap an (x, y) datamodule as mma_lightning.data.with_index(datamodule), or a "
                             "dataset in mma_lightning.data.IndexedDataset")
        if len(self.eps_store) == 0:
            raise ValueError("the eps table is empty: pass num_train_samples=... or train through a Trainer "
                             "(it is sized from the training data in on_train_start)")
        if not self._index_checked:
            self.eps_store.check_index(index)
            self._index_checked = True
        hp = self.hparams
        init_eps = self.eps_store.lookup(index).to(x.dtype).clamp(min=hp.min_eps,
                                                                  max=SEARCH_UPPER_FACTOR * hp.max_eps)
        noise = get_norm(self.norm).start_noise(x, self.attack_generator, boxed=hp.clip_min is not None)
        return {"init_eps": init_eps, "start_noise": noise}

    def step_loss(self, net: nn.Module, hp: Any, x: Tensor, y: Tensor,
                  inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(1 - c) * L_mma + c * L_clean`` for one batch (reference steps 1-6); ``outputs["new_eps"]`` is what
        :meth:`record_step` stores in the eps table (step 7)."""
        upper = SEARCH_UPPER_FACTOR * hp.max_eps
        c = hp.clean_loss_coeff
        # OMMA (c = 0): the clean loss has no weight, so its forward builds no graph (no wasted backward).
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (isinstance(c, float) and c == 0)):
            logits = net(x)
        clean_ce = F.cross_entropy(logits.float(), y, reduction="none")
        correct = (soft_logit_margin(logits.detach(), y) < 0)

        res = find_margin(net, x, y, self.norm, init_eps=inputs["init_eps"], max_eps=upper, nb_iter=hp.nb_iter,
                          search_steps=hp.search_steps, loss="slm", step_scale=hp.step_scale,
                          clip_min=hp.clip_min, clip_max=hp.clip_max, success=hp.attack_success,
                          search_train_mode=hp.search_train_mode, clean_logits=logits, search=hp.search,
                          root_steps=hp.root_steps, refine_steps=hp.refine_steps, start_noise=inputs["start_noise"])
        rows = correct.reshape(-1, *([1] * (x.dim() - 1)))
        x_mixed = torch.where(rows, res.x_adv, x)
        mixed_ce = F.cross_entropy(net(x_mixed).float(), y, reduction="none")
        in_margin_loss = ~correct | (res.eps < hp.max_eps)
        mma_loss = (mixed_ce * in_margin_loss).sum() / x.shape[0]
        loss = (1 - c) * mma_loss + c * clean_ce.mean()

        new_eps = torch.where(correct, res.eps, torch.zeros_like(res.eps))
        return loss, {
            "new_eps": new_eps,
            "acc": (logits.detach().argmax(1) == y).float(),
            "clean_loss": clean_ce.detach(),
            "avg_eps": new_eps,  # wrong rows count 0, as in val/avg_eps
            "hinged_frac": (correct & (res.eps >= hp.max_eps)).float(),
            "correct_frac": correct.float(),
        }

    def record_step(self, index: Tensor | None, outputs: dict[str, Tensor]) -> None:
        """Store eps* for the correct rows and 0 for the others (reference step 7; gathered from every DDP
        rank), then log the statistics."""
        assert index is not None  # step_inputs refused a batch without one
        self.eps_store.update(self._gather(index), self._gather(outputs["new_eps"]))
        super().record_step(index, outputs)

    def _gather(self, t: Tensor) -> Tensor:
        """``t`` from every DDP rank, flattened (just ``t`` outside a Trainer or on one device)."""
        return (t if self._trainer is None else cast(Tensor, self.all_gather(t))).reshape(-1)


def _num_train_samples(trainer: Any) -> int:
    """The training set's size: ``datamodule.num_train_samples``, else ``len(train_dataloader.dataset)``."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "num_train_samples", None):
        return int(datamodule.num_train_samples)
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("cannot tell the training set's size for the eps table: pass "
                         "MMAModule(num_train_samples=...) or a datamodule with num_train_samples") from None


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class MMAModule(MMAModuleLogic, AdversarialModule):
    """:class:`MMAModuleLogic` on pytorch_lightning (the default namespace)."""
