"""The notebooks in notebooks/ run headless on a CPU and show what they say they show; git holds them without
outputs.

Each notebook is executed with nbclient in a fresh ipykernel of *this* interpreter (a kernelspec written to a
temporary JUPYTER_PATH, so no globally registered "python3" kernel of another environment is picked up), in
an empty temporary working directory, with its committed parameters (the small ``FAST = True`` settings).
The test then reads the JSON that the notebook's cell tagged ``summary`` prints and checks the claim the
notebook makes. Execution times are printed (``pytest -s``) and recorded as the ``execution_s`` property.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import nbclient
import nbformat
import pytest

from mma_lightning.data import FashionMNISTDataModule

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CELL_TIMEOUT_S = 600
KERNEL_NAME = "python3"
PROBE_TAG = "interpreter-probe"


def fashion_mnist_present() -> bool:
    """Whether the four Fashion-MNIST IDX files of Debian's dataset-fashion-mnist are installed."""
    return FashionMNISTDataModule(data_dir=FASHION_MNIST_DIR, download=False).files_present()


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_present(),
    reason=f"the notebooks train on the real Fashion-MNIST in {FASHION_MNIST_DIR}, which is absent: "
           "apt-get install dataset-fashion-mnist",
)


def code_cells(nb: Any) -> list[Any]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def stdout_of(cell: Any) -> str:
    streams = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
    return "".join(o.text for o in streams)


def tagged(nb: Any, tag: str) -> Any:
    cells = [cell for cell in code_cells(nb) if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one code cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``python3`` kernelspec running ``sys.executable`` first on the Jupyter path; the kernel's runtime
    files, IPython profile and temporary files under ``tmp_path``. Returns the (empty) working directory."""
    jupyter_dir = tmp_path / "jupyter"
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    jupyter_path = [str(jupyter_dir), *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(jupyter_path))
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"), ("TMPDIR", "tmp")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    # One intra-op thread unless the caller chose: the notebooks' models are small, and OpenMP threads that
    # spin on a shared 2-core machine can make them several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    return workdir


def execute(name: str, workdir: Path) -> tuple[Any, float]:
    """Run notebook ``name`` in a fresh kernel, cwd ``workdir``; returns the executed notebook and seconds."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    probe = nbformat.v4.new_code_cell("import sys\nprint(sys.executable)", metadata={"tags": [PROBE_TAG]})
    nb.cells.append(probe)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, when a cell fails
    elapsed = time.perf_counter() - start
    errors = [o for cell in code_cells(nb) for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {[(o.ename, o.evalue) for o in errors]}"
    assert stdout_of(tagged(nb, PROBE_TAG)).strip() == sys.executable, "the kernel ran another interpreter"
    return nb, elapsed


def summary_of(nb: Any) -> dict[str, Any]:
    """The JSON printed by the notebook's cell tagged ``summary``."""
    return json.loads(stdout_of(tagged(nb, "summary")))


def check_quickstart(summary: dict[str, Any]) -> None:
    # MMA's per-sample eps grows during training, and the model learned something (chance is 10%).
    assert summary["last_avg_eps"] > summary["first_avg_eps"], summary
    assert summary["last_avg_eps"] > 0.02, summary  # above MIN_EPS, where every search starts
    assert summary["clean_accuracy"] > 0.5, summary
    assert summary["test_margin_mean"] > 0, summary


def check_compare_methods(summary: dict[str, Any]) -> None:
    (std,) = [v for k, v in summary.items() if k.startswith("STD")]
    (mma,) = [v for k, v in summary.items() if k.startswith("MMA")]
    assert len(summary) == 3 and any(k.startswith("PGD") for k in summary), sorted(summary)
    largest = max(mma["robust_accuracy"], key=float)
    # The shape of the paper's argument: at the largest eps MMA keeps at least standard training's robust
    # accuracy (standard training's has collapsed), and more on average over the grid.
    assert mma["robust_accuracy"][largest] >= std["robust_accuracy"][largest], summary
    assert mma["avg_robust_accuracy"] > std["avg_robust_accuracy"], summary
    for name, method in summary.items():
        curve = [method["clean_accuracy"], *(method["robust_accuracy"][e]
                                             for e in sorted(method["robust_accuracy"], key=float))]
        assert all(a >= b for a, b in zip(curve, curve[1:])), f"{name}: accuracy rises with eps: {curve}"


def check_drop_in(summary: dict[str, Any]) -> None:
    plain, hydra = summary["plain"], summary["hydra"]
    # The plain Lightning run and the Hydra-composed run are the same computation on a CPU.
    assert set(plain) == set(hydra) >= {"test/acc", "test/robust_acc", "test/avg_eps", "test/loss"}, summary
    for key in plain:
        assert hydra[key] == pytest.approx(plain[key], abs=1e-6), (key, summary)
    assert plain["test/acc"] > 0.2, summary  # a few steps of a ResNet-18: above chance (10%)


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "01_quickstart": check_quickstart,
    "02_compare_methods": check_compare_methods,
    "03_drop_in": check_drop_in,
}


def test_the_expected_notebooks_exist() -> None:
    assert NOTEBOOKS == sorted(CHECKS), f"notebooks/ holds {NOTEBOOKS}; give each one a check here"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"{name}: code cell {k} has outputs; strip them before committing"
        assert cell.execution_count is None, f"{name}: code cell {k} has an execution count; strip it"
    assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata; strip it"
    tagged(nb, "parameters")
    tagged(nb, "summary")


@needs_fashion_mnist
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name: str, kernel_env: Path,
                                record_property: Callable[[str, Any], None]) -> None:
    nb, elapsed = execute(name, kernel_env)
    record_property("execution_s", round(elapsed, 1))
    print(f"{name}: executed in {elapsed:.1f} s")
    CHECKS[name](summary_of(nb))
    written = sorted(p.name for p in kernel_env.iterdir())
    assert not written, f"{name} wrote into its working directory: {written}"
