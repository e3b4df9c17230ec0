"""``mma-eval`` on a released model file: a random-weight state dict in the authors'
``mma_training`` LeNet5-Madry layout (as tests/test_pretrained.py builds it), saved as their
``trained_models/<name>/model_best.pt`` holds it (``{"model": state_dict}``), evaluated by the README's
``mma-eval model_file=...`` line (its ``sh`` block; tests/test_readme.py runs the ``bash`` blocks, whose files
exist in a fresh checkout) with overrides APPENDED as tests/test_readme.py does (Debian's Fashion-MNIST for
MNIST, a tiny protocol); the RobustBench ``model_info`` fields in ``results.json``; the data and norm from a
run config instead; and the command's bad-input cases (one message naming the key, nothing written).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mma_lightning.cli import eval as eval_cli
from mma_lightning.evaluation.identity import model_identity
from mma_lightning.models import load_pretrained
from test_pretrained import lenet_state_dict

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")

README = Path(__file__).resolve().parents[1] / "README.md"
NAME = "fashion-Linf-MMA-0.45-sd0"
RELEASED = f"trained_models/{NAME}/model_best.pt"
# The README's data read offline: Debian's Fashion-MNIST instead of a download of MNIST.
OFFLINE = ["data=fashion_mnist", f"data.data_dir={FASHION}", "data.download=false"]
# The evaluation made tiny: 20 test points, 2 PGD steps, no margin search nor sanity probes (tested elsewhere).
TINY = ["evaluation=fast", "evaluation.max_samples=20", "evaluation.nb_iter=2", "evaluation.margins=false",
        "evaluation.sanity=false", "evaluation.progress=false", "data.num_workers=0",
        "trainer.enable_progress_bar=false"]


def readme_command() -> list[str]:
    """The README's ``mma-eval model_file=...`` line as overrides, ``<name>`` standing for :data:`NAME`."""
    lines = [line for line in README.read_text().splitlines() if line.startswith("mma-eval model_file=")]
    assert len(lines) == 1, f"README: expected one 'mma-eval model_file=' line, found {lines}"
    return [word.replace("<name>", NAME) for word in shlex.split(lines[0])[1:]]


def appended(overrides: list[str], extra: list[str]) -> list[str]:
    """``overrides`` then ``extra``; a key of ``extra`` replaces the value ``overrides`` gave it."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys] + extra


COMMAND = appended(readme_command(), OFFLINE)


def save_released(root: Path, seed: int = 0) -> Path:
    """The authors' checkpoint of a LeNet5-Madry (``{"model": state_dict}``) at ``root / RELEASED``."""
    path = root / RELEASED
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": lenet_state_dict(seed), "epoch": 50}, path)
    return path


def run_eval(out: Path, overrides: list[str]) -> list:
    """``mma-eval <overrides>`` in-process (Hydra's compose API, as tests/test_readme.py runs it)."""
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"paths.output_dir={out}", *overrides])
    return eval_cli.evaluate(cfg)


