"""The captured step: a method's whole training step (and the validation's attack) compiled once, replayed.

On a GPU at the paper's batch sizes the MMA step is launch-bound: each of its ~34 passes is a few milliseconds of
kernel launches and Python (``docs/gpu-measurements.md``). ``compile_step`` compiles the step's tensor function
(clean forward, AN-PGD, the margin search, the loss; every method's) as one graph with
``torch.compile(fullgraph=True, dynamic=False)``; on CUDA with ``mode="reduce-overhead"``, so the graph and its
backward run as CUDA graphs: recorded once, then replayed each step with one launch each.

What a graph cannot hold stays outside, eager, a handful of small kernels per step (methods/base.py):

- the random draws: a compiled graph cannot take a ``torch.Generator``, so the attacks' random start is drawn
  from the module's own generator *before* the graph (:meth:`~mma_lightning.attacks.norms.Norm.start_noise`)
  and passed in; the stream is consumed exactly as in the eager step, so exact resume still holds;
- MMA's eps table: its lookup before and its scatter after (all-gathered under DDP, as in the eager step);
- torchmetrics updates and ``self.log``: the graph returns the per-sample statistics, the module logs them.

The first batch of each stage runs eagerly with the attacks' value checks (they read tensors on the host, which a
graph cannot); later batches run the graph with no host synchronisation. Shapes are fixed: the module drops a
training batch of another size than the first (the library's loaders drop the short last batch anyway) and pads
an evaluation batch to the first evaluation batch's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

COMPILE_STEP_VALUES = "false, true, or a dict of torch.compile arguments (e.g. {backend: eager})"


def check_compile_step(value: object) -> None:
    """``ValueError`` naming ``compile_step`` unless it is a bool or a mapping of ``torch.compile`` arguments."""
    if not isinstance(value, (bool, Mapping)):  # a Hydra DictConfig is a Mapping
        raise ValueError(f"compile_step must be {COMPILE_STEP_VALUES}, got {value!r}")
    if isinstance(value, Mapping) and value.get("fullgraph", True) is not True:
        raise ValueError("compile_step compiles the whole step as one graph: fullgraph must stay true, "
                         f"got fullgraph={value.get('fullgraph')!r}")


def compile_arguments(value: bool | Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``torch.compile``'s arguments for ``compile_step=value`` on ``device``: one whole graph of fixed shapes,
    CUDA graphs (``mode="reduce-overhead"``) on CUDA unless the mapping says otherwise."""
    arguments: dict[str, Any] = {"fullgraph": True, "dynamic": False}
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


class CapturedStep:
    """A tensor function compiled whole on its first call (:func:`compile_arguments`), then replayed.

    Under CUDA graphs, each call first marks a new step (``torch.compiler.cudagraph_mark_step_begin``: the
    training graph, its backward and the evaluation graph interleave) and clones the outputs out of the graph's
    memory pool, which the next replay overwrites (Lightning keeps the logged loss past the step). The compiled
    function is not pickled or deep-copied (``ddp_spawn``, checkpoints of the module): it is compiled again on
    first use.
    """

    def __init__(self, fn: Callable[..., Any], option: bool | Mapping[str, Any]) -> None:
        self.fn = fn
        self.option = option
        self._compiled: Callable[..., Any] | None = None
        self._cuda_graphs = False

    def __call__(self, device: torch.device, *args: Any) -> Any:
        """``fn(*args)`` through the compiled graph (compiled for ``device`` on the first call)."""
        if self._compiled is None:
            arguments = compile_arguments(self.option, device)
            self._cuda_graphs = device.type == "cuda" and arguments.get("mode") in (
                "reduce-overhead", "max-autotune")
            self._compiled = torch.compile(self.fn, **arguments)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return _clone_tensors(self._compiled(*args))
        return self._compiled(*args)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None, "_cuda_graphs": False}
