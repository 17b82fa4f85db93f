"""Every option of every config group composes from the real conf/ and instantiates; bad values fail clearly."""
from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import CONF, compose_cfg
from fmnist_exp import config

GROUPS = ["model", "optimizer", "regularization", "schedule", "ablation"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_its_documented_options():
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert names["model"] == {"mlp", "cnn"}
    assert names["optimizer"] == {"sgd", "adam", "adamw"}
    assert {"none", "batchnorm", "dropout", "weight_decay"} <= names["regularization"]
    assert names["schedule"] == {"constant", "step", "cosine", "plateau"}
    assert names["ablation"] == {"plain", "he", "he_bn", "he_bn_dropout"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option):
    cfg = compose_cfg(f"{group}={option}")
    config.validate(cfg)
    model = instantiate(cfg.model)
    optimizer = config.build_torch_optimizer(cfg.optimizer, model.parameters())
    scheduler = instantiate(cfg.schedule)(optimizer=optimizer)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    assert scheduler.optimizer is optimizer


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("regularization", ["none", "batchnorm", "dropout", "weight_decay"])
def test_regularization_presets_compose_with_every_model(model, regularization):
    cfg = compose_cfg(f"model={model}", f"regularization={regularization}", "optimizer=sgd")
    config.validate(cfg)
    net = instantiate(cfg.model)
    has_bn = any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in net.modules())
    has_dropout = any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert has_bn == (regularization in ("batchnorm", "dropout"))
    assert has_dropout == (regularization == "dropout")
    assert cfg.optimizer.weight_decay == (1e-3 if regularization == "weight_decay" else 0.0)


def test_defaults_are_the_notebook_headline_run():
    cfg = compose_cfg()
    assert cfg.model._target_ == "fmnist_exp.models.MLP" and list(cfg.model.hidden) == [128, 64]
    assert cfg.optimizer.kind == "adam" and cfg.optimizer.lr == 1e-3
    assert (cfg.data.batch_size, cfg.data.valid_size, cfg.train.epochs, cfg.train.seed) == (100, 10000, 17, 0)
    assert cfg.train.device == "auto" and cfg.train.resume is None and cfg.data.download is True
    assert cfg.tracking.experiment == "fmnist" and cfg.tracking.uri is None
    assert compose_cfg("optimizer=sgd").optimizer.lr == 0.1


def test_notebook_experiment_is_a_16_run_grid():
    cfg = compose_cfg("+experiment=notebook", hydra=True)
    params = cfg.hydra.sweeper.params
    sizes = [len(str(v).split(",")) for v in params.values()]
    assert sizes == [2, 2, 4] and set(params) == {"optimizer", "data.batch_size", "ablation"}
    ladder = {name: compose_cfg(f"ablation={name}").model for name in ("plain", "he", "he_bn", "he_bn_dropout")}
    assert [(m.init, m.batch_norm, list(m.dropout)) for m in ladder.values()] == [
        ("default", False, []), ("he", False, []), ("he", True, []), ("he", True, [0.5, 0.2])]


def test_cosine_schedule_follows_epochs():
    assert compose_cfg("schedule=cosine", "train.epochs=9").schedule.T_max == 9


def test_wrong_type_and_typo_fail_at_compose():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("data.batch_size=abc")
    assert isinstance(e.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException, match="Could not override 'data.batchsize'"):
        compose_cfg("data.batchsize=16")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("optimizer=rmsprop")


@pytest.mark.parametrize("override,key", [
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-5", "data.batch_size"),
    ("data.valid_size=60000", "data.valid_size"), ("data.valid_size=0", "data.valid_size"),
    ("train.epochs=0", "train.epochs"), ("optimizer.lr=0", "optimizer.lr"), ("optimizer.lr=-1", "optimizer.lr"),
    ("model.dropout=[1.0,0.2]", "model.dropout[0]"), ("model.dropout=[0.5]", "model.dropout"),
    ("model.init=kaiming", "model.init"), ("train.monitor=test_acc", "train.monitor"),
    ("train.device=tpu", "train.device"), ("optimizer.kind=rmsprop", "optimizer.kind"),
])
def test_validate_names_the_bad_key(override, key):
    with pytest.raises(config.ConfigError) as e:
        config.validate(compose_cfg(override))
    message = str(e.value)
    assert message.startswith(f"{key}=") and "pass e.g." in message and "\n" not in message


