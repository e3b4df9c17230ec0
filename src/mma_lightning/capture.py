"""Captured tensor functions: compiled once as one whole graph, then replayed (``compile_step``, issue 16).

On a GPU at the paper's batch sizes an MMA step is launch-bound: each of its ~34 passes is a few milliseconds of
kernel launches and Python (``docs/gpu-measurements.md``). :class:`Captured` compiles a function of tensors (a
method's whole training step, :mod:`mma_lightning.methods.base`; the evaluation's attacks,
:mod:`mma_lightning.evaluation.robustness` / :mod:`~mma_lightning.evaluation.margins`) with
``torch.compile(fullgraph=True)``, on CUDA with ``mode="reduce-overhead"``: the graph and its backward run as
CUDA graphs, recorded once and replayed with one launch each.

A captured function holds no ``torch.Generator`` (its random draws come in as tensors, drawn beforehand from the
caller's generator: :meth:`~mma_lightning.attacks.norms.Norm.start_noise`), reads no value on the host (the
attacks' value checks stand aside inside it, :func:`~mma_lightning.attacks.checks.host_checks_enabled`) and
updates no Python-side state (tables, metrics and logs are the caller's, before or after).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

COMPILE_STEP_VALUES = "false, true, or a dict of torch.compile arguments (e.g. {backend: eager})"


def check_compile_step(value: object) -> None:
    """``ValueError`` naming ``compile_step`` unless it is a bool or a mapping of ``torch.compile`` arguments."""
    if not isinstance(value, (bool, Mapping)):  # a Hydra DictConfig is a Mapping
        raise ValueError(f"compile_step must be {COMPILE_STEP_VALUES}, got {value!r}")
    if isinstance(value, Mapping) and value.get("fullgraph", True) is not True:
        raise ValueError("compile_step compiles the whole step as one graph: fullgraph must stay true, "
                         f"got fullgraph={value.get('fullgraph')!r}")


def compile_arguments(value: bool | Mapping[str, Any], device: torch.device,
                      dynamic: bool | None = False) -> dict[str, Any]:
    """``torch.compile``'s arguments for ``compile_step=value`` on ``device``: one whole graph (of fixed shapes
    unless ``dynamic`` says otherwise), CUDA graphs (``mode="reduce-overhead"``) on CUDA unless the mapping
    says otherwise."""
    arguments: dict[str, Any] = {"fullgraph": True, "dynamic": dynamic}
    if device.type == "cuda":
        arguments["mode"] = "reduce-overhead"
    if isinstance(value, Mapping):
        arguments.update(value)
    return arguments


def _clone_tensors(out: Any) -> Any:
    """Tensors of ``out`` (a tensor, tuple or dict of them) cloned out of a CUDA graph's memory pool."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_tensors(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


class Captured:
    """A tensor function compiled whole on its first call (:func:`compile_arguments`), then replayed.

    ``option`` is ``True`` or a mapping of ``torch.compile`` arguments; ``dynamic=None`` lets dynamo make a
    dimension symbolic once it changed (the evaluation's batches of a few sizes), ``False`` compiles each
    shape apart (the training step: one shape). Under CUDA graphs, each call first marks a new step
    (``torch.compiler.cudagraph_mark_step_begin``: the training graph, its backward and the evaluation graph
    interleave) and clones the outputs out of the graph's memory pool, which the next replay overwrites
    (Lightning keeps the logged loss past the step). The compiled function is not pickled or deep-copied
    (``ddp_spawn``, copies of a module): it is compiled again on first use.
    """

    def __init__(self, fn: Callable[..., Any], option: bool | Mapping[str, Any], dynamic: bool | None = False
                 ) -> None:
        self.fn = fn
        self.option = option
        self.dynamic = dynamic
        self._compiled: Callable[..., Any] | None = None
        self._cuda_graphs = False

    def __call__(self, device: torch.device, *args: Any) -> Any:
        """``fn(*args)`` through the compiled graph (compiled for ``device`` on the first call)."""
        if self._compiled is None:
            arguments = compile_arguments(self.option, device, self.dynamic)
            self._cuda_graphs = device.type == "cuda" and arguments.get("mode") in (
                "reduce-overhead", "max-autotune")
            self._compiled = torch.compile(self.fn, **arguments)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return _clone_tensors(self._compiled(*args))
        return self._compiled(*args)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None, "_cuda_graphs": False}


def bucket_size(n: int) -> int:
    """A captured graph's batch size for ``n`` points: the next power of two (at least 8), so that the
    shrinking subsets of points still alive take a handful of sizes (each one graph, recorded once)."""
    return max(8, 1 << (n - 1).bit_length())


def pad_batch(x: Tensor, y: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``(x, y)`` padded to ``size`` rows with copies of the first row (returned as they are if not shorter)."""
    pad = size - x.shape[0]
    if pad <= 0:
        return x, y
    return torch.cat([x, x[:1].expand(pad, *x.shape[1:])]), torch.cat([y, y[:1].expand(pad)])


class CapturedModel(nn.Module):
    """``model`` whose forward runs as a compiled graph (CUDA graphs on a GPU), for the evaluation's attacks.

    The evaluation's loops (100-step PGD runs, margin searches, many restarts) are captured pass by pass rather
    than whole: a 100-step loop unrolled into one graph would take minutes to compile for no gain, while the
    passes hold nearly all the kernels (one WRN-28-4 pass with CUDA graphs: 2.5-3x faster at batch 128). Each
    of the attacks' passes, forward or forward and input gradient (the attacks freeze the parameters, so the
    captured backward computes the input gradient alone), replays a recorded graph; the glue between passes
    (a step, a projection) stays eager. Batch sizes are symbolic (``dynamic=None``): callers pad to a few sizes.
    Outputs are cloned out of the graph's memory pool (an attack keeps the clean logits across later passes).
    ``model``'s parameters, buffers and modes are its own (the wrapper adds none).
    """

    def __init__(self, model: nn.Module, option: bool | Mapping[str, Any] = True) -> None:
        super().__init__()
        self.model = model
        self.option = option
        self.__dict__["_compiled"] = None  # not a submodule: model_mode / parameters() see ``model`` once
        self._cuda_graphs = False

    def forward(self, x: Tensor) -> Tensor:
        """``model(x)`` through the compiled graph."""
        compiled = self.__dict__["_compiled"]
        if compiled is None:
            arguments = compile_arguments(self.option, x.device, dynamic=None)
            self._cuda_graphs = x.device.type == "cuda" and arguments.get("mode") in ("reduce-overhead",
                                                                                     "max-autotune")
            compiled = self.__dict__["_compiled"] = torch.compile(self.model, **arguments)
        out = compiled(x)
        return out.clone() if self._cuda_graphs else out
