"""The README is tested: every command of its ``bash`` blocks and every ``python`` block runs here at a tiny
size, so an example that stops working fails CI.

The README is parsed at test time (new blocks are picked up) and its commands are run as written, with tiny
settings APPENDED (``TINY_TRAIN`` / ``TINY_EVAL``: a few steps, a few test points; an appended key replaces the
README's value for that key). How each command is checked:

- ``mma-train``: every combination of a multirun (``-m a=x,y``) is composed with Hydra's compose API and built
  (preset/norm check, the method with its model, the datamodule, the model-fits-data check): this is where a
  preset that does not compose with a ``norm=`` fails. Then the command (its first combination) is trained
  in-process (``mma_lightning.cli.train.train``), unless a rule of ``BUILD_ONLY`` says why it cannot run here
  or the same tiny config was trained already (``trainer.max_steps=20`` gives the same tiny run).
- ``mma-eval``: run in-process (``mma_lightning.cli.eval.evaluate``) on the checkpoint of a README run.
- ``<run>`` in a path is the run directory of the first README training run.
- Python blocks run each alone, in a fresh namespace, as a reader pastes them (a block that needs a name of
  another block fails), with both namespaces' Lightning ``Trainer`` and ``evaluate_model`` made tiny
  (``tiny_python``). The ``evaluate_model`` block also runs as written, untouched (slow): it must stay quick.
- Lines that set up the machine (``SETUP_COMMANDS``) are what ``.ci/run`` itself runs; any other first word
  fails the test until a rule is added here.
"""

from __future__ import annotations

import re
import shlex
from itertools import product
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mma_lightning.cli.train import check_model_fits_data, check_preset_norm, train

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")

SETUP_COMMANDS = ("python3", "pip", "apt-get", "sudo", "ruff", "mypy", "pytest", ".", "source")
# Commands that are composed and built but not run here, and why: (substring of the command, reason).
BUILD_ONLY = [
    ("trainer=gpu", "needs a GPU"),
    ("trainer=ddp ", "needs GPUs"),
    ("trainer=multinode", "needs several GPU machines"),
    ("hydra/launcher=slurm", "needs a SLURM cluster"),
    ("hydra/launcher=local", "submitit jobs: run by tests/test_cluster.py (slow)"),
    ("hydra/launcher=packed", "a packed sweep: run by tests/test_cli.py"),
    ("hparams_search=", "a sweep: run by tests/test_cli.py"),
    ("data=cifar10", "needs the CIFAR10 files (a download)"),
    ("experiment=cifar10", "needs the CIFAR10 files (a download)"),
    ("experiment=mnist", "needs the MNIST files (a download)"),
    ("data=mnist ", "needs the MNIST files (a download)"),
]
# Cluster launch commands (torchrun ... $(which mma-train) ...): their mma-train part is checked.
CLUSTER_PREFIXES = ("torchrun", "srun", "sbatch")
TINY_TRAIN = ["data.train_subset=100", "data.val_size=50", "data.eval_batch_size=50", "data.num_workers=0",
              "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
              "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "attack.nb_iter=2", "attack.eval_nb_iter=2",
              "method.search_steps=2", "method.eval_search_steps=2", "logger=csv"]
TINY_EVAL = ["evaluation=fast", "evaluation.max_samples=20", "evaluation.nb_iter=2", "evaluation.margin_nb_iter=2",
             "evaluation.margin_search_steps=2", "evaluation.probe_samples=10", "evaluation.progress=false",
             "+data.num_workers=0", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
             "cache_dir=null"]


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[list[str]]:
    """Every command line of the bash blocks, as words (comments dropped; ``a && b`` gives two commands)."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(words[:cut])
                words = words[cut + 1:]
    return found


def with_tiny(overrides: list[str], tiny: list[str]) -> list[str]:
    """``overrides`` then ``tiny``; a tiny key replaces the README's value for it."""
    keys = {t.split("=", 1)[0].lstrip("+~") for t in tiny}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys] + tiny


def combinations(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun: the cartesian product of the sweep overrides (``a=x,y``)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(c) for c in product(*choices)]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    hydra_node = any(o.lstrip("+~").startswith("hydra") for o in overrides)
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides],
                       return_hydra_config=hydra_node)


def build(cfg: DictConfig) -> None:
    """What mma-train does before fitting: preset/norm check, method, datamodule, model-fits-data check."""
    check_preset_norm(cfg)
    module, datamodule = instantiate(cfg.method), instantiate(cfg.data)
    check_model_fits_data(module, datamodule)


def test_the_readme_has_commands_and_python_blocks() -> None:
    words = [c[0] for c in commands()]
    assert words.count("mma-train") >= 5 and "mma-eval" in words and len(blocks("python")) >= 2


def test_every_readme_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    runs: list[Path] = []
    trained: set[str] = set()  # the tiny configs already trained (as YAML)
    checked = []
    for n, words in enumerate(commands()):
        line = " ".join(words)
        if words[0] in SETUP_COMMANDS:
            continue
        if words[0] in CLUSTER_PREFIXES:
            at = next((i for i, w in enumerate(words) if w.endswith(("mma-train", "mma-train)"))), None)
            assert at is not None, f"README command {line!r}: a cluster launch without mma-train"
            words = ["mma-train", *words[at + 1:]]  # e.g. torchrun ... $(which mma-train) <overrides>
            line = " ".join(words)
        if words[0] == "mma-train":
            checked.append(line)
            run_train_command(words[1:], line, tmp_path / f"cmd{n}", runs, trained)
        elif words[0] == "mma-eval":
            checked.append(line)
            run_eval_command(words[1:], line, tmp_path / f"cmd{n}", runs)
        else:
            pytest.fail(f"README command {line!r}: no rule in tests/test_readme.py says how to check it")
    assert checked


