"""The captured step (``compile_step``), proved on CPU: the whole training step of every method and
the validation's attack compile as ONE graph (``fullgraph=True``: any graph break raises), nothing recompiles
after warm-up across an epoch end, a validation and a checkpoint (dynamo's counters), the captured step
computes what the eager one does, and exact resume, the NaN guard and ``StopOnSignal`` hold with the switch on.

Backends: ``"eager"`` (dynamo's tracing and guards, no code generation: the graph breaks and the recompiles are
those of every backend) and ``"aot_eager"`` (AOTAutograd too: the functionalised forward and the compiled
backward, as inductor gets them). Inductor itself is in the slow test at the end.
"""

from __future__ import annotations

import copy
import pickle
import signal
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torch._dynamo.utils import counters

from mma_lightning import MMAModule, PGDATModule, PGDLSModule, StandardModule, TRADESModule
from mma_lightning.attacks import get_norm
from mma_lightning.callbacks import NonFiniteError, NonFiniteGuard, StopOnSignal
from mma_lightning.capture import pad_batch
from mma_lightning.data import TensorDataModule
from mma_lightning.methods.base import AdversarialModule, evaluation_outputs
from test_interrupt import SendSignal
from test_nonfinite import BAD_INDEX, bad_step, poisoned_data
from test_resume import data, max_diff

EAGER = {"backend": "eager"}
AOT = {"backend": "aot_eager"}
FAST_EVAL = dict(eval_eps=0.1, eval_nb_iter=2, eval_search_steps=2)


def conv_net() -> nn.Module:
    """A tiny CNN with BatchNorm (train and eval mode differ) and dropout (the global random stream)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


METHODS: dict[str, Callable[..., AdversarialModule]] = {
    "mma": lambda **kw: MMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2, **kw),
    "mma_refined": lambda **kw: MMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search="refined",
                                          root_steps=2, refine_steps=3, **kw),
    "omma": lambda **kw: MMAModule(conv_net(), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2,
                                   clean_loss_coeff=0.0, **kw),
    "pgd_at": lambda **kw: PGDATModule(conv_net(), eps=0.1, nb_iter=2, **kw),
    "pgdls": lambda **kw: PGDLSModule(conv_net(), eps=0.1, nb_iter=2, ramp_steps=4, **kw),
    "trades": lambda **kw: TRADESModule(conv_net(), eps=0.1, nb_iter=2, **kw),
    "standard": lambda **kw: StandardModule(conv_net(), **kw),
}


def images(n: int, seed: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (0.5 + 0.25 * (y.view(-1, 1, 1, 1).float() - 1) + 0.2 * torch.randn(n, 1, 4, 4, generator=g))
    return x.clamp(0, 1), y


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test counts its own graphs (dynamo's caches and counters are process-wide)."""
    torch._dynamo.reset()
    counters.clear()


# --- one graph, every method, both norms --------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_and_validation_attack_compile_as_one_graph(method: str, norm: str) -> None:
    """``fullgraph=True`` raises on any graph break: the training step (clean forward, attack, margin search,
    loss) and the evaluation step each compile whole; the graph's loss has the eager step's gradient path."""
    module = METHODS[method](norm=norm, compile_step=EAGER, **FAST_EVAL)
    if isinstance(module, MMAModule):
        module.eps_store.resize(8)
    module.train()
    x, y = images(8)
    inputs = module.step_inputs(x, y, torch.arange(8))
    step = torch.compile(type(module).step_loss, fullgraph=True, backend="eager")
    loss, outputs = step(module, module.net, module.settings(x), x, y, inputs)
    assert loss.requires_grad and loss.shape == ()
    assert set(module.train_stat_names) <= set(outputs)
    module.eval()
    noise = get_norm(norm).start_noise(x, torch.Generator().manual_seed(0))
    evaluate = torch.compile(evaluation_outputs, fullgraph=True, backend="eager")
    out = evaluate(module.net, module.settings(x), x, y, noise)
    assert set(out) == {"acc", "robust_acc", "avg_eps", "loss"} and out["avg_eps"].shape == (8,)
    assert compiled_graphs() == 2  # one training graph, one evaluation graph: no break split either


# --- no recompile after warm-up -----------------------------------------------------------------------------------
class CountAfterWarmup(pl.Callback):
    """The number of compiled graphs once training and the first validation ran (the warm-up)."""

    def __init__(self) -> None:
        self.after_warmup: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.after_warmup is None and trainer.global_step > 1:
            self.after_warmup = compiled_graphs()


