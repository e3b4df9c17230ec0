"""``benchmarks/gpu_check.py --device cpu``: the GPU check's every section at a reduced size (issue 9).

The figures on a CPU mean nothing; what is checked is that the script the first GPU session will run works
end to end and that its numbers are consistent (pass counts, FLOPs, projection, real-data metrics).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_gpu_check_reduced_mode_runs_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = load_script()
    out = tmp_path / "report.json"
    report = gpu_check.main(["--device", "cpu", "--reps", "1", "--compile-backend", "eager", "--budget-min", "1000",
                             "--methods", "mma", "pgd_at", "--npz", str(tmp_path / "fashion_mnist.npz"),
                             "--data-dir", "/usr/share/datasets/fashion-mnist", "--out-dir", str(tmp_path / "run"),
                             "--json", str(out)])
    printed = capsys.readouterr().out
    size = gpu_check.REDUCED
    assert json.loads(out.read_text())["size"]["batch"] == size.batch
    assert report["skipped"] == []
    assert report["sync"]["ran"] is False and "CUDA-only" in printed
    assert [(r["precision"], r["captured"]) for r in report["passes"]] == [
        ("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    assert {(r["method"], r["variant"]) for r in report["steps"]} == {
        (m, v) for m in ("mma", "pgd_at") for v in ("eager", "captured")}
    for row in report["steps"] + report["batch"]:
        assert row["ms"] > 0 and row["img_per_s"] == pytest.approx(row["batch"] / (row["ms"] / 1e3))
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
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    ev = report["eval"]
    assert ev["points"] == size.eval_points and ev["clean_acc"] == 1.0 and ev["img_per_s"] > 0
    real = report["real"]
    assert real["steps"] == size.real_steps and 0 <= real["val/robust_acc"] <= real["val/acc"] <= 1
    assert real["train/avg_eps"] is not None and real["train/avg_eps"] >= 0
    assert (tmp_path / "fashion_mnist.npz").is_file()
    assert [r["variant"] for r in report["tuning"]] == ["captured, no cudnn.benchmark", "autotuned"]
    assert "[8] Fashion-MNIST" in printed and "[9] the captured MMA step" in printed and "total" in printed


def test_gpu_check_budget_skips_and_names_what_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = load_script()
    report = gpu_check.main(["--device", "cpu", "--only", "eval", "real", "--budget-min", "0"])
    assert report["skipped"] == ["eval", "real"] and "eval" not in report
    assert "[eval] skipped" in capsys.readouterr().out
