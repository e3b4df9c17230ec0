"""``benchmarks/gpu_check.py``: the GPU check's dress rehearsal on the CPU, and how it keeps its results.

The figures on a CPU mean nothing; what is checked is that the script a first GPU run will use works end to
end (every section, in one process, at the reduced size) and that its numbers are consistent (pass counts, FLOPs,
projection, real-data metrics); and, with the sections replaced by stand-ins, that a failing section, missing data,
the budget or an interruption never costs the report what finished.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture
def gpu_check() -> ModuleType:
    return load_script()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the reduced sizes' tiny convolutions run faster so, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_npz(path: Path) -> Path:
    """A Fashion-MNIST-shaped ``.npz`` of a few images (what the data check and ``real`` read)."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 64),
             x_test=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 16))
    return path


def fake_idx_dir(path: Path, gpu_check: ModuleType) -> Path:
    """A folder with Fashion-MNIST's four IDX file names (the data check looks for the files, the stand-in
    sections read nothing)."""
    path.mkdir()
    for stem in gpu_check.IDX_FILES:
        (path / f"{stem}.gz").write_bytes(b"")
    return path


def stand_ins(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, out: Path,
              seen: dict[str, dict[str, Any]]) -> None:
    """Every section replaced by one that records the JSON report as it finds it and stores a figure (and no
    dynamo reset or garbage collection between them: nothing was compiled)."""
    monkeypatch.setattr(gpu_check, "clean_slate", lambda device: None)
    for name in gpu_check.SECTIONS:
        def section(run: Any, name: str = name) -> None:
            seen[name] = json.loads(out.read_text())
            run.report[name] = {"figure": name}
        monkeypatch.setattr(gpu_check, f"section_{name}", section)


# --- the dress rehearsal ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
                    and not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (the command-line run reads its IDX files)")
