"""A Hydra launcher that trains the jobs of a sweep that can share a training step as one stacked model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from fmnist_exp import launching as app

from . import _core, _workers

log = logging.getLogger(__name__)


class FusedLauncher(Launcher):
    """Receives the whole batch of a sweep's jobs (Hydra's launcher API is batch-oriented), groups the ones that
    fuse and trains each group as one stacked model, several groups at once in worker processes (n_jobs); jobs of
    apps other than fmnist_exp run one by one."""

    def __init__(self, max_group: Optional[int] = 64, n_jobs: Optional[int] = None, **kwargs: Any) -> None:
        check_positive("max_group", max_group, "jobs in a group, or null for as many as fit in memory")
        check_positive("n_jobs", n_jobs, "worker processes, or null for one per CPU core")
        self.max_group, self.n_jobs = max_group, n_jobs
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.trials: Optional[app.TrialSource] = None  # a search's, set by its sweeper: new trials join groups
        self.next_num = 0  # the number of the next job that joins a group (after the launched batch)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context
        if not isinstance(hydra_context.config_loader, _core.ComposedOnce):  # the sweeper's context too
            hydra_context.config_loader = _core.ComposedOnce(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Compose the jobs, plan their groups, and train them: here one group after another, or in workers."""
        setup_globals()
        config = self.config
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = _core.load_configs(self, job_overrides, initial_job_idx)
        self.next_num = initial_job_idx + len(configs)
        workers = self.n_jobs or (app.pick_workers(configs) if all(app.is_job(c) for c in configs) else 1)
        groups, workers = _core.plan(configs, self.max_group, int(workers), required=bool(self.n_jobs))
        if groups is None:
            return [_core.run_one(self, c) for c in configs]
        if workers > 1:
            return _workers.launch(self, configs, groups, workers)
        results: list[JobReturn | None] = [None] * len(configs)
        for n, members in enumerate(groups, start=1):
            for i, ret in zip(members, _core.run_group(self, [configs[i] for i in members], group_name=f"{n}")):
                results[i] = ret
        return results


def check_positive(key: str, value: Optional[int], what: str) -> None:
    """A launcher option that must be null or at least 1 (0 and -1 would otherwise pass silently)."""
    if value is not None and value < 1:
        raise ValueError(f"hydra.launcher.{key}={value} is invalid: it must be a positive number of {what}; "
                         f"pass e.g. hydra.launcher.{key}=2")
