"""``mma-eval`` on a checkpoint of ``MMAModule`` trained outside ``mma-train``: a plain
Lightning fit writes the checkpoint (no run config beside it); its model comes from ``model=`` or a
``_target_`` override, its data and norm from ``data=`` / ``norm=``, as for a released model file. Also the
command's messages for such a checkpoint (what is missing, weights that do not fit) and for a corrupt one
: one line, no traceback, nothing written."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from torch import nn

from mma_lightning import MMAModule
from mma_lightning.cli import eval as eval_cli
from mma_lightning.data import TensorDataModule
from mma_lightning.models import LeNet5Madry

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
DATA = ["data=fashion_mnist", f"data.data_dir={FASHION}", "data.download=false", "data.num_workers=0", "norm=linf"]
TINY = ["evaluation=fast", "evaluation.max_samples=16", "evaluation.nb_iter=2", "evaluation.margins=false",
        "evaluation.sanity=false", "evaluation.progress=false", "cache_dir=null",
        "trainer.enable_progress_bar=false"]


class TinyNet(nn.Module):
    """A user's own backbone (``+model._target_=test_eval_outside.TinyNet``)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def fit_outside(tmp_path: Path, net: nn.Module) -> Path:
    """Two MMA steps in a plain Lightning Trainer, the checkpoint saved where no run config is."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataModule(torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % 10, batch_size=8)
    module = MMAModule(net, max_eps=0.3, nb_iter=1, search_steps=2, optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "my_project" / "epoch_000.ckpt"
    path.parent.mkdir()
    trainer.save_checkpoint(path)
    return path


def run_eval(out: Path, overrides: list[str]) -> list:
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"paths.output_dir={out}", *overrides])
    return eval_cli.evaluate(cfg)


def test_eval_a_checkpoint_trained_outside_mma_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = LeNet5Madry()
    path = fit_outside(tmp_path, net)
    (evaluation,) = run_eval(tmp_path / "eval", [f"ckpt_path={path}", "model=lenet5_madry", *DATA, *TINY])
    assert (tmp_path / "eval" / "results.json").is_file()
    assert evaluation.name == "LeNet5Madry" and evaluation.pgd.norm == "linf"
    assert evaluation.pgd.eps_grid == (0.1, 0.2, 0.3, 0.4)  # the data's and norm's grid
    info = evaluation.model_info
    assert info["ckpt_path"] == str(path.resolve()) and info["global_step"] == 2 and "model_source" not in info
    assert evaluation.data_info["dataset"] == "FashionMNIST"
    # The checkpoint's weights were evaluated: the clean accuracy is the trained net's.
    x, y = evaluation_points(16)
    with torch.no_grad():
        expected = (net.eval()(x).argmax(1) == y).float().mean().item()
    assert evaluation.pgd.clean_accuracy == pytest.approx(expected)


def evaluation_points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mma_lightning.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(data_dir=str(FASHION), download=False, num_workers=0, batch_size=n)
    data.setup("test")
    x, y, _ = next(iter(data.test_dataloader()))
    return x, y


def test_eval_an_outside_checkpoint_of_ones_own_model_class(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = fit_outside(tmp_path, TinyNet(hidden=6))
    (evaluation,) = run_eval(tmp_path / "eval", [f"ckpt_path={path}", "+model._target_=test_eval_outside.TinyNet",
                                                 "+model.hidden=6", *DATA, *TINY])
    assert evaluation.name == "TinyNet" and evaluation.model_info["global_step"] == 2


# (id, overrides after ckpt_path=<an outside checkpoint of a LeNet5Madry>, text of the one message)
BAD_INPUT = [
    ("no-config", [], "no training config for ckpt_path="),
    ("no-config-hint", [], "for a checkpoint trained outside mma-train, model=<name> (one of ["),
    ("missing-model", DATA, "a checkpoint trained outside mma-train is evaluated with its model, data and norm "
                            "given here; missing: model. Add model=<name> (one of"),
    ("missing-data-norm", ["model=lenet5_madry"], "missing: data, norm. Add model=<name>"),
    ("wrong-model", ["+model._target_=test_eval_outside.TinyNet", *DATA],
     "do not fit model._target_=test_eval_outside.TinyNet (Error(s) in loading state_dict for TinyNet"),
    ("with-run-config", ["model=lenet5_madry", *DATA, "run_config=config.yaml"],
     "give a checkpoint's run either as run_config="),
]


@pytest.fixture(scope="module")
def outside_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_outside(tmp_path_factory.mktemp("outside"), LeNet5Madry())


def run_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             overrides: list[str]) -> str:
    """``mma-eval <overrides>`` as a command: its exit code is an error's, its stderr is returned."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["mma-eval", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as info:
        eval_cli.main()
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_eval_outside_bad_input_prints_one_message_and_writes_nothing(
        overrides: list[str], message: str, outside_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main(tmp_path, monkeypatch, capsys, [f"ckpt_path={outside_checkpoint}", *overrides, *TINY])
    assert message in err, err[-3000:]
    assert "Traceback" not in err and err.count(message) == 1, err[-3000:]
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".png", ".md")] == []


@pytest.mark.parametrize("content", [b"\x80\x03garbage" * 100, b""], ids=["foreign", "empty"])
def test_eval_a_corrupt_checkpoint_prints_one_line(content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run.parent / "config.yaml").write_text("data: {}\nmethod: {}\n")
    (run / "last.ckpt").write_bytes(content)
    err = run_main(tmp_path, monkeypatch, capsys, [f"ckpt_path={run / 'last.ckpt'}", *TINY])
    message = "is not a whole checkpoint (torch.save's zip format); a truncated or foreign file?"
    assert message in err and "Traceback" not in err and "UnpicklingError" not in err, err[-3000:]