@pytest.mark.parametrize("method", ["mma", "mma_refined", "pgdls"])
def test_no_recompile_across_epoch_end_validation_and_checkpoint(method: str, tmp_path: Path) -> None:
    """20 steps of 8 per epoch (epoch ends at steps 8 and 16), a validation after each epoch (3 batches, the
    last one short, padded), a checkpoint at each: after the first epoch nothing compiles again, not even for
    PGDLS, whose radius changes every step (a graph input, not a constant)."""
    module = METHODS[method](compile_step=EAGER, **FAST_EVAL)
    x, y = images(168)
    counts = CountAfterWarmup()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=20, logger=False, num_sanity_val_steps=0,
                         callbacks=[counts, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, TensorDataModule(x, y, val_size=40, batch_size=16))  # 128 train: 8 batches of 16
    assert trainer.global_step == 20 and (tmp_path / "last.ckpt").is_file()
    assert counts.after_warmup == 2, counts.after_warmup  # the training graph and the evaluation graph
    assert compiled_graphs() == counts.after_warmup


# --- the captured step computes the eager step --------------------------------------------------------------------
class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_steps(module: AdversarialModule, steps: int, **trainer_kwargs: Any) -> tuple[pl.Trainer, list[float]]:
    losses = Losses()
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[losses], deterministic=True, **trainer_kwargs)
    trainer.fit(module, data())
    return trainer, losses.losses


@pytest.mark.parametrize("method", ["mma", "mma_refined", "trades"])
def test_captured_step_equals_the_eager_step(method: str) -> None:
    """Same seed, same data: the losses of every step, the eps table, the weights and a validation agree with
    the eager run within float tolerance (AOTAutograd's graph and compiled backward; the settings are the same
    tensors in both). SGD, whose update is linear in the gradient: Adam's normalisation turns float rounding in a
    near-zero gradient into a whole step."""
    kwargs = dict(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), **FAST_EVAL)
    eager, captured = METHODS[method](**kwargs), METHODS[method](compile_step=AOT, **kwargs)
    t_eager, l_eager = fit_steps(eager, 8, limit_val_batches=1)
    t_captured, l_captured = fit_steps(captured, 8, limit_val_batches=1)
    assert len(l_captured) == 8
    assert torch.allclose(torch.tensor(l_eager), torch.tensor(l_captured), atol=1e-5, rtol=1e-4), (l_eager,
                                                                                                   l_captured)
    assert max_diff(eager, captured) < 1e-4
    if isinstance(eager, MMAModule):
        assert bool((captured.eps_store.eps > 0).any())
        assert torch.allclose(eager.eps_store.eps, captured.eps_store.eps, atol=1e-5)
    for name in ("val/acc", "val/robust_acc", "val/avg_eps"):
        assert abs(float(t_eager.callback_metrics[name]) - float(t_captured.callback_metrics[name])) < 1e-5, name
    assert compiled_graphs() == 2


def test_padded_evaluation_batches_count_their_real_rows_only() -> None:
    """A validation of 40 points in batches of 16 (16, 16, 8): the short batch runs in the 16-row graph, its
    padding weighted out of every metric, so the figures are the eager validation's."""
    x, y = images(168)
    results = {}
    for name, option in (("eager", False), ("captured", EAGER)):
        module = METHODS["mma"](compile_step=option, **FAST_EVAL)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.validate(module, TensorDataModule(x, y, val_size=40, batch_size=16), verbose=False)
        results[name] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert results["eager"].keys() == results["captured"].keys()
    for key, value in results["eager"].items():
        assert abs(value - results["captured"][key]) < 1e-6, key


def test_a_training_batch_of_another_size_is_skipped_with_a_warning() -> None:
    """A loader without drop_last: the short last batch would be a new shape (a second graph); it is skipped."""
    x, y = images(40)
    module = METHODS["pgd_at"](compile_step=EAGER, **FAST_EVAL)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 16, 16, 8
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="a training batch of 8 samples is skipped") as warned:
        trainer.fit(module, loader)
    assert sum("is skipped" in str(w.message) for w in warned) == 1  # said once, though skipped twice
    assert trainer.global_step == 6  # Lightning counts a skipped batch's optimizer call (it has no gradients)
    assert compiled_graphs() == 1


