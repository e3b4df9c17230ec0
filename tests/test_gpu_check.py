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
    report = gpu_check.main(["--device", "cpu", "--reps", "1", "--compile-backend", "eager",
                             "--npz", str(tmp_path / "fashion_mnist.npz"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["size"]["batch"] == gpu_check.REDUCED.batch
    assert report["sync"]["ran"] is False and "CUDA-only" in printed
    assert [r["variant"] for r in report["speed"]] == list(gpu_check.VARIANTS)
    for row in report["speed"]:
        assert row["mma_ms"] > 0 and row["pgd_at_ms"] > 0
        assert row["ratio"] == pytest.approx(row["mma_ms"] / row["pgd_at_ms"])
    size = gpu_check.REDUCED
    p = report["projection"]
    # MMA: clean + mixed training forwards, K PGD forwards, S search forwards; K input + 2 training backwards
    assert p["mma_passes"] == {"forwards": 2 + size.nb_iter + size.search_steps, "backwards": size.nb_iter + 2}
    assert p["pgd_at_passes"] == {"forwards": size.nb_iter + 1, "backwards": size.nb_iter + 1}
    units = (2 + size.nb_iter + size.search_steps) + size.nb_iter + 2 * 2
    assert p["flop_per_step_wrn28_4"] == pytest.approx(units * size.batch * 1.69e9)
    assert p["projected_50k_minutes"] == pytest.approx(50_000 * p["mma_step_ms"] / 1e3 / 60)
    real = report["real"]
    assert real["steps"] == size.real_steps and 0 <= real["val/robust_acc"] <= real["val/acc"] <= 1
    assert real["train/avg_eps"] is not None and real["train/avg_eps"] >= 0
    assert (tmp_path / "fashion_mnist.npz").is_file()
    assert "[4] Fashion-MNIST" in printed and "total" in printed