def test_where_how_keys_change_neither_run_names_nor_the_config_hash():
    from fmnist_exp import job, store
    assert {"train.threads", "train.flush_denormal", "tracking.uri", "train.resume"} <= config.where_how_keys()
    where_how = ["tracking.uri=sqlite:///x.db", "train.threads=1", "data.root=/elsewhere", "train.progress=on"]
    assert job.run_name(["optimizer=sgd", *where_how]) == "optimizer=sgd"

    def config_hash(*overrides):
        return store.config_hash(store.flatten(OmegaConf.to_container(compose_cfg(*overrides), resolve=True)),
                                    config.where_how_keys())
    assert config_hash("optimizer=sgd") == config_hash("optimizer=sgd", *where_how)
    assert config_hash("optimizer=sgd") != config_hash("optimizer=sgd", "train.seed=1")


def test_cnn_experiment_is_the_measured_recipe():
    cfg = compose_cfg("+experiment=cnn")
    assert cfg.model._target_ == "fmnist_exp.models.CNN" and cfg.model.batch_norm and list(cfg.model.dropout) == [0.5, 0.2]
    assert cfg.optimizer.kind == "adamw" and (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (0.002, 0.05)
    assert cfg.schedule._target_.endswith("CosineAnnealingLR") and cfg.schedule.T_max == cfg.train.epochs == 17
    assert cfg.train.monitor == "valid_acc"
    config.validate(cfg)


@pytest.mark.parametrize("option,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW)])
def test_an_optimizer_option_names_the_kind_training_builds(option, cls):
    from fmnist_exp import job, stacked
    cfg = compose_cfg(f"optimizer={option}")
    config.validate(cfg)
    assert cfg.optimizer.kind == option and "_target_" not in cfg.optimizer  # nothing for Hydra to instantiate
    assert type(config.build_torch_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])) is cls
    member = job.build(cfg, torch.device("cpu"))
    assert member.hyper["kind"] == option and member.hyper["lr"] == cfg.optimizer.lr
    stacked.StackedOptimizer([torch.zeros(1, 3)], [member.hyper])  # the fused optimizer takes the job's settings
    assert job.hparams(cfg, f"optimizer={option}")["optimizer"] == cls.__name__  # TensorBoard's column: SGD, Adam


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.kind=rmsprop"], "optimizer.kind='rmsprop' is invalid: it must be one of sgd|adam|adamw"),
    (["optimizer=sgd", "optimizer.kind=adam"], "optimizer.kind=adam is invalid here: Adam needs optimizer.betas"),
    (["optimizer=adam", "optimizer.kind=sgd"], "optimizer.kind=sgd is invalid here: SGD needs optimizer.momentum, "
                                               "optimizer.nesterov"),
])
def test_an_optimizer_training_cannot_build_is_refused_in_one_line(overrides, message):
    with pytest.raises(config.ConfigError) as e:
        config.validate(compose_cfg(*overrides), overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", [
    "defaults:\n  - /adam_schema@_here_\n  - _self_\n\nkind: rmsprop\n",  # adam.yaml copied, its kind changed
    "_target_: torch.optim.RMSprop\nlr: 0.01\nweight_decay: 0.0\n",  # a class for Hydra to build: nothing would
])
def test_an_optimizer_option_of_ones_own_that_training_cannot_build_is_refused_in_one_line(tmp_path, text):
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "rmsprop.yaml").write_text(text)
    cfg = compose_cfg(f"hydra.searchpath=[file://{tmp_path}]", "optimizer=rmsprop")
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg)
    assert str(e.value).startswith("optimizer.kind=") and "must be one of sgd|adam|adamw" in str(e.value)
    assert "\n" not in str(e.value)