def test_evaluation_with_captured_passes_gives_the_eager_figures() -> None:
    """evaluate_model(capture=...): the PGD runs (alive points padded to a few sizes) and margin searches through
    CapturedModel give the eager evaluation's figures (on the CPU the random starts of a padded batch begin
    with the unpadded batch's draws), and compile one graph per pass kind, not per batch size."""
    from mma_lightning.evaluation import evaluate_model

    net = conv_net().eval()
    x, y = images(70, seed=5)
    settings = dict(nb_iter=3, restarts=2, margin_nb_iter=3, margin_search_steps=3, sanity=False, batch_size=32,
                    progress=False)
    eager = evaluate_model(net, (x, y), "linf", [0.05, 0.1, 0.2], capture=False, **settings)
    captured = evaluate_model(net, (x, y), "linf", [0.05, 0.1, 0.2], capture=EAGER, **settings)
    assert eager.pgd.robust_accuracy == captured.pgd.robust_accuracy
    assert 0 < eager.pgd.robust_accuracy[0] < 1
    assert torch.equal(eager.margins.eps, captured.margins.eps)
    # a few graphs (autograd on / off, parameters frozen or not, static then symbolic batch), none per size:
    # 3 eps x 2 losses x 2 restarts of shrinking subsets of 3 batches met many sizes
    assert compiled_graphs() <= 8


# --- a sweep compiles once ------------------------------------------------------------------------------------------
SWEEP = [dict(max_eps=m, min_eps=lo, clean_loss_coeff=c, step_scale=st, eval_eps=e)
         for m, lo, c, st, e in [(0.2, 0.05, 1 / 3, 2.5, 0.1), (0.25, 0.05, 1 / 3, 2.5, 0.1),
                                 (0.3, 0.05, 1 / 3, 2.5, 0.1), (0.15, 0.02, 1 / 3, 2.5, 0.1),
                                 (0.2, 0.1, 1 / 3, 2.5, 0.1), (0.2, 0.05, 0.5, 2.5, 0.1), (0.2, 0.05, 0.1, 2.5, 0.1),
                                 (0.2, 0.05, 1 / 3, 2.0, 0.1), (0.2, 0.05, 1 / 3, 3.0, 0.1),
                                 (0.2, 0.05, 1 / 3, 2.5, 0.05), (0.2, 0.05, 1 / 3, 2.5, 0.15),
                                 (0.35, 0.01, 0.2, 1.5, 0.12), (0.2, 0.05, 0.0, 2.5, 0.1), (0.3, 0.05, 0.0, 2.0, 0.1)]]


def one_step(module: AdversarialModule, n: int = 8) -> None:
    """One training step and one validation batch of ``module`` outside a Trainer (as a sweep's trial starts)."""
    x, y = images(n)
    if isinstance(module, MMAModule):
        module.eps_store.resize(n)
    module.train()
    module.training_loss(x, y, torch.arange(n)).backward()
    module.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # outside a Trainer: nothing to log to
        module._eval_step((x, y), "val")