def test_eval_a_released_model_file_writes_the_report_with_robustbench_fields(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = save_released(tmp_path)
    out = tmp_path / "eval"
    assert f"model_file={RELEASED}" in COMMAND and "model_info.enabled=true" in COMMAND
    info = [f"cache_dir={tmp_path / 'cache'}"]
    (evaluation,) = run_eval(out, [*COMMAND, *TINY, *info])
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    (model,) = json.loads((out / "results.json").read_text())["models"]
    assert model["name"] == NAME
    assert model["model"]["model_source"] == "mma_training"
    assert model["model"]["model_file"] == str(path.resolve())
    assert model["model"]["state_sha256"] == model_identity(load_pretrained(path, "mma_training"))["state_sha256"]
    assert model["data"]["num_samples"] == 20 and model["pgd"]["eps"] == [0.1, 0.2, 0.3, 0.4]
    rb = model["robustbench"]
    assert rb["name"].startswith("MMA Training") and rb["venue"] == "ICLR 2020"
    assert rb["architecture"] == "LeNet5-Madry" and rb["dataset"] == "fashionmnist" and rb["eps"] == "0.3"
    at = model["pgd"]["eps"].index(0.3)
    assert rb["clean_acc"] == f"{100 * model['pgd']['clean_accuracy']:.2f}"
    assert rb["pgd_acc"] == f"{100 * model['pgd']['robust_accuracy'][at]:.2f}"
    assert rb["autoattack_acc"] is None and "AutoAttack was not run" in rb["footnote"]
    assert rb["reported"] is None and rb["additional_data"] is False and rb["number_forward_passes"] == 1
    # Started again on the same file: the finished evaluation comes from the cache (keyed by the weights).
    (again,) = run_eval(tmp_path / "again", [*COMMAND, *TINY, *info])
    assert again.pgd.robust_accuracy == evaluation.pgd.robust_accuracy
    assert len(list((tmp_path / "cache").glob("evaluation-*.pt"))) == 1
    save_released(tmp_path, seed=1)  # other weights in the same file: a new evaluation
    run_eval(tmp_path / "other", [*COMMAND, *TINY, *info])
    assert len(list((tmp_path / "cache").glob("evaluation-*.pt"))) == 2


def test_eval_a_released_model_with_the_data_and_norm_of_a_run_config(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_config=`` instead of ``data=`` / ``norm=``: the run's data and method (an L2 PGD-AT run here)."""
    monkeypatch.chdir(tmp_path)
    save_released(tmp_path)
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        run = compose(config_name="train", overrides=["method=pgd_at", "norm=l2", *OFFLINE[1:]])
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(OmegaConf.to_yaml(OmegaConf.create({"data": OmegaConf.to_container(run.data, resolve=True),
                                                          "method": OmegaConf.to_container(run.method,
                                                                                           resolve=True)})))
    (evaluation,) = run_eval(tmp_path / "eval", [f"model_file={RELEASED}", "model_source=mma_training",
                                                 f"run_config={config}", "evaluation.eps_grid=[1.0]",
                                                 "cache_dir=null", *appended(TINY, ["+data.num_workers=0"])])
    assert evaluation.pgd.norm == "l2" and evaluation.pgd.eps_grid == (1.0,)
    assert evaluation.model_info["method"] == "mma_lightning.methods.PGDATModule"
    assert evaluation.data_info["dataset"] == "FashionMNIST"


# (id, overrides, text of the one message); the released file exists at RELEASED unless the case says so.
BAD_INPUT = [
    ("unknown-source", ["model_file=" + RELEASED, "model_source=advertorch", "data=mnist", "norm=linf"],
     "model_source must be one of ['robustbench', 'mma_training']"),
    ("missing-file", ["model_file=nowhere/model_best.pt", "model_source=mma_training", "data=mnist", "norm=linf"],
     "model_file: 'nowhere/model_best.pt': no such file"),
    ("no-file", ["model_source=mma_training", "data=mnist", "norm=linf"],
     "model_source='mma_training' needs the released model's file: model_file=<file>"),
    ("with-ckpt", ["model_file=" + RELEASED, "model_source=mma_training", "ckpt_path=" + RELEASED],
     "give either a released model (model_file=<file> model_source=<layout>) or checkpoints"),
    ("no-data", ["model_file=" + RELEASED, "model_source=mma_training"],
     "model_file: the released model's data and norm is missing: add data=<name> norm=<name> (data one of"),
    ("no-norm", ["model_file=" + RELEASED, "model_source=mma_training", "data=mnist"],
     "the released model's norm is missing"),
    ("wrong-layout", ["model_file=" + RELEASED, "model_source=robustbench", "data=mnist", "norm=linf"],
     "source='robustbench': the state dict is not in the robustbench_wrn layout"),
    ("data-with-ckpt", ["ckpt_path=" + RELEASED, "data=mnist", "norm=linf"],
     "a checkpoint trained outside mma-train is evaluated with its model, data and norm given here; "
     "missing: model"),
    ("model-info-eps", ["model_file=" + RELEASED, "model_source=mma_training", "data=mnist", "norm=linf",
                        "model_info.enabled=true", "model_info.eps=0.25"],
     "model_info.eps=0.25 is not on the evaluation's eps grid"),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_eval_released_bad_input_prints_one_message_and_writes_nothing(
        overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    save_released(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mma-eval", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as info:
        eval_cli.main()
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert message in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".json", ".png", ".md")]
    assert written == []
