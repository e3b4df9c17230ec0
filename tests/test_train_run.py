"""``mma-train`` as a new user meets it: presets that compose with any ``norm=`` (or refuse it clearly), a test
pass that does not dwarf a short CPU run, and a run that ends by saying where everything is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

from mma_lightning.cli.train import check_preset_norm, limit_test_to_training, train

FASHION = Path("/usr/share/datasets/fashion-mnist")


def compose_train(*overrides: str, output_dir: str = "unused") -> DictConfig:
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.mark.parametrize(("norm", "max_eps"), [("linf", 0.2), ("l2", 3.0)])
def test_quickstart_composes_with_either_norm(norm: str, max_eps: float) -> None:
    """The README's sweep ``mma-train -m experiment=quickstart norm=linf,l2`` builds both runs."""
    cfg = compose_train("experiment=quickstart", f"norm={norm}")
    check_preset_norm(cfg)
    module = instantiate(cfg.method)
    assert module.norm == norm and module.hparams.max_eps == pytest.approx(max_eps)
    assert 0 < module.hparams.min_eps <= module.hparams.max_eps


@pytest.mark.parametrize(("preset", "own", "other"), [("mnist_linf_mma045", "linf", "l2"),
                                                      ("mnist_l2_omma4", "l2", "linf"),
                                                      ("cifar10_linf_pgdls8", "linf", "l2")])
def test_a_norm_specific_preset_refuses_the_other_norm(preset: str, own: str, other: str) -> None:
    check_preset_norm(compose_train(f"experiment={preset}"))
    check_preset_norm(compose_train(f"experiment={preset}", f"norm={own}"))
    with pytest.raises(ValueError, match=f"is a {own} preset .* cannot run with norm={other}"):
        check_preset_norm(compose_train(f"experiment={preset}", f"norm={other}"))


def test_bad_test_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"test_budget must be one of \['auto', None\]"):
        limit_test_to_training("some", None, None)  # type: ignore[arg-type]


def test_a_preset_test_limit_is_kept_and_said(caplog) -> None:
    """quickstart's trainer.limit_test_batches=4: the README's promise that the test pass says what it covers."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(limit_test_batches=4)
    data = SimpleNamespace(batch_size=50, eval_batch_size=500, test_set=range(10000))
    with caplog.at_level(logging.INFO, logger="mma_lightning.cli.train"):
        limit_test_to_training("auto", trainer, data)  # type: ignore[arg-type]
    assert trainer.limit_test_batches == 4
    assert ("testing on the first ~2000 of 10000 test images (trainer.limit_test_batches=4 batches of 500)"
            in caplog.text)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_short_cpu_run_tests_a_share_and_ends_with_its_paths(tmp_path: Path, caplog) -> None:
    """2 steps of batch 50 (100 images seen): the test pass covers ~100 of the 10,000 test images, not all of
    them, and the run ends with its directory, checkpoints and the mma-eval command."""
    cfg = compose_train("experiment=quickstart", "data.train_subset=200", "data.val_size=100",
                        "data.eval_batch_size=50", "trainer.max_steps=2", "trainer.val_check_interval=2",
                        "trainer.limit_test_batches=1.0", "attack.nb_iter=2", "attack.eval_nb_iter=2",
                        "method.search_steps=2", "method.eval_search_steps=2", "trainer.enable_progress_bar=false",
                        "trainer.enable_model_summary=false", "logger=csv", output_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="mma_lightning.cli.train"):
        metrics = train(cfg)
    assert "test/acc" in metrics
    text = caplog.text
    assert "testing on the first ~100 of 10000 test images" in text and "test_budget=null" in text
    best = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert f"run directory:   {tmp_path}" in text and f"best checkpoint: {best}" in text
    assert f"last checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in text
    assert f"mma-eval ckpt_path={best}" in text
