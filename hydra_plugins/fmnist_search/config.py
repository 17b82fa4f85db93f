"""The search sweeper's knobs (hydra/sweeper=search), its samplers (hydra/sweeper/sampler=tpe|gp|cmaes|random|
qmc|grid) and pruners (hydra/sweeper/pruner=successive_halving|hyperband|median|patient|none), named as
hydra-optuna-sweeper names them where they mean the same; each sampler's and pruner's defaults are Optuna 5's."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:  # Optuna 5: multivariate, constant liar (trials asked while others run)
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: Optional[bool] = None
    group: bool = False
    constant_liar: bool = True


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 1
    sigma0: Optional[float] = None
    popsize: Optional[int] = None
    warn_independent_sampling: bool = False  # categorical keys are sampled at random, each time: said once instead


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None
    qmc_type: str = "sobol"
    scramble: bool = False
    warn_independent_sampling: bool = False


@dataclass
class GridSamplerConf:  # its points come from the space (search.grid_space): made by the sweeper
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class SuccessiveHalvingPrunerConf:  # asynchronous successive halving (ASHA): keeps the best 1/3 at each rung
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = 1  # epochs before the first rung
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # the epochs of the first trial that completes
    reduction_factor: int = 3


@dataclass
class MedianPrunerConf:  # below the median of completed trials at the same epoch
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class PatientPrunerConf:  # epochs without improvement, as early stopping across the study's view
    _target_: str = "optuna.pruners.PatientPruner"
    wrapped_pruner: Optional[Any] = None
    patience: int = 2
    min_delta: float = 0.0


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.fmnist_search.search_sweeper.SearchSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "successive_halving"}])
    _recursive_: bool = False  # the sweeper builds the sampler; the pruner is built where each trial trains
    sampler: Any = MISSING
    # each trial reports its monitored score every epoch; the pruner may stop it (it leaves its fused group)
    pruner: Any = MISSING
    # minimize | maximize; null = as train.monitor says (valid_loss: minimize, valid_acc: maximize)
    direction: Optional[str] = None
    # an Optuna storage URL; null = optuna.db beside the MLflow store (mlruns/optuna.db)
    storage: Optional[str] = None
    # null = named after the space: rerunning the same command continues the same study
    study_name: Optional[str] = None
    n_trials: int = 20  # trials in the study, counting those an earlier run of it finished
    n_jobs: int = 16  # trials asked at once: the launcher trains them together (fused groups)
    params: Optional[Dict[str, str]] = None  # the space, key: override value (as on the command line)


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="search", node=SearchSweeperConf, provider="fmnist_search")
for name, node in (("tpe", TPESamplerConf), ("gp", GPSamplerConf), ("cmaes", CmaEsSamplerConf),
                   ("random", RandomSamplerConf), ("qmc", QMCSamplerConf), ("grid", GridSamplerConf)):
    cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="fmnist_search")
for name, node in (("successive_halving", SuccessiveHalvingPrunerConf), ("hyperband", HyperbandPrunerConf),
                   ("median", MedianPrunerConf), ("patient", PatientPrunerConf), ("none", NopPrunerConf)):
    cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="fmnist_search")
