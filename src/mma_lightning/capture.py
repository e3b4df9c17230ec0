"""Captured tensor functions: compiled once as one whole graph, checked against eager, then replayed.

On a GPU at the paper's batch sizes an MMA step is launch-bound: each of its ~34 passes is a few milliseconds of
kernel launches and Python. :class:`Captured` compiles a function of tensors (a method's whole training step,
:mod:`mma_lightning.methods.base`) with ``torch.compile(fullgraph=True)``, on CUDA with
``mode="reduce-overhead"``: the graph and its backward run as CUDA graphs, recorded once and replayed with one
launch each. :class:`CapturedModel` compiles a model's forward pass by pass (the evaluation's long attack loops).

A captured function holds no ``torch.Generator`` (its random draws come in as tensors, drawn beforehand from the
caller's generator: :meth:`~mma_lightning.attacks.norms.Norm.start_noise`), reads no value on the host (the
attacks' value checks stand aside inside it, :func:`~mma_lightning.attacks.checks.host_checks_enabled`) and
updates no Python-side state (tables, metrics and logs are the caller's, before or after). The settings a sweep
varies enter as tensors (:class:`GraphSettings`), so one graph serves every trial of a sweep in one process.

A captured function never ends a run and never silently differs from eager: its first call runs both, compares
them (:func:`difference`), and on a compiler error or a difference the caller goes on eagerly, with one warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

COMPILE_STEP_VALUES = "false, true, or a dict of torch.compile arguments (e.g. {backend: eager})"
GRAPHS = ("step", "passes")
"""What ``compile_step`` captures: the whole step as one graph, or each network pass as its own graph."""
FIXED_SETTINGS = frozenset({"clip_min", "clip_max"})
"""Float settings that stay constants of the graph: the data box decides Python branches of the attacks."""


def check_compile_step(value: object) -> None:
    """``ValueError`` naming ``compile_step`` unless it is a bool or a mapping of ``torch.compile`` arguments
    (plus ``graphs``: ``"step"`` or ``"passes"``)."""
    if not isinstance(value, (bool, Mapping)):  # a Hydra DictConfig is a Mapping
        raise ValueError(f"compile_step must be {COMPILE_STEP_VALUES}, got {value!r}")
    if isinstance(value, Mapping) and value.get("fullgraph", True) is not True:
        raise ValueError("compile_step compiles the whole step as one graph: fullgraph must stay true, "
                         f"got fullgraph={value.get('fullgraph')!r}")
    if isinstance(value, Mapping) and value.get("graphs", "step") not in GRAPHS:
        raise ValueError(f"compile_step.graphs must be one of {list(GRAPHS)}, got {value.get('graphs')!r}")


OWN_KEYS = ("graphs", "exact_random")
"""Keys of ``compile_step``'s mapping that are the library's, not ``torch.compile``'s."""


def compile_arguments(value: bool | Mapping[str, Any], device: torch.device,
                      dynamic: bool | None = False) -> dict[str, Any]:
    """``torch.compile``'s arguments for ``compile_step=value`` on ``device``: one whole graph (of fixed shapes
    unless ``dynamic`` says otherwise), CUDA graphs (``mode="reduce-overhead"``) on CUDA unless the mapping
    says otherwise. ``exact_random: true`` (set for a backbone with dropout) makes inductor draw its random
    numbers as eager PyTorch does (``fallback_random``), so the captured step can be checked against eager."""
    arguments: dict[str, Any] = {"fullgraph": True, "dynamic": dynamic}
    if device.type == "cuda":
        arguments["mode"] = "reduce-overhead"
    if isinstance(value, Mapping):
        arguments.update({k: v for k, v in value.items() if k not in OWN_KEYS})
        if value.get("exact_random") and arguments.get("backend", "inductor") == "inductor":
            options = dict(arguments.get("options") or {})
            options["fallback_random"] = True
            if arguments.get("mode") in ("reduce-overhead", "max-autotune"):
                options["triton.cudagraphs"] = True
            if arguments.get("mode") == "max-autotune":
                options["max_autotune"] = True
            arguments["options"] = options
    if "options" in arguments:  # torch.compile takes a mode or options, not both
        arguments.pop("mode", None)
    return arguments


def uses_cuda_graphs(arguments: Mapping[str, Any], device: torch.device) -> bool:
    """Whether ``torch.compile(**arguments)`` records CUDA graphs on ``device``."""
    options = arguments.get("options") or {}
    return device.type == "cuda" and (arguments.get("mode") in ("reduce-overhead", "max-autotune")
                                      or bool(options.get("triton.cudagraphs")))


