"""Typed config schema (registered in Hydra's ConfigStore) and the range checks that types can't express.

The YAML files in conf/ fill these dataclasses; a typo or a wrong type fails at compose time with Hydra's own
message, and `validate` turns a bad value into one line that names the key and says what to do.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# shipped inside the package (a wheel carries it); the repo's top-level conf/ links here for users to browse
CONF_DIR = Path(__file__).resolve().parent / "conf"


class ConfigError(ValueError):
    """A config value that composes but cannot work; the message names the key and the fix."""


@dataclass
class MLPConfig:
    _target_: str = "fmnist_exp.models.MLP"
    hidden: list[int] = field(default_factory=lambda: [128, 64])  # notebook: 784-128-64-10
    init: str = "default"  # default|he|xavier|zeros|normal
    init_std: float = 0.01  # std of init=normal
    batch_norm: bool = False
    dropout: list[float] = field(default_factory=list)  # one probability per hidden layer; [] = none


@dataclass
class CNNConfig:
    _target_: str = "fmnist_exp.models.CNN"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    init: str = "default"
    init_std: float = 0.01
    batch_norm: bool = False
    dropout: list[float] = field(default_factory=list)  # one probability per hidden Linear layer


# Optimizer settings name what training builds (`kind`, a key of OPTIMIZERS), not a class for Hydra to build:
# every job's step runs stacked.StackedOptimizer, which does the maths of the torch.optim class named there.
@dataclass
class SGDConfig:
    kind: str = "sgd"
    lr: float = 0.1  # notebook's SGD
    momentum: float = 0.0  # notebook: plain SGD
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    kind: str = "adam"
    lr: float = 1e-3  # Adam's default, as in the notebook
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class AdamWConfig(AdamConfig):
    kind: str = "adamw"
    weight_decay: float = 1e-2  # AdamW's default (decoupled decay)


# optimizer.kind -> (the settings that kind needs, the torch.optim class whose maths it runs)
OPTIMIZERS = {"sgd": (SGDConfig, "SGD"), "adam": (AdamConfig, "Adam"), "adamw": (AdamWConfig, "AdamW")}


@dataclass
class ScheduleConfig:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    _target_: str = "torch.optim.lr_scheduler.ConstantLR"
    factor: float = 1.0  # keep the optimizer's lr
    total_iters: int = 0


@dataclass
class StepScheduleConfig(ScheduleConfig):
    _target_: str = "torch.optim.lr_scheduler.StepLR"
    step_size: int = 5
    gamma: float = 0.5


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    T_max: int = 17
    eta_min: float = 0.0


@dataclass
class PlateauScheduleConfig(ScheduleConfig):
    _target_: str = "torch.optim.lr_scheduler.ReduceLROnPlateau"
    mode: str = "min"  # stepped with valid_loss
    factor: float = 0.5
    patience: int = 2


@dataclass
class DataConfig:
    root: str = "data"  # looked in first: raw *-ubyte(.gz) files or torchvision's FashionMNIST/raw/
    system_dir: str = "/usr/share/datasets/fashion-mnist"  # next: Debian's dataset-fashion-mnist package
    download: bool = True  # last resort: torchvision's download into root
    batch_size: int = 100  # notebook: 100 (and 16 in its second run)
    valid_size: int = 10000  # notebook: random_split(60000 -> 50000/10000)
    split_seed: int = 0  # separate from train.seed so every run of a sweep shares one split
    eval_batch_size: int = 1000  # evaluation batches: results do not depend on it, memory does (CNN)
    cache: bool = True  # decoded arrays cached under <root>/cache for fast start-up


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # epochs without improvement of train.monitor; null = off
    min_delta: float = 0.0  # an epoch resets the patience count only if it beats the last such epoch by more


@dataclass
class TrainConfig:
    epochs: int = 17  # notebook: valid loss stopped improving after 17
    seed: int = 0
    device: str = "auto"  # auto|cpu|cuda
    cuda_graph: bool = True  # GPU: replay each step as a CUDA graph (H200: ~1.2 ms eager, ~0.15 ms replayed)
    monitor: str = "valid_loss"  # best checkpoint + early stopping: valid_loss (notebook option 1) | valid_acc
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    resume: Optional[str] = None  # an MLflow run id to continue
    threads: Optional[int] = None  # torch threads; null = all cores shared among parallel jobs
    flush_denormal: bool = True  # CPU: treat denormal floats as 0 (Adam's tiny moments slow the CPU 1.3-1.6x)
    progress: str = "auto"  # batch progress bar: auto (when attached to a terminal) | on | off


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # null = sqlite:///<cwd>/mlruns/mlflow.db, artifacts under <cwd>/mlruns/
    experiment: str = "fmnist"
    enabled: bool = True  # false = no MLflow and no TensorBoard (benchmarks)
    # tracking processes a training process spreads its jobs' writes over; null = one per 8 jobs trained together
    # as far as spare cores allow, up to 8 (a big GPU group's end-of-run plots drawn in parallel)
    processes: Optional[int] = None


@dataclass
class SweepConfig:
    skip_finished: bool = False  # re-running a sweep: reuse jobs whose config FINISHED, resume KILLED ones
    trial: Optional[int] = None  # set by the search sweeper (hydra/sweeper=search): the job's Optuna trial number


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def run_name(overrides) -> str:
    """A job's name (its MLflow run's, the `fmnist.overrides` tag): the overrides that define the experiment
    ('defaults' if none); where/how keys (paths, tracking, resume) are left out, as they are from job dir names
    (conf/config.yaml)."""
    excluded = where_how_keys()
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in excluded]
    return " ".join(kept) or "defaults"


def override_pairs(overrides) -> dict[str, str]:
    """Overrides (a list, or a run's name: `optimizer=adam +experiment=notebook`) as {key: value as typed}, without
    Hydra's +/~ prefixes."""
    pairs = (o.lstrip("+~").partition("=") for o in (str(overrides).split() if isinstance(overrides, str)
                                                       else overrides))
    return {key: value for key, eq, value in pairs if eq}


@cache
def where_how_keys() -> frozenset[str]:
    """Keys that say where or how to run, not what: left out of job dir names, run names, the config hash and
    the sweep table. One list, in conf/config.yaml (hydra.job.config.override_dirname.exclude_keys)."""
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    return frozenset(primary.hydra.job.config.override_dirname.exclude_keys)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/*.yaml extend these nodes (`- /adam_schema@_here_`).

    They are stored at the top level, not in the `model`/`optimizer`/`schedule` groups, so `--help` and shell
    completion offer only the real options, while every option is still checked against its schema."""
    cs = ConfigStore.instance()
    for name, node in [
        ("fmnist_schema", Config),
        ("mlp_schema", MLPConfig),
        ("cnn_schema", CNNConfig),
        ("sgd_schema", SGDConfig),
        ("adam_schema", AdamConfig),
        ("adamw_schema", AdamWConfig),
        ("constant_schema", ConstantScheduleConfig),
        ("step_schema", StepScheduleConfig),
        ("cosine_schema", CosineScheduleConfig),
        ("plateau_schema", PlateauScheduleConfig),
    ]:
        cs.store(name=name, node=node)


INITS = ("default", "he", "xavier", "zeros", "normal")


def _check(ok: bool, key: str, value: Any, need: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: it must be {need}; pass e.g. {key}={example}")


def unknown_keys(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """Keys the schemas do not have, each with the known keys beside it: Hydra's `+key=value` adds any key
    (`+optimizr=sgd`, `+train.epoch=3`, which Hydra's own typo hint suggests), and nothing then reads it."""
    found = []

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if not is_dataclass(schema):
            return
        names = [f.name for f in fields(schema)]
        for key in node.keys():
            if key not in names:
                found.append((f"{prefix}{key}", names))
            elif OmegaConf.is_dict(node._get_node(key)):
                walk(node[key], f"{prefix}{key}.")

    walk(cfg, "")
    return found


MODEL_PRESETS = ("batchnorm", "dropout")  # regularization options that set what every ablation preset sets


def validate(cfg: DictConfig, overrides: list[str] | tuple = ()) -> None:
    """Every value a run depends on, before any run exists: keys the app does not have, presets that would
    silently cancel each other (from the job's `overrides`), range checks the types can't express, then the
    optimizer and LR schedule built and stepped through train.epochs on a stand-in parameter, so whatever the
    library refuses (momentum < 0, betas outside [0, 1), factor >= 1, step_size 0, ...) fails here as one
    ConfigError line naming the key."""
    for key, known in unknown_keys(cfg):
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f"did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{near[0]}? " if near else ""
        raise ConfigError(f"{key} is not a setting of this app (added with +, nothing would read it): {hint}"
                          "fmnist-exp --help lists the config")
    chosen = override_pairs([o for o in overrides if not o.startswith("~")])  # (~key=value deletes it)
    ablation, regularization = chosen.get("ablation", "null"), chosen.get("regularization")
    if ablation != "null" and regularization in MODEL_PRESETS:
        raise ConfigError(f"ablation={ablation} and regularization={regularization} both set the model's init, "
                          f"BatchNorm and dropout, and the ablation preset would win (regularization={regularization}"
                          " ignored): choose one (ablation=he_bn is He init + BatchNorm; regularization=batchnorm "
                          "keeps model.init)")
    d, t, m, o = cfg.data, cfg.train, cfg.model, cfg.optimizer
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "a positive integer", 100)
    _check(0 < d.valid_size < 60000, "data.valid_size", d.valid_size, "between 1 and 59999", 10000)
    _check(d.eval_batch_size > 0, "data.eval_batch_size", d.eval_batch_size, "a positive integer", 1000)
    _check(t.epochs > 0, "train.epochs", t.epochs, "a positive integer", 17)
    _check(t.device in ("auto", "cpu", "cuda") or str(t.device).startswith("cuda:"), "train.device", t.device,
           "auto, cpu or cuda", "cpu")
    _check(t.monitor in ("valid_loss", "valid_acc"), "train.monitor", t.monitor, "valid_loss or valid_acc",
           "valid_loss")
    p = t.early_stopping.patience
    _check(p is None or p > 0, "train.early_stopping.patience", p, "a positive integer or null", 3)
    _check(t.threads is None or t.threads > 0, "train.threads", t.threads, "a positive integer or null", 2)
    _check(t.progress in ("auto", "on", "off"), "train.progress", t.progress, "auto, on or off", "off")
    n = cfg.tracking.processes
    _check(n is None or n > 0, "tracking.processes", n, "a positive integer or null", 2)
    check_optimizer_kind(o)
    _check(o.lr > 0, "optimizer.lr", o.lr, "a positive number", 0.001)
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "zero or positive", 0.001)
    if "betas" in o:  # (the library's own error for one beta was 'list index out of range')
        _check(len(o.betas) == 2, "optimizer.betas", list(o.betas), "two numbers (beta1, beta2)", "[0.9,0.999]")
    _check(m.init in INITS, "model.init", m.init, "one of " + "|".join(INITS), "he")
    _check(m.init_std >= 0, "model.init_std", m.init_std, "zero or positive", 0.01)
    _check(len(m.hidden) > 0 and all(h > 0 for h in m.hidden), "model.hidden", list(m.hidden),
           "positive layer widths", "[128,64]")
    for i, q in enumerate(m.dropout):
        _check(0 <= q < 1, f"model.dropout[{i}]", q, "in [0, 1)", 0.5)
    _check(len(m.dropout) in (0, len(m.hidden)), "model.dropout", list(m.dropout),
           f"[] or one probability per hidden layer ({len(m.hidden)})", "[0.5,0.2]")
    if "channels" in m:
        _check(len(m.channels) > 0 and all(c > 0 for c in m.channels), "model.channels", list(m.channels),
               "positive channel counts", "[32,64]")
        _check(len(m.channels) <= MAX_CONV_BLOCKS, "model.channels", list(m.channels),
               f"at most {MAX_CONV_BLOCKS} conv blocks (each halves the 28x28 image)", "[32,64]")
    check_schedule(cfg)


def check_optimizer_kind(o: DictConfig) -> None:
    """optimizer.kind names an optimizer training builds, and the settings beside it are the ones that kind takes
    (optimizer=sgd optimizer.kind=adam has no betas)."""
    kind = o.get("kind")
    if kind not in OPTIMIZERS:
        raise ConfigError(f"optimizer.kind={kind!r} is invalid: it must be one of {'|'.join(OPTIMIZERS)} (the "
                          "optimizers training builds); pass e.g. optimizer=adam")
    schema, name = OPTIMIZERS[kind]
    missing = [f"optimizer.{f.name}" for f in fields(schema) if f.name not in o]
    if missing:
        raise ConfigError(f"optimizer.kind={kind} is invalid here: {name} needs {', '.join(missing)}, which these "
                          f"optimizer settings lack; pass optimizer={kind} (its settings come with it)")


def optimizer_name(kind: str) -> str:
    """The torch.optim class an optimizer.kind runs, as tables and messages show it: sgd -> SGD."""
    return OPTIMIZERS[kind][1] if kind in OPTIMIZERS else str(kind)


def build_torch_optimizer(o: DictConfig, params):
    """The torch.optim optimizer that optimizer settings `o` describe: validation builds it so that torch refuses
    what it would refuse (the fused optimizer does the same maths, stacked.py)."""
    import torch
    settings = {k: v for k, v in OmegaConf.to_container(o).items() if k != "kind"}
    return getattr(torch.optim, OPTIMIZERS[o.kind][1])(params, **settings)


def choice_name(cfg: DictConfig, group: str) -> str:
    """What a config group's option builds, by its class name: MLP, SGD, StepLR ('?' if none)."""
    if group == "optimizer":
        return optimizer_name(OmegaConf.select(cfg, "optimizer.kind", default="?"))
    return OmegaConf.select(cfg, f"{group}._target_", default="?").rsplit(".", 1)[-1]


MAX_CONV_BLOCKS = 4  # 28 -> 14 -> 7 -> 3 -> 1: a fifth 2x2 max-pool has nothing left to pool


def check_buildable(cfg: DictConfig, make, group: str):
    """`make()` (which instantiates cfg[group]), with an error of the library turned into one ConfigError line
    that names the key it is about."""
    try:
        return make()
    except (ValueError, TypeError, IndexError, RuntimeError, ZeroDivisionError) as e:
        raise ConfigError(_blame(cfg, group, e)) from None


def check_schedule(cfg: DictConfig) -> None:
    """Build the optimizer and the schedule on a stand-in parameter and step through every epoch: what would
    fail (or drive the learning rate negative or non-finite) in epoch 12 fails now, naming the key."""
    import math

    import torch
    from hydra.utils import instantiate
    optimizer = check_buildable(cfg, lambda: build_torch_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))]),
                                "optimizer")

    def step_through():
        scheduler = instantiate(cfg.schedule)(optimizer=optimizer)
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        for epoch in range(1, cfg.train.epochs + 1):
            optimizer.step()  # no grads: changes nothing, but the schedule sees the order it expects
            scheduler.step(1.0) if plateau else scheduler.step()
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"the learning rate becomes {lr:g} after epoch {epoch}")
    check_buildable(cfg, step_through, "schedule")


def _blame(cfg: DictConfig, group: str, error: Exception) -> str:
    """'<key>=<value> is invalid: <library's reason>; change <key>', naming the keys of cfg[group] the message
    mentions (or, for a division by zero, the keys set to 0); the whole group if none can be singled out."""
    node = cfg[group]
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    keys = [k for k in node if not str(k).startswith("_")]
    words = reason.lower().replace("_", " ")
    named = [k for k in keys if str(k).lower() in reason.lower() or str(k).rstrip("s").lower() in words.split()]
    if not named and isinstance(error, ZeroDivisionError):
        named = [k for k in keys if type(node[k]) is int and node[k] == 0]  # divisors are counts (step_size)
    if not named:
        named = [k for k in keys if type(node[k]) in (int, float) and node[k] < 0]
    choice = choice_name(cfg, group)
    if not named:
        return f"{group} ({choice}) is invalid: {reason}; check the {group}.* values (python -m fmnist_exp --cfg job)"
    shown = ", ".join(f"{group}.{k}={_show(node[k])}" for k in named)
    return f"{shown} is invalid for {choice}: {reason}; change {' or '.join(f'{group}.{k}' for k in named)}"


def _show(value) -> str:
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value).replace(" ", "")