def test_a_sweep_and_every_method_at_three_batch_sizes_in_one_process() -> None:
    """In one process: 14 trials of an MMA sweep (radii, start eps, clean-loss weight, step scale, eval eps) replay
    the first trial's graphs, since the swept numbers are tensors of the graph (OMMA's zero clean-loss weight, a
    term switched off, is one more training graph); then every method at three batch sizes (18 training shapes,
    as gpu_check builds them): each method compiles its own step function, the evaluation one graph per size,
    under dynamo's recompile limit. Nothing fails, nothing falls back to eager."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile_step")  # a fallback would warn
        for settings in SWEEP:
            module = MMAModule(conv_net(), nb_iter=2, search_steps=2, eval_nb_iter=2, eval_search_steps=2,
                               compile_step=EAGER, **settings)
            one_step(module)
            assert {k: c.state for k, c in module.captures.items()} == {"train": "captured", "eval": "captured"}
        assert compiled_graphs() == 3  # MMA, OMMA, the evaluation
        for batch in (8, 16, 32):
            for name in ("mma", "omma", "pgd_at", "pgdls", "trades", "standard"):
                module = METHODS[name](compile_step=EAGER, **FAST_EVAL)
                one_step(module, batch)
                assert all(c.state == "captured" for c in module.captures.values()), name
    assert compiled_graphs() <= 3 + 6 * 3 + 3


# --- a failing compiler: one warning, and the run is the eager run ---------------------------------------------------
def raising_backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
    raise RuntimeError("this compiler is broken")


def wrong_backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
    """Runs the graph and returns its floating outputs scaled by 1.5: a compiler that computes wrong values."""
    def run(*args: Any) -> Any:
        out = gm(*args)
        return type(out)(o * 1.5 if isinstance(o, Tensor) and o.is_floating_point() else o for o in out)
    return run


@pytest.mark.parametrize("backend", [raising_backend, wrong_backend], ids=["raises", "wrong values"])
def test_a_failing_compiler_falls_back_to_the_eager_step(backend: Callable[..., Any]) -> None:
    """The first call checks the captured step and the captured validation against eager; a compiler error or a
    wrong result gives one warning per graph (naming compile_step, the reason and the switch) and the run goes
    on eagerly: weights, eps table, losses and validation equal the compile_step=false run bitwise."""
    kwargs = dict(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), **FAST_EVAL)
    eager = METHODS["mma"](**kwargs)
    t_eager, l_eager = fit_steps(eager, 6, limit_val_batches=1)
    failing = METHODS["mma"](compile_step={"backend": backend}, **kwargs)
    with pytest.warns(UserWarning, match="compile_step: the captured") as warned:
        t_failing, l_failing = fit_steps(failing, 6, limit_val_batches=1)
    messages = [str(w.message) for w in warned if "compile_step: the captured" in str(w.message)]
    assert len(messages) == 2, messages  # the training step and the evaluation, once each
    reason = "compiling failed" if backend is raising_backend else "differs from the eager one"
    assert all(reason in m and "compile_step=false" in m for m in messages), messages
    assert {c.state for c in failing.captures.values()} == {"eager"}
    assert l_eager == l_failing
    assert max_diff(eager, failing) == 0.0
    assert torch.equal(eager.eps_store.eps, failing.eps_store.eps)
    for name in ("val/acc", "val/robust_acc", "val/avg_eps"):
        assert float(t_eager.callback_metrics[name]) == float(t_failing.callback_metrics[name]), name


def test_the_recompile_limit_falls_back_instead_of_failing() -> None:
    """Past dynamo's recompile limit (here 1) a new graph of the same step function (another loop length) is
    not an error: that trial's captured step goes on eagerly, with the warning."""
    first = MMAModule(conv_net(), nb_iter=2, search_steps=2, compile_step=EAGER, **FAST_EVAL)
    second = MMAModule(conv_net(), nb_iter=3, search_steps=2, compile_step=EAGER, **FAST_EVAL)
    with torch._dynamo.config.patch(recompile_limit=1):
        one_step(first)
        with pytest.warns(UserWarning, match="captured training step is off, the run goes on eagerly"):
            one_step(second)
    assert first.captures["train"].state == "captured" and second.captures["train"].state == "eager"
    assert "RecompileLimit" in str(second.captures["train"].fallback_reason)


# --- layout and precision -----------------------------------------------------------------------------------------
def test_padding_keeps_channels_last() -> None:
    x = torch.rand(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    padded, y = pad_batch(x, torch.arange(5), 8)
    assert padded.shape == (8, 3, 4, 4) and y.shape == (8,)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:5], x) and torch.equal(padded[5:], x[:1].expand(3, 3, 4, 4))
    plain, _ = pad_batch(torch.rand(5, 3, 4, 4), torch.arange(5), 8)
    assert plain.is_contiguous()


def test_a_padded_channels_last_validation_makes_no_new_graph() -> None:
    """Batches of 16, 16 and 8 (padded to 16) in channels_last: one evaluation graph, as many as without."""
    x, y = images(168)
    module = MMAModule(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(64, 3)), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2,
                       compile_step=EAGER, channels_last=True, **FAST_EVAL)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, TensorDataModule(x, y, val_size=40, batch_size=16), verbose=False)
    assert compiled_graphs() == 1
    assert module.captures["eval"].state == "captured"


