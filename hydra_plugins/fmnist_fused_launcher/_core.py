"""The fused launcher's work: compose every job, group the ones that can share a training step, train each group
as one stacked model in this process, and return one JobReturn per job in input order.

A job keeps what a job launched by Hydra has: its output dir (.hydra/ configs saved), HydraConfig set while it
is prepared, on_job_start/on_job_end callbacks, and its own MLflow run (fmnist_exp.job). Apps other than
fmnist_exp, and anything that cannot fuse, run one by one exactly as Hydra's basic launcher runs them.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (JobReturn, JobRuntime, JobStatus, _save_config, configure_log, filter_overrides,
                              run_job, setup_globals)
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = load_configs(launcher, job_overrides, initial_job_idx)
    groups = plan(configs, launcher.max_group)
    if groups is None:
        return [run_one(launcher, c) for c in configs]
    results: list[JobReturn | None] = [None] * len(configs)
    for n, members in enumerate(groups, start=1):
        for i, ret in zip(members, run_group(launcher, [configs[i] for i in members], group_name=f"{n}")):
            results[i] = ret
    return results


def load_configs(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[DictConfig]:
    """Each job's composed config (hydra node included), numbered as Hydra numbers them; one log line each."""
    configs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        configs.append(job_config(launcher.hydra_context, launcher.config, overrides, idx, job_id=idx))
    return configs


def job_config(hydra_context, config: DictConfig, overrides: Sequence[str], num: int, job_id=None) -> DictConfig:
    """Job `num`'s composed config, as Hydra's launchers make it: hydra.job.num, and hydra.job.id when given."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = num
        if job_id is not None:
            sweep_config.hydra.job.id = job_id
    return sweep_config


def plan(configs: list[DictConfig], max_group: int | None) -> list[list[int]] | None:
    """Indices of `configs` in fused groups (job.plan_groups), with a log line per group saying what it shares;
    None when they are not all fmnist_exp jobs (nothing to fuse: they run one by one)."""
    if not all(is_fmnist_job(c) for c in configs):
        log.info(f"Launching {len(configs)} jobs one by one (not fmnist_exp jobs: nothing to fuse)")
        return None
    from fmnist_exp import job
    groups = job.plan_groups([task_config(c) for c in configs], max_group)
    log.info(f"Launching {len(configs)} jobs as {len(groups)} fused group(s)")
    for n, members in enumerate(groups, start=1):
        log.info(f"Group {n}/{len(groups)}: {len(members)} job(s) sharing "
                 f"{job.describe_fusion(task_config(configs[members[0]]))}")
    return groups


def is_fmnist_job(config: DictConfig) -> bool:
    target = OmegaConf.select(config, "model._target_", default="")
    return isinstance(target, str) and target.startswith("fmnist_exp.models.") and "train" in config


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without the hydra node, as a task function receives it."""
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def run_one(launcher, config: DictConfig) -> JobReturn:
    """One job through Hydra's own run_job, as the basic launcher runs it."""
    ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return ret


def enter_job(config: DictConfig) -> Path:
    """What run_job does before calling a task: the output dir, HydraConfig, .hydra/ configs. Returns the dir."""
    HydraConfig.instance().set_config(config)
    output_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config,
                                                                                             "hydra.sweep.subdir"))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.hydra.output_subdir is not None:
        hydra_output = output_dir / str(config.hydra.output_subdir)
        _save_config(task_config(config), "config.yaml", hydra_output)
        _save_config(copy.deepcopy(HydraConfig.instance().cfg), "hydra.yaml", hydra_output)
        _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
    return output_dir


def run_group(launcher, configs: list[DictConfig], group_name: str) -> list[JobReturn]:
    """Train `configs` together (fmnist_exp.job.run_group); each job gets its JobReturn and callbacks."""
    from fmnist_exp import job, train
    callbacks = launcher.hydra_context.callbacks
    members, hydra_cfgs = [], []
    for config in configs:
        enter_job(config)
        hydra_cfgs.append(copy.deepcopy(HydraConfig.instance().cfg))
        ctx = job.JobContext.from_hydra(config.hydra)
        ctx.group = group_name
        members.append((task_config(config), ctx))
        callbacks.on_job_start(config=config, task_function=launcher.task_function)
    # each job dir gets the log of its group's run (the lines of every job in it, each prefixed with its name)
    root = logging.getLogger()
    handlers = [logging.FileHandler(ctx.job_dir / "group.log") for _, ctx in members]
    for h in handlers:
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(h)
    try:
        with train.StopOnSignal() as stop:
            outcomes = job.run_group(members, stop)
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
    results = []
    for config, hydra_cfg, (task_cfg, ctx), outcome in zip(configs, hydra_cfgs, members, outcomes):
        ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task), cfg=task_cfg,
                        hydra_cfg=hydra_cfg, working_dir=os.getcwd(), task_name=JobRuntime.instance().get("name"),
                        status=JobStatus.COMPLETED)
        ret.return_value = outcome.value  # a failed job returns None: the sweep goes on and its end exits 1
        callbacks.on_job_end(config=config, job_return=ret)
        results.append(ret)
    job.settle(outcomes, members)
    return results
