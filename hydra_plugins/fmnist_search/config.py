"""The search sweeper's knobs (hydra/sweeper=search) and its samplers (hydra/sweeper/sampler=tpe|gp|cmaes|random|
qmc|grid), named as hydra-optuna-sweeper names them where they mean the same; each sampler's defaults are Optuna
5's."""
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
class SearchSweeperConf:
    _target_: str = "hydra_plugins.fmnist_search.search_sweeper.SearchSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
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