@pytest.mark.parametrize("method", ["mma", "trades"])
def test_captured_step_under_bf16_autocast_and_channels_last(method: str) -> None:
    """bf16-mixed (CPU autocast) with channels_last: the step and the evaluation capture (the first-call check
    passes at bf16's tolerance) and the run stays within bf16's noise of the eager run."""
    kwargs = dict(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), channels_last=True, **FAST_EVAL)
    eager, captured = METHODS[method](**kwargs), METHODS[method](compile_step=AOT, **kwargs)
    _, l_eager = fit_steps(eager, 7, limit_val_batches=1, precision="bf16-mixed")  # 6 steps an epoch
    _, l_captured = fit_steps(captured, 7, limit_val_batches=1, precision="bf16-mixed")
    assert {k: c.state for k, c in captured.captures.items()} == {"train": "captured", "eval": "captured"}
    assert torch.allclose(torch.tensor(l_eager), torch.tensor(l_captured), rtol=5e-2, atol=1e-2), (l_eager,
                                                                                                    l_captured)
    assert compiled_graphs() == 2


def test_sync_batchnorm_is_refused_with_the_fix() -> None:
    module = METHODS["pgd_at"](compile_step=EAGER, **FAST_EVAL)
    module.net = nn.SyncBatchNorm.convert_sync_batchnorm(module.net)
    with pytest.raises(ValueError, match="trainer.sync_batchnorm=false .* or method.compile_step=false"):
        module.on_fit_start()


# --- the long-run guarantees with the switch on ---------------------------------------------------------------
def captured_module(compile_step: bool | dict[str, Any] = EAGER) -> MMAModule:
    """test_resume's MMA module (dropout, random starts) with the captured step."""
    pl.seed_everything(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    return MMAModule(net, norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=3, eval_eps=0.05,
                     eval_nb_iter=2, eval_search_steps=2, optimizer=partial(torch.optim.Adam, lr=1e-2),
                     compile_step=compile_step)


def trainer_for(root: Path, steps: int, *callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, deterministic=True,
                      logger=False, callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=1, default_root_dir=root, **kwargs)


def test_exact_resume_mid_epoch_with_the_captured_step(tmp_path: Path) -> None:
    """Stopped at step 9 (mid-epoch 2) and resumed in a new module: bitwise the uninterrupted captured run,
    the first resumed step included (it runs the graph, as in the uninterrupted run)."""
    straight = captured_module()
    pl.seed_everything(0)
    trainer_for(tmp_path / "straight", 12).fit(straight, datamodule=data())
    first = captured_module()
    pl.seed_everything(0)
    trainer_for(tmp_path / "first", 9, ModelCheckpoint(dirpath=tmp_path / "first", filename="{step}",
                                                       every_n_train_steps=9)).fit(first, datamodule=data())
    torch._dynamo.reset()  # a new process compiles anew
    resumed = captured_module()
    pl.seed_everything(0)
    trainer_for(tmp_path / "resumed", 12).fit(resumed, datamodule=data(),
                                              ckpt_path=str(tmp_path / "first" / "step=9.ckpt"))
    assert max_diff(straight, resumed) == 0.0
    assert bool((resumed.eps_store.eps > 0).any())


def test_nan_guard_stops_on_a_nan_inside_the_captured_step(tmp_path: Path) -> None:
    """A NaN input in a later batch goes through the graph; the guard names its step and dataset index."""
    step = bad_step()
    module = captured_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, num_sanity_val_steps=0,
                         callbacks=[NonFiniteGuard(check_every_n_steps=50),
                                    ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, datamodule=poisoned_data())
    assert f"non-finite training loss at step {step}" in str(info.value)
    assert f"dataset indices [{BAD_INDEX}]" in str(info.value)
    assert compiled_graphs() == 1


def test_stop_on_signal_with_the_captured_step(tmp_path: Path) -> None:
    """SIGTERM during step 3: the step completes, last.ckpt holds it, and the resumed run is exact."""
    straight = captured_module()
    pl.seed_everything(0)
    trainer_for(tmp_path / "straight", 8).fit(straight, datamodule=data())
    stop, first = StopOnSignal(), captured_module()
    pl.seed_everything(0)
    with pytest.raises(SIGTERMException):
        trainer_for(tmp_path / "first", 8, ModelCheckpoint(dirpath=tmp_path / "first", save_last=True), stop,
                    SendSignal(signal.SIGTERM, at_step=3)).fit(first, datamodule=data())
    last = tmp_path / "first" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed = captured_module()
    pl.seed_everything(0)
    trainer_for(tmp_path / "resumed", 8).fit(resumed, datamodule=data(), ckpt_path=str(last))
    assert max_diff(straight, resumed) == 0.0


class SaveState(pl.Callback):
    """Each rank saves its module's state dict (weights, eps table) at the end of training."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state = {k: v.cpu() for k, v in module.state_dict().items()}
        torch.save({**state, "captures": {k: c.state for k, c in module.captures.items()}},
                   self.out / f"rank{trainer.global_rank}.pt")


def ddp_module(compile_step: bool | dict[str, Any]) -> MMAModule:
    """An MLP of 8,600 parameters with BatchNorm: with 4 KB buckets DDP splits its gradients into ~9 buckets."""
    pl.seed_everything(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    return MMAModule(net, norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=3, eval_eps=0.05,
                     eval_nb_iter=2, eval_search_steps=2, optimizer=partial(torch.optim.SGD, lr=0.2, momentum=0.9),
                     compile_step=compile_step)


@pytest.mark.slow
def test_ddp_two_processes_with_the_captured_step_equal_the_eager_ddp_run(tmp_path: Path) -> None:
    """2 CPU processes (ddp_spawn, gloo), a net of several gradient buckets (DDP's buckets at 4 KB; dynamo's DDP
    graph splitting, on by default, would cut the captured step at each): each rank's graph (AOTAutograd), the
    gathered eps-table updates outside it and DDP's gradient averaging after the graph's backward give the eager
    DDP run's weights and one global eps table."""
    states = {}
    for name, option in (("eager", False), ("captured", AOT)):
        out = tmp_path / name
        out.mkdir()
        module = ddp_module(option)
        strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120), bucket_cap_mb=0.004)
        trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=6, logger=False, enable_checkpointing=False,
                             strategy=strategy, callbacks=[SaveState(out)], limit_val_batches=0,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        pl.seed_everything(0)
        trainer.fit(module, datamodule=data())
        states[name] = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for rank in (0, 1):
        assert states["captured"][rank].pop("captures")["train"] == "captured"  # no fallback to eager
        assert states["eager"][rank].pop("captures") == {}
        assert torch.equal(states["captured"][rank]["eps_store.eps"], states["captured"][0]["eps_store.eps"])
        for key, value in states["eager"][rank].items():
            assert torch.allclose(value.double(), states["captured"][rank][key].double(), atol=1e-5), key
    assert bool((states["captured"][0]["eps_store.eps"] > 0).any())