def _substitute(overrides: list[str], line: str, runs: list[Path]) -> list[str]:
    if not any("<run>" in o for o in overrides):
        return overrides
    assert runs, f"README command {line!r} names <run> before any README training run"
    return [re.sub(r"[^\s=]*<run>", str(runs[0]), o) for o in overrides]


def run_train_command(args: list[str], line: str, out: Path, runs: list[Path], trained: set[str]) -> None:
    multirun = bool({"-m", "--multirun"} & set(args))
    print_only = "--cfg" in args
    overrides = [a for a in args if a not in ("-m", "--multirun", "--cfg", "job", "hydra", "all")]
    overrides = _substitute(overrides, line, runs)
    jobs = combinations(overrides) if multirun else [overrides]
    for job in jobs:
        try:
            build(compose_train(job, out))
        except Exception as err:  # noqa: BLE001 - the README line is the useful part of the message
            raise AssertionError(f"README command {line!r} (job {job}) does not build: {err}") from err
    rule = next((why for pattern, why in BUILD_ONLY if pattern in line + " "), None)
    if print_only or rule is not None:
        return
    tiny = TINY_TRAIN + (["trainer.max_steps=4"] if any(o.startswith("ckpt_path=") for o in jobs[0]) else [])
    cfg = compose_train(with_tiny(jobs[0], tiny), out)
    same = OmegaConf.to_yaml(compose_train(with_tiny(jobs[0], tiny), Path("same_out")))
    if same in trained:  # e.g. a value the tiny settings replace: this run was already done
        return
    trained.add(same)
    metrics = train(cfg)
    assert "val/avg_eps" in metrics, f"README command {line!r}: no validation ran"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    runs.append(out)


def run_eval_command(args: list[str], line: str, out: Path, runs: list[Path]) -> None:
    from mma_lightning.cli.eval import evaluate

    overrides = _substitute(args, line, runs)
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"paths.output_dir={out}", *with_tiny(overrides, TINY_EVAL)])
    evaluations = evaluate(cfg)
    assert evaluations and (out / "results.json").is_file(), f"README command {line!r} wrote no results.json"


# --- python blocks --------------------------------------------------------------------------------------------
TINY_TRAINER = dict(max_steps=2, max_epochs=-1, limit_val_batches=1, limit_test_batches=1, val_check_interval=2,
                    num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
TINY_EVALUATE = dict(nb_iter=2, restarts=1, max_samples=16, margin_nb_iter=2, margin_search_steps=2, probe_samples=8,
                     batch_size=16, progress=False)


def tiny_trainer(trainer_class: type) -> type:
    """The README's ``Trainer(...)`` of one namespace with its length replaced: 2 steps, one validation and test
    batch."""

    class TinyTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(TINY_TRAINER)
            super().__init__(*args, **kwargs)

    return TinyTrainer


def tiny_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny overrides of the python blocks: each namespace's Trainer and the evaluation protocol's size."""
    import lightning

    import mma_lightning.evaluation as evaluation

    monkeypatch.setattr(pl, "Trainer", tiny_trainer(pl.Trainer))
    monkeypatch.setattr(lightning.pytorch, "Trainer", tiny_trainer(lightning.pytorch.Trainer))
    monkeypatch.setattr(lightning, "Trainer", lightning.pytorch.Trainer)
    evaluate_model = evaluation.evaluate_model

    def tiny_evaluate_model(*args, **kwargs):  # the tiny sizes replace the block's own
        return evaluate_model(*args, **{**kwargs, **TINY_EVALUATE})

    monkeypatch.setattr(evaluation, "evaluate_model", tiny_evaluate_model)


def run_alone(n: int, block: str) -> dict:
    """Run README python block ``n`` in a fresh namespace, as pasted into a new interpreter; its names."""
    namespace: dict = {"__name__": "__main__"}
    try:
        exec(compile(block, f"README.md python block {n}", "exec"), namespace)  # noqa: S102
    except Exception as err:
        raise AssertionError(f"README python block {n} fails when run alone:\n{block}\n"
                             f"{type(err).__name__}: {err}") from err
    return namespace


def test_every_readme_python_block_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_python(monkeypatch)
    for n, block in enumerate(blocks("python")):
        run_alone(n, block)
    assert (tmp_path / "report" / "results.json").is_file()  # the evaluation block wrote its report


@pytest.mark.slow
def test_the_readme_evaluation_block_is_quick_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``evaluate_model`` block, untouched: a quick look on a CPU (about 40 s on 2 busy cores), not the
    paper's protocol (88 min)."""
    import time

    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in blocks("python") if "evaluate_model(" in b]
    start = time.perf_counter()
    namespace = run_alone(0, block)
    seconds = time.perf_counter() - start
    assert seconds < 240, f"the README's evaluate_model block takes {seconds:.0f} s on this CPU"
    assert namespace["ev"].data_info["num_samples"] == 100