def test_gpu_check_reduced_mode_runs_every_section(gpu_check: ModuleType, one_thread: None, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    report = gpu_check.main(["--device", "cpu", "--reps", "1", "--compile-backend", "eager", "--budget-min", "1000",
                             "--methods", "mma", "pgd_at", "--npz", str(tmp_path / "fashion_mnist.npz"),
                             "--data-dir", str(DEBIAN_FASHION_MNIST), "--out-dir", str(tmp_path / "run"),
                             "--json", str(out)])
    printed = capsys.readouterr().out
    size = gpu_check.REDUCED
    saved = json.loads(out.read_text())
    assert saved["size"]["batch"] == size.batch and saved["status"] == "finished" and saved["failed"] == []
    assert report["failed"] == [] and report["skipped"] == ["sync"]  # sync debug mode needs CUDA
    assert {n: s["status"] for n, s in report["sections"].items()} == {
        n: "skipped" if n == "sync" else "ok" for n in gpu_check.SECTIONS}
    assert report["sync"]["ran"] is False and "CUDA-only" in printed
    for name, state in report["sections"].items():  # every section starts clean and stays under the limit
        assert state["graphs"] <= gpu_check.GRAPHS_PER_FUNCTION, (name, state)
        assert state["seconds"] >= state["compile_s"] >= 0 and state["errors"] == []
    assert [(r["precision"], r["captured"]) for r in report["passes"]] == [
        ("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    assert {(r["method"], r["variant"]) for r in report["steps"]} == {
        (m, v) for m in ("mma", "pgd_at") for v in ("eager", "captured")}
    for row in report["steps"] + report["batch"] + report["tuning"]:
        assert row["ms"] > 0 and row["img_per_s"] == pytest.approx(row["batch"] / (row["ms"] / 1e3))
        assert row["first_call_s"] > 0 and row["cudagraph_skips"] == 0
        if row["variant"] != "eager":  # the library's own account of the capture, where it gives one
            assert row.get("capture_state", "captured") == "captured", row
    assert [r["batch"] for r in report["batch"]] == list(size.big_batches)
    p = report["projection"]
    # MMA: clean + mixed training forwards, K PGD forwards, S search forwards; K input + 2 training backwards
    assert p["mma_passes"] == {"forwards": 2 + size.nb_iter + size.search_steps, "backwards": size.nb_iter + 2}
    assert p["pgd_at_passes"] == {"forwards": size.nb_iter + 1, "backwards": size.nb_iter + 1}
    units = (2 + size.nb_iter + size.search_steps) + size.nb_iter + 2 * 2
    assert p["flop_per_step_wrn28_4"] == pytest.approx(units * size.batch * 1.69e9)
    assert p["projected_50k_minutes"] == pytest.approx(50_000 * p["mma_step_ms"] / 1e3 / 60)
    train = report["train"]  # the command line's run: its steps timed, next to the isolated captured step
    assert train["steps"] == size.train_steps and train["cli_step_ms"] > 0 and train["isolated_step_ms"] > 0
    assert all(c.get("capture_state", "captured") == "captured" for c in train["cli_captures"].values())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    ev = report["eval"]
    assert ev["points"] == size.eval_points and ev["clean_acc"] == 1.0 and ev["img_per_s"] > 0
    real = report["real"]
    assert real["steps"] == size.real_steps and 0 <= real["val/robust_acc"] <= real["val/acc"] <= 1
    assert real["train/avg_eps"] is not None and real["train/avg_eps"] >= 0
    assert (tmp_path / "fashion_mnist.npz").is_file()  # written from the IDX files
    assert [r["variant"] for r in report["tuning"]] == ["captured, no cudnn.benchmark", "autotuned"]
    assert "[8] Fashion-MNIST" in printed and "[9] the captured MMA step" in printed and "total" in printed
    assert f"report: {out}" in printed


# --- nothing that finished is lost ---------------------------------------------------------------------------------
def test_a_failing_section_is_recorded_and_the_others_run(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "report.json"  # its folder is made
    seen: dict[str, dict[str, Any]] = {}
    stand_ins(gpu_check, monkeypatch, out, seen)

    def broken(run: Any) -> None:
        seen["eval"] = json.loads(out.read_text())
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(gpu_check, "section_eval", broken)
    argv = ["--device", "cpu", "--npz", str(tiny_npz(tmp_path / "f.npz")),
            "--data-dir", str(fake_idx_dir(tmp_path / "idx", gpu_check)), "--json", str(out)]
    assert gpu_check.cli(argv) == 1  # the exit status names the failure
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["failed"] == ["eval"] and report["status"] == "finished" and report["skipped"] == []
    error = report["sections"]["eval"]["errors"][0]
    assert (error["where"], error["type"], error["message"]) == ("eval", "RuntimeError", "the evaluation broke")
    assert any("in broken" in line for line in error["traceback"])  # the frame that raised
    assert "the evaluation broke" in printed and "FAILED [eval]" in printed
    for name in gpu_check.SECTIONS:  # every other section ran, and its figure is in the file
        assert report[name if name != "eval" else "sync"] == {"figure": name if name != "eval" else "sync"}
        assert report["sections"][name]["status"] == ("failed" if name == "eval" else "ok")
    # the file was written before each section, with every earlier one's result, also after the failure
    order = list(gpu_check.SECTIONS)
    for i, name in enumerate(order):
        before = seen[name]
        assert before["sections"][name]["status"] == "running" and before["status"] == "running"
        assert all(before["sections"][n]["status"] in ("ok", "failed") for n in order[:i])
        assert all(before["sections"][n]["status"] == "pending" for n in order[i + 1:])
        assert all(n in before for n in order[:i] if n != "eval")
    assert seen["real"]["sections"]["eval"]["errors"][0]["message"] == "the evaluation broke"
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


def test_a_failing_part_and_a_fallback_fail_the_section_but_keep_its_rows(
        gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One method's steps raise, one captured step fell back to eager: both recorded, the other rows kept, the
    fallback not reported as a captured speed."""
    def step_times(device: Any, size: Any, batch: int, methods: tuple[str, ...], variants: tuple[str, ...],
                   *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if methods == ("omma",):
            raise RuntimeError("omma broke")
        module = SimpleNamespace(captures={"train": SimpleNamespace(state="eager", first_call_s=2.5,
                                                                    fallback_reason="compiling failed: boom")})
        base = {"method": "mma", "batch": batch, "ms": 10.0, "img_per_s": batch / 0.01, "peak_gib": None,
                "peak_reserved_gib": None, "first_call_s": 3.0, "warmup_s": 3.0, "cudagraph_skips": 0}
        return [dict(base, variant="eager"),
                gpu_check.fell_back(dict(base, variant="captured", **gpu_check.capture_info(module)))]

    monkeypatch.setattr(gpu_check, "step_times", step_times)
    out = tmp_path / "report.json"
    assert gpu_check.cli(["--device", "cpu", "--only", "steps", "--methods", "mma", "omma", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    steps = report["sections"]["steps"]
    assert steps["status"] == "failed" and report["failed"] == ["steps"]
    assert [(e["where"], e["type"]) for e in steps["errors"]] == [
        ("mma/captured/4", "FellBackToEager"), ("steps:omma", "RuntimeError")]
    eager, captured = report["steps"]
    assert eager["ms"] == 10.0 and captured["ms"] is None and captured["eager_ms"] == 10.0
    assert captured["status"] == "fell back to eager: compiling failed: boom"
    assert captured["capture_first_call_s"] == 2.5 and captured["first_call_s"] == 3.0
    assert "fell back to eager: compiling failed: boom" in printed


@pytest.mark.parametrize("npz_present", [False, True], ids=["no data", "npz only"])
def test_missing_data_skips_the_data_sections_with_the_reason(
        gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], npz_present: bool) -> None:
    out = tmp_path / "report.json"
    seen: dict[str, dict[str, Any]] = {}
    stand_ins(gpu_check, monkeypatch, out, seen)
    npz = tiny_npz(tmp_path / "f.npz") if npz_present else tmp_path / "absent.npz"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_check.cli(["--device", "cpu", "--npz", str(npz), "--data-dir", str(empty), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    missing = ["train"] if npz_present else ["train", "real"]
    assert report["skipped"] == missing and report["failed"] == []
    assert sorted(seen) == sorted(set(gpu_check.SECTIONS) - set(missing))  # the others ran
    assert "--data-dir" in report["sections"]["train"]["reason"]
    assert "[train] will be skipped: no Fashion-MNIST IDX files" in printed
    if not npz_present:
        reason = report["sections"]["real"]["reason"]
        assert "--npz" in reason and "--data-dir" in reason and "is missing" in reason
    # the skips are in the file before the first section starts
    assert seen["sync"]["sections"]["train"]["status"] == "skipped"


def test_an_interrupted_run_keeps_what_finished(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    stand_ins(gpu_check, monkeypatch, out, {})

    def killed(run: Any) -> None:
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(gpu_check, "section_steps", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--only", "sync", "passes", "steps", "batch", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["status"] == "interrupted" and report["failed"] == ["steps"]
    assert [report["sections"][n]["status"] for n in ("sync", "passes", "steps", "batch")] == [
        "ok", "ok", "interrupted", "pending"]
    assert report["passes"] == {"figure": "passes"}


def test_the_report_is_replaced_atomically(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    gpu_check.write_json({"a": 1}, out)
    assert json.loads(out.read_text()) == {"a": 1}

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the new bytes are written, never in place
    with pytest.raises(OSError):
        gpu_check.write_json({"a": 2}, out)
    assert json.loads(out.read_text()) == {"a": 1}  # the last good report stays
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# --- the budget, compile time and the recompile limit ------------------------------------------------------------------
def test_gpu_check_budget_skips_and_names_what_does_not_fit(gpu_check: ModuleType, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    report = gpu_check.main(["--device", "cpu", "--only", "eval", "real", "--budget-min", "0",
                             "--npz", str(tiny_npz(tmp_path / "f.npz")), "--json", str(tmp_path / "r.json")])
    assert report["skipped"] == ["eval", "real"] and "eval" not in report
    assert "[eval] skipped" in capsys.readouterr().out
    assert report["sections"]["eval"]["status"] == "skipped" and "--only eval" in report["sections"]["eval"]["reason"]


def test_the_budget_counts_compile_time_per_new_graph(gpu_check: ModuleType) -> None:
    """On CUDA each new captured training-step graph counts 90 s: two of them do not fit in three minutes."""
    def run(device: str, minutes: float) -> Any:
        return gpu_check.Run(None, torch.device(device), gpu_check.FULL, 1, "inductor", gpu_check.Budget(minutes),
                             {}, None)

    assert not run("cuda", 3).allows("steps", 10, step_graphs=2)  # 10 + 2 * 90 > 180
    assert run("cuda", 3).allows("steps", 10, step_graphs=1)
    assert run("cpu", 3).allows("steps", 10, step_graphs=2)
    cuda = run("cuda", 1)
    assert not cuda.allows("passes", 10, pass_graphs=2) and cuda.budget.skipped == ["passes"]


def test_no_section_builds_more_graphs_of_one_function_than_dynamo_allows(gpu_check: ModuleType) -> None:
    plan = gpu_check.graph_plan(gpu_check.FULL, gpu_check.METHODS)
    assert set(plan) == set(gpu_check.SECTIONS)
    assert max(plan.values()) <= gpu_check.GRAPHS_PER_FUNCTION == torch._dynamo.config.recompile_limit


def test_cuda_graph_skips_raise_on_cuda(gpu_check: ModuleType) -> None:
    import torch._inductor.config as inductor_config

    with gpu_check.cudagraphs_or_error(torch.device("cpu")) as mode:
        assert mode == "n/a"
    before = inductor_config.triton.cudagraph_or_error
    with gpu_check.cudagraphs_or_error(torch.device("cuda")) as mode:
        assert mode == "error" and inductor_config.triton.cudagraph_or_error is True
    assert inductor_config.triton.cudagraph_or_error == before


def test_without_cudagraph_or_error_a_skip_counted_fails_the_section(
        gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A torch without ``cudagraph_or_error``: inductor's skip counter, read around each section, fails it."""
    from contextlib import contextmanager

    from torch._dynamo.utils import counters

    @contextmanager
    def counter_mode(device: Any) -> Iterator[str]:
        yield "counter"

    def skipping(run: Any) -> None:
        counters["inductor"]["cudagraph_skips"] += 1
        run.report["passes"] = []

    out = tmp_path / "report.json"
    stand_ins(gpu_check, monkeypatch, out, {})
    monkeypatch.setattr(gpu_check, "cudagraphs_or_error", counter_mode)
    monkeypatch.setattr(gpu_check, "section_passes", skipping)
    assert gpu_check.cli(["--device", "cpu", "--only", "sync", "passes", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["cudagraph_check"] == "counter" and report["failed"] == ["passes"]
    assert report["sections"]["passes"]["cudagraph_skips"] == 1 and report["sections"]["sync"]["status"] == "ok"
    assert report["sections"]["passes"]["errors"][0]["type"] == "CudagraphSkipped"


def test_capture_info_reads_the_library_when_it_has_one(gpu_check: ModuleType) -> None:
    assert gpu_check.capture_info(object()) == {}  # a module without captured functions
    assert gpu_check.capture_info(SimpleNamespace(captures={})) == {}  # compile_step off
    pending = SimpleNamespace(captures={"train": SimpleNamespace(state="pending")})
    assert gpu_check.capture_info(pending) == {"capture_state": "pending", "capture_first_call_s": None,
                                               "fallback_reason": None}
    row = gpu_check.fell_back({"ms": 5.0, "img_per_s": 1.0, **gpu_check.capture_info(pending)})
    assert row["ms"] == 5.0 and "status" not in row  # only a fallback is relabelled