def _clone_tensors(out: Any) -> Any:
    """Tensors of ``out`` (a tensor, tuple or dict of them) cloned out of a CUDA graph's memory pool."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_tensors(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


@contextmanager
def _dynamo_settings() -> Iterator[None]:
    """Dynamo's settings around a captured call: no DDP graph splitting (dynamo's ``optimize_ddp`` splits a
    graph at DDP's gradient buckets, which cuts through the attacks' ``torch.func`` transforms; the captured
    step's gradients reach DDP's hooks after its backward, as an eager step's do)."""
    with torch._dynamo.config.patch(optimize_ddp=False):
        yield


class GraphSettings:
    """A method's settings as its step reads them, eagerly or captured: ``settings.max_eps`` etc.

    Every non-zero float (but :data:`FIXED_SETTINGS`) is a 0-d tensor of ``tensors`` when given there, so that
    trials of a sweep that differ only in such values (radii, step scales, loss weights) replay one graph; a
    zero stays a Python constant (it switches a term off: OMMA's ``clean_loss_coeff=0`` skips a backward), and
    so do integers (loop lengths), strings and booleans (the graph's structure). ``values`` and ``tensors`` are
    the two mappings it reads from.
    """

    def __init__(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None) -> None:
        self.__dict__["values"] = values
        self.__dict__["tensors"] = dict(tensors or {})

    def __getattr__(self, name: str) -> Any:
        tensors = self.__dict__["tensors"]
        if name in tensors:
            return tensors[name]
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """``settings.name``, or ``default`` for a setting it does not have."""
        try:
            return getattr(self, name)
        except AttributeError:
            return default

    @staticmethod
    def swept(values: Mapping[str, Any]) -> list[str]:
        """The names of ``values`` that enter a graph as tensors (see the class docstring)."""
        return [k for k, v in values.items()
                if isinstance(v, float) and v != 0 and k not in FIXED_SETTINGS]

    @classmethod
    def on_device(cls, values: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> GraphSettings:
        """The settings with :meth:`swept` values as 0-d tensors on ``device`` (filled there: no host copy, no
        sync)."""
        tensors = {k: torch.full((), float(values[k]), device=device, dtype=dtype) for k in cls.swept(values)}
        return cls(values, tensors)


def _flatten(out: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor of ``out`` (tensors, tuples, lists and dicts of them)."""
    if isinstance(out, Tensor):
        yield prefix or "output", out
    elif isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            yield from _flatten(o, f"{prefix}[{i}]")
    elif isinstance(out, dict):
        for k, o in out.items():
            yield from _flatten(o, f"{prefix}.{k}" if prefix else str(k))


TOLERANCES = {False: {"rtol": 1e-3, "atol": 1e-5, "scalar": 2e-2, "fraction": 1 / 16, "mean": 1e-2,
                     "gradient": 5e-2},
              True: {"rtol": 5e-2, "atol": 1e-3, "scalar": 1e-1, "fraction": 1 / 4, "mean": 5e-2, "gradient": 2e-1}}
"""How far a captured result may be from the eager one, for fp32 (``False``) and under autocast (``True``):
a per-sample output passes if at most ``fraction`` of its elements lie beyond ``atol + rtol * |eager|``, or if
its mean absolute difference is within ``mean`` of its mean absolute value (a margin search settles a sample
near a tie one bracket further: a WRN-28-4 step's eps differed in 2 of 8 samples by 2.5e-4 under inductor);
scalars within ``scalar`` relative, parameter gradients within ``gradient`` of the eager gradient's norm."""


def difference(eager: Any, captured: Any, eager_grads: Sequence[Tensor | None] = (),
               captured_grads: Sequence[Tensor | None] = (), low_precision: bool = False) -> str | None:
    """Why ``captured`` is not ``eager`` within :data:`TOLERANCES` (their tensors and the parameter gradients
    of their losses), or ``None`` when it is."""
    tol = TOLERANCES[low_precision]
    ours, theirs = dict(_flatten(eager)), dict(_flatten(captured))
    if ours.keys() != theirs.keys():
        return f"outputs differ: {sorted(ours)} eagerly, {sorted(theirs)} captured"
    for name, e in ours.items():
        c = theirs[name]
        if c.shape != e.shape:
            return f"{name} has shape {tuple(c.shape)} captured, {tuple(e.shape)} eagerly"
        e, c = e.detach().double(), c.detach().double()
        if e.dim() == 0:
            if not torch.isclose(c, e, rtol=tol["scalar"], atol=tol["atol"], equal_nan=True):
                return f"{name} is {float(c):.6g} captured, {float(e):.6g} eagerly"
            continue
        off = ~torch.isclose(c, e, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
        finite = torch.isfinite(e) & torch.isfinite(c)
        gap = float((c - e)[finite].abs().mean()) if bool(finite.any()) else 0.0
        close_on_average = bool((finite == torch.isfinite(e)).all()) and (
            gap <= tol["mean"] * float(e[finite].abs().mean() if bool(finite.any()) else 0.0) + tol["atol"])
        if float(off.double().mean()) > tol["fraction"] and not close_on_average:
            return (f"{name}: {int(off.sum())} of {off.numel()} values differ (largest difference "
                    f"{float((c - e).abs().nan_to_num(float('inf')).max()):.3g})")
    pairs = list(zip(eager_grads, captured_grads))
    if any((e is None) != (c is None) for e, c in pairs):
        return "the captured loss reaches other parameters than the eager one"
    present = [(e.double(), c.double()) for e, c in pairs if e is not None and c is not None]
    if present:
        norm = sum(float(e.square().sum()) for e, _ in present) ** 0.5
        gap = sum(float((c - e).square().sum()) for e, c in present) ** 0.5
        if not gap <= tol["gradient"] * norm + tol["atol"]:
            return f"the parameter gradients differ by {gap:.3g} (norm {norm:.3g}) from the eager ones"
    return None


class _Snapshot:
    """The state a step may change besides its outputs, to run it twice from the same start: the random
    streams (CPU and the device's) and ``module``'s buffers (BatchNorm's running statistics)."""

    def __init__(self, module: nn.Module | None, device: torch.device) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.buffers = [] if module is None else [(b, b.detach().clone()) for b in module.buffers()]

    def restore(self) -> None:
        """Put the random streams and buffers back as they were."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        with torch.no_grad():
            for buffer, value in self.buffers:
                buffer.copy_(value)


def _gradients(out: Any, params: Sequence[Tensor], retain: bool = False) -> list[Tensor | None]:
    """The gradients of ``out``'s loss (its first element, summed) with respect to ``params`` (its graph freed
    unless ``retain``); none without ``params``."""
    if not params:
        return []
    loss = out[0].sum()  # a pack's step returns one loss per run
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, list(params), retain_graph=retain, allow_unused=True))


class Captured:
    """A tensor function compiled whole on its first call (:func:`compile_arguments`), checked, then replayed.

    ``fn(*args)`` is the function to capture; ``net_arg`` the position of its network among ``args``. ``option`` is
    ``True`` or a mapping of ``torch.compile`` arguments, with ``graphs``: ``"step"`` (default: ``fn`` as one
    graph, its loops unrolled) or ``"passes"`` (``fn`` runs eagerly with its network wrapped in
    :class:`CapturedModel`: a graph per kind of pass, whatever the loop lengths). ``dynamic=None`` lets dynamo make
    a dimension symbolic once it changed, ``False`` compiles each shape apart (the training step: one shape).

    The first call runs the captured function and then, from the same random streams and buffers, the eager one
    (the caller's ``eager``: ``fn`` uncompiled), and compares outputs and the
    parameter gradients of the loss (``params``; the loss is the first output) within :data:`TOLERANCES`; when
    they agree it runs the captured function a third time from the same start and returns that result (a run is
    captured from its first step, so a resumed run replays an unbroken one exactly). If compiling raises (any
    compiler error, dynamo's recompile limit) or the results differ, one warning names ``what``, the reason and
    the switch (``switch``), and every later call runs ``fn`` eagerly: the run goes on as without the capture. ``state`` is
    ``"pending"``, ``"captured"`` or ``"eager"``; ``first_call_s`` the first call's wall time (compile and check);
    ``fallback_reason`` why it fell back. Under CUDA graphs each call marks a new step
    (``torch.compiler.cudagraph_mark_step_begin``) and clones the outputs out of the graph's memory pool, which
    the next replay overwrites. The compiled function is not pickled or deep-copied (``ddp_spawn``, copies of a
    module): it is compiled (and checked) again on first use.
    """

    def __init__(self, fn: Callable[..., Any], option: bool | Mapping[str, Any], what: str,
                 switch: str = "compile_step=False (method.compile_step=false)", net_arg: int = 0, dynamic: bool | None = False) -> None:
        self.fn = fn
        self.option = option
        self.what = what
        self.switch = switch
        self.net_arg = net_arg
        self.dynamic = dynamic
        self.state = "pending"
        self.first_call_s: float | None = None
        self.fallback_reason: str | None = None
        self._compiled: Callable[..., Any] | None = None
        self._cuda_graphs = False

    @property
    def graphs(self) -> str:
        """``"step"`` or ``"passes"`` (see the class docstring)."""
        return str(self.option.get("graphs", "step")) if isinstance(self.option, Mapping) else "step"

    def _compile(self, device: torch.device) -> Callable[..., Any]:
        if self.graphs == "passes":
            nets: dict[int, CapturedModel] = {}

            def per_pass(*args: Any) -> Any:
                net = args[self.net_arg]
                wrapped = nets.setdefault(id(net), CapturedModel(net, self.option))
                return self.fn(*args[:self.net_arg], wrapped, *args[self.net_arg + 1:])
            return per_pass
        arguments = compile_arguments(self.option, device, self.dynamic)
        self._cuda_graphs = uses_cuda_graphs(arguments, device)
        return torch.compile(self.fn, **arguments)

    def _run(self, device: torch.device, args: tuple[Any, ...]) -> Any:
        if self._compiled is None:
            self._compiled = self._compile(device)
        with _dynamo_settings():
            if self._cuda_graphs or (self.graphs == "passes" and device.type == "cuda"):
                torch.compiler.cudagraph_mark_step_begin()
            out = self._compiled(*args)
        return _clone_tensors(out) if self._cuda_graphs else out

    def __call__(self, device: torch.device, args: tuple[Any, ...], eager: Callable[[], Any],
                 restore: nn.Module | None = None, params: Sequence[Tensor] = ()) -> Any:
        """``fn(*args)`` captured once checked; ``eager()`` (the same computation, uncompiled) on the first call
        and after a fallback. ``restore``: the module whose
        buffers the step updates (put back between the first call's two runs); ``params``: the parameters
        whose gradients the first call compares."""
        if self.state == "eager":
            return eager()
        if self.state == "captured":
            try:
                return self._run(device, args)
            except Exception as error:  # noqa: BLE001  (a later recompile past dynamo's limit, a compiler error)
                self._fall_back(_describe(error))
                return eager()
        return self._first_call(device, args, eager, restore, params)

    def _first_call(self, device: torch.device, args: tuple[Any, ...], eager: Callable[[], Any],
                    restore: nn.Module | None, params: Sequence[Tensor]) -> Any:
        start = time.perf_counter()
        snapshot = _Snapshot(restore, device)
        try:
            captured = self._run(device, args)
            captured_grads = _gradients(captured, params)  # compiles and runs the backward too
        except Exception as error:  # noqa: BLE001  (any compiler error: the run goes on eagerly)
            snapshot.restore()
            self._fall_back(f"compiling failed: {_describe(error)}")
            return eager()
        snapshot.restore()
        result = eager()
        low_precision = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        eager_grads = _gradients(result, params, retain=True)  # the eager loss trains if the check fails
        reason = difference(result, captured, eager_grads, captured_grads, low_precision)
        self.first_call_s = time.perf_counter() - start
        if reason is not None:
            self._fall_back(f"the captured result differs from the eager one on the first batch: {reason}")
            return result
        self.state = "captured"
        # The step that trains is the captured one, run again from the same start: a run is captured from
        # its first step on, so a run resumed from a checkpoint replays exactly what an unbroken run did.
        snapshot.restore()
        return self._run(device, args)

    def _fall_back(self, reason: str) -> None:
        self.state = "eager"
        self.fallback_reason = reason
        self._compiled = None
        warnings.warn(f"compile_step: the captured {self.what} is off, the run goes on eagerly with the results "
                      f"of {self.switch}: {reason}", stacklevel=4)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None, "_cuda_graphs": False,
                "state": "pending" if self.state == "captured" else self.state}


def _describe(error: BaseException) -> str:
    """``Type: first line of the message`` (a compiler's messages run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def bucket_size(n: int) -> int:
    """A captured graph's batch size for ``n`` points: the next power of two (at least 8), so that the
    shrinking subsets of points still alive take a handful of sizes (each one graph, recorded once)."""
    return max(8, 1 << (n - 1).bit_length())


def memory_format(x: Tensor) -> torch.memory_format:
    """``x``'s memory format: ``channels_last`` for a 4-D tensor stored so (and not also contiguous), else
    ``contiguous_format``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pad_batch(x: Tensor, y: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``(x, y)`` padded to ``size`` rows with copies of the first row (returned as they are if not shorter).
    The padded ``x`` keeps ``x``'s memory format (a captured graph is specialised on its inputs' strides)."""
    pad = size - x.shape[0]
    if pad <= 0:
        return x, y
    padded = torch.cat([x, x[:1].expand(pad, *x.shape[1:])]).contiguous(memory_format=memory_format(x))
    return padded, torch.cat([y, y[:1].expand(pad)])


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
            self._cuda_graphs = uses_cuda_graphs(arguments, x.device)
            compiled = self.__dict__["_compiled"] = torch.compile(self.model, **arguments)
        with _dynamo_settings():
            out = compiled(x)
        return out.clone() if self._cuda_graphs else out
