"""``benchmarks/compile_time.py`` on a tiny CPU run: its measures of the two captured designs of the MMA step
(``compile_step={"graphs": "step" | "passes"}``) and the eager baseline, with dynamo's ``eager`` backend (tracing
and guards, no code generation) on a 2-layer conv net at K = S = 1 and 2."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_time.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compile_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_time"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does: on a shared, loaded CPU more threads spin-wait
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop("compile_time", None)
    torch._dynamo.reset()


def two_conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_measures_both_designs_and_the_baseline(bench) -> None:
    rows = {}
    for k in (1, 2):
        for row in bench.measure_config(two_conv_net, (3, 8, 8), 3, "conv2", k, k, ["step", "passes"],
                                        backend="eager", batch=4, reps=1, cache_root=None, fit_steps=20):
            rows[row.design, k] = row
    for k in (1, 2):
        eager, step, passes = rows["eager", k], rows["step", k], rows["passes", k]
        assert eager.state == "eager" and eager.graphs == 0 and eager.compile_s == 0.0
        assert step.state == passes.state == "captured", (step.fallback_reason, passes.fallback_reason)
        assert step.graphs == 1  # the whole step, one graph
        assert passes.graphs >= 2  # a graph per kind of pass (train mode, eval mode)
        for row in (eager, step, passes):
            assert row.steady_runs == 1 and row.steady_ms > 0 and row.first_s > 0
            assert row.recompiled == 0  # the steady state replays what the first call compiled
        assert step.compile_s > 0 and step.trace_s > 0 and step.first_s >= step.compile_s
    # the whole-step graph grows with K and S (the loops unrolled); the passes do not
    assert rows["step", 2].ops > rows["step", 1].ops
    assert rows["passes", 2].graphs == rows["passes", 1].graphs
    assert rows["passes", 2].ops == rows["passes", 1].ops

    table = bench.format_table(list(rows.values()))
    assert "steady ms" in table and "passes" in table and "conv2" in table
    json.dumps([bench.asdict(r) for r in rows.values()])  # --json writes them


def test_command_line(bench) -> None:
    args = bench.parse_args(["--model", "wrn28_4", "--ks", "10", "--designs", "step", "--batch", "16"])
    assert (args.model, args.ks, args.designs, args.batch, args.backend) == ("wrn28_4", "10", "step", 16, "inductor")
    with pytest.raises(SystemExit):
        bench.parse_args(["--designs", "whole"])


def test_a_failed_check_still_times_the_compiled_step(bench, monkeypatch) -> None:
    """Where the first call's check fails the run goes on eagerly; the benchmark says so and times the compiled
    step anyway (state "forced")."""
    from mma_lightning import capture

    monkeypatch.setattr(capture, "difference", lambda *args, **kwargs: "a made-up difference")
    eager, step = bench.measure_config(two_conv_net, (3, 8, 8), 3, "conv2", 1, 1, ["step"], backend="eager",
                                       batch=4, reps=1, cache_root=None, fit_steps=0)
    assert step.state == "forced" and "a made-up difference" in step.fallback_reason
    assert step.recompiled == 0 and step.steady_runs == 1
    assert "fell back to eager" in bench.format_table([eager, step])
