"""``examples/backbone_image_classifier.py``: Lightning's backbone example adopting MMA with ``MMAModule`` and
``with_index`` alone (README, "From a Lightning example"), run at tiny size on the 5k MNIST digits: its own
fit, ``test(ckpt_path="best")`` and ``predict(ckpt_path="best")``, then LightningCLI's subcommands (resume, test,
predict); and the README's diff against the plain classifier is the file's."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "backbone_image_classifier.py"
TINY = ["--model.net=backbone_image_classifier.Backbone",  # by its path: other tests define a Backbone too
        "--model.nb_iter=1", "--model.search_steps=2", "--model.eval_nb_iter=1",
        "--model.eval_search_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    from mma_lightning.data.offline import mnist5k_path

    try:
        mnist5k_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    import importlib
    import sys

    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        return importlib.import_module(EXAMPLE.stem)
    finally:
        sys.path.remove(str(EXAMPLE.parent))


def test_the_example_fits_tests_predicts_and_resumes(example: ModuleType, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    example.cli_main([*TINY, "--trainer.max_steps=2", root])  # the example's own: fit, test and predict "best"
    printed = capsys.readouterr().out
    assert "tensor([[" in printed  # predictions[0]: the logits of the first predict batch
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "epoch=0-step=2.ckpt"
    cli = example.subcommand_main(["fit", *TINY, "--trainer.max_steps=3", f"--ckpt_path={ckpt}", root])
    assert cli.trainer.global_step == 3 and len(cli.model.eps_store) == 3500
    cli = example.subcommand_main(["test", *TINY, f"--ckpt_path={ckpt}", root])
    assert {"test/acc", "test/robust_acc", "test/avg_eps", "test/loss"} <= set(cli.trainer.callback_metrics)
    cli = example.subcommand_main(["predict", *TINY, f"--ckpt_path={ckpt}", root])
    assert cli.trainer.predict_loop.predictions[0].shape == torch.Size([32, 10])


def test_the_readme_diff_is_the_examples() -> None:
    """Every added and context line of the README's diff is a line of the example (in order), and no removed
    line is (``LitClassifier`` is gone)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From a Lightning example"):]
    diff = re.search(r"```diff\n(.*?)```", section, re.DOTALL)
    assert diff is not None
    lines = [line for line in diff.group(1).splitlines() if not line.startswith(("---", "+++", "@@"))]
    source = EXAMPLE.read_text().splitlines()
    kept = [line[1:] for line in lines if line[:1] in ("+", " ")]
    position = 0
    for line in kept:
        position = source.index(line, position) + 1  # ValueError: not in the example, or out of order
    removed = [line[1:] for line in lines if line.startswith("-") and line[1:].strip()]
    assert "class LitClassifier(LightningModule):" in removed
    assert not any(line in source for line in removed if line.strip().startswith(("class ", "self.log")))