# --- the switch itself ----------------------------------------------------------------------------------------------
def test_compile_step_values_are_checked() -> None:
    with pytest.raises(ValueError, match="compile_step must be false, true, or a dict of torch.compile arguments"):
        METHODS["mma"](compile_step="inductor")
    with pytest.raises(ValueError, match="fullgraph must stay true"):
        METHODS["mma"](compile_step={"fullgraph": False})
    with pytest.raises(ValueError, match="compile_step needs search_train_mode=False"):
        MMAModule(conv_net(), search_train_mode=True, compile_step=True)


def test_a_module_with_a_compiled_step_pickles_and_copies() -> None:
    """ddp_spawn pickles the module and Lightning may deep-copy it: the compiled function is left behind and
    compiled again on first use; the copy trains."""
    module = METHODS["pgd_at"](compile_step=EAGER, **FAST_EVAL)
    fit_steps(module, 2, limit_val_batches=0)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert clone._train_graph is not None and clone._train_graph._compiled is None
        fit_steps(clone, 2, limit_val_batches=0)


@pytest.mark.slow
@pytest.mark.parametrize("search", ["bisection", "refined"])
def test_inductor_captured_step_equals_the_eager_step(search: str) -> None:
    """The default backend (inductor: generated C++ on CPU, about a minute to compile on 2 cores). SGD, whose
    update is linear in the gradient (Adam's normalisation would magnify float rounding in tiny gradients)."""
    kwargs = dict(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), search=search, **FAST_EVAL)
    net = conv_net()
    del net[3]  # no dropout: inductor draws its own masks
    eager = MMAModule(net, max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2, **kwargs)
    captured = MMAModule(copy.deepcopy(net), max_eps=0.2, min_eps=0.05, nb_iter=2, search_steps=2,
                         compile_step=True, **kwargs)
    _, l_eager = fit_steps(eager, 6, limit_val_batches=1)
    _, l_captured = fit_steps(captured, 6, limit_val_batches=1)
    assert torch.allclose(torch.tensor(l_eager), torch.tensor(l_captured), atol=1e-5, rtol=1e-5)
    assert max_diff(eager, captured) < 1e-5  # weights and the eps table
    assert bool((captured.eps_store.eps > 0).any())
