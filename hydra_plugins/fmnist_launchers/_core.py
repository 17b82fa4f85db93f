"""What every launcher here does around the app: compose each job, group the ones that can share a training step,
do what Hydra does before and after a job, and train a group in this process (`run_group`); worker processes are
_workers.py.

A job keeps what a job launched by Hydra has: its output dir (.hydra/ configs saved), HydraConfig set while it
is prepared, on_job_start/on_job_end callbacks, and its own MLflow run (fmnist_exp.job). Apps other than
fmnist_exp, and anything that cannot fuse, run one by one exactly as Hydra's basic launcher runs them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (JobReturn, JobRuntime, JobStatus, _save_config, configure_log, filter_overrides,
                              run_job)
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from fmnist_exp import launching as app

log = logging.getLogger(__name__)


def load_configs(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[DictConfig]:
    """Each job's composed config (hydra node included), numbered as Hydra numbers them; one log line each."""
    configs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        configs.append(job_config(launcher.hydra_context, launcher.config, overrides, idx, job_id=idx))
    return configs


class ComposedOnce:
    """The sweep's config loader, keeping each job config the sweeper composes to check a batch
    (`Sweeper.validate_batch_is_legal`) for the launcher, which would otherwise compose it again: ~70 ms a job on a
    2-core VM, 5 s of a 64-job sweep's start. Everything else goes to the loader as it is."""

    def __init__(self, loader):
        self._loader, self._composed = loader, {}

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_loader", "_composed"):  # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = self._loader.load_sweep_config(master_config, sweep_overrides)
        self._composed[(id(master_config), tuple(sweep_overrides))] = config
        return config

    def take_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The config the sweeper composed for these overrides (once: the launcher then owns it), else a new one."""
        config = self._composed.pop((id(master_config), tuple(sweep_overrides)), None)
        return config if config is not None else self._loader.load_sweep_config(master_config, sweep_overrides)


def job_config(hydra_context, config: DictConfig, overrides: Sequence[str], num: int, job_id=None) -> DictConfig:
    """Job `num`'s composed config, as Hydra's launchers make it: hydra.job.num, and hydra.job.id when given."""
    loader = hydra_context.config_loader
    take = loader.take_sweep_config if isinstance(loader, ComposedOnce) else loader.load_sweep_config
    sweep_config = take(config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = num
        if job_id is not None:
            sweep_config.hydra.job.id = job_id
    return sweep_config


def plan(configs: list[DictConfig], max_group: int | None, workers: int = 1,
         required: bool = False) -> tuple[list[list[int]] | None, int]:
    """Indices of `configs` in fused groups, and how many train at once (app.plan), a log line per group saying what
    it shares; (None, 1) when they are not all fmnist_exp jobs (nothing to fuse: they run one by one)."""
    if not all(app.is_job(c) for c in configs):
        log.info(f"Launching {len(configs)} jobs one by one (not fmnist_exp jobs: nothing to fuse)")
        return None, 1
    planned = app.plan([task_config(c) for c in configs], max_group, workers, required)
    groups, workers = planned.groups, planned.workers
    log.info(f"Launching {len(configs)} jobs as {len(groups)} fused group(s)"
             + (f", {workers} at a time (a process each)" if workers > 1 else ""))
    for n, (members, shares) in enumerate(zip(groups, planned.shares), start=1):
        log.info(f"Group {n}/{len(groups)}: {len(members)} job(s) sharing {shares}")
    return groups, workers


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
    output_dir = job_dir(config)
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


def job_dir(config: DictConfig) -> Path:
    """A sweep job's output dir, from its composed config."""
    return Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config, "hydra.sweep.subdir"))


def run_group(launcher, configs: list[DictConfig], group_name: str) -> list[JobReturn]:
    """Train `configs` together in this process (fmnist_exp.job.run_group); each job gets its JobReturn and
    callbacks. In a search (`launcher.trials`), new trials join the group as its jobs leave (Joiner)."""
    members, hydra_cfgs = start_jobs(launcher, configs, group_name)
    joiner = Joiner(launcher, configs[0], group_name) if getattr(launcher, "trials", None) is not None else None
    configure_log(job_console(launcher.config.hydra), launcher.config.hydra.verbose)
    try:
        outcomes = train_group(members, join=joiner)
    finally:
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    if joiner is not None:
        configs, hydra_cfgs, members = (configs + joiner.configs, hydra_cfgs + joiner.hydra_cfgs,
                                        members + joiner.members)
    results = end_jobs(launcher, configs, hydra_cfgs, members, outcomes)
    stopped = app.settle(outcomes, members)
    if joiner is not None:
        joiner.ended(results[len(results) - len(joiner.configs):])
        results = results[:len(results) - len(joiner.configs)]
    if stopped is not None:  # the user stopped the sweep: no other group starts, the sweep ends 128 + N
        app.stop_sweep(members[0][1].parent, stopped)
    return results


class Joiner:
    """A search's new trials for a group training in this process: `joiner(free)` takes up to `free` trials from
    the sweeper (launcher.trials, an app.TrialSource), composes each as Hydra composes a sweep's job (numbered after
    the launched batch: launcher.next_num), gives back those that do not fit the group, and starts the rest as a
    group's jobs (start_jobs). It keeps their configs for the JobReturns made when the group ends."""

    def __init__(self, launcher, group_config: DictConfig, group_name: str, parallel_jobs: int | None = None):
        self.launcher, self.group_name, self.parallel_jobs = launcher, group_name, parallel_jobs
        self.group_config = task_config(group_config)
        self.group_log = job_dir(group_config) / "group.log"
        self.configs, self.hydra_cfgs, self.members = [], [], []

    def __call__(self, free: int) -> list:
        launcher, source, fitting = self.launcher, self.launcher.trials, []
        try:
            taken = source.take(free)
        except Exception as e:  # the study's store hiccuped: the group trains on without new trials this time
            log.warning("group %s: no new trials (%s)", self.group_name, str(e).splitlines()[0][:200] if str(e)
                        else type(e).__name__)
            return []
        for overrides in taken:
            try:
                config = job_config(launcher.hydra_context, launcher.config, overrides, -1)
                fits = app.fits(task_config(config), self.group_config)
            except Exception as e:  # it waits for the next batch, whose launch says what is wrong with it
                log.warning("a new trial could not join group %s: %s", self.group_name,
                            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                fits = False
            if not fits:
                source.give_back(overrides)
                continue
            num = launcher.next_num
            launcher.next_num += 1
            with open_dict(config.hydra.job):
                config.hydra.job.num = config.hydra.job.id = num
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))} (joins group {self.group_name})")
            source.started(overrides, num)
            fitting.append(config)
        if not fitting:
            return []
        members, hydra_cfgs = start_jobs(launcher, fitting, self.group_name, self.parallel_jobs)
        for _, ctx in members:  # the group's log, as its first jobs have it
            with contextlib.suppress(OSError):
                if not (ctx.job_dir / "group.log").exists():
                    os.link(self.group_log, ctx.job_dir / "group.log")
        self.configs += fitting
        self.hydra_cfgs += hydra_cfgs
        self.members += members
        return members

    def ended(self, results: list[JobReturn]) -> None:
        for config, ret in zip(self.configs, results):
            self.launcher.trials.ended(list(config.hydra.overrides.task), ret)


def start_jobs(launcher, configs: list[DictConfig], group_name: str, parallel_jobs: int | None = None):
    """What Hydra does before a job's task, for each job of a group: output dir, .hydra/ configs, on_job_start.
    Returns each job's (task config, JobContext) and its HydraConfig."""
    members, hydra_cfgs = [], []
    for config in configs:
        enter_job(config)
        hydra_cfgs.append(copy.deepcopy(HydraConfig.instance().cfg))
        ctx = app.JobContext.from_hydra(config.hydra)
        ctx.group = group_name
        ctx.parallel_jobs = parallel_jobs  # processes sharing the cores (their torch threads)
        members.append((task_config(config), ctx))
        launcher.hydra_context.callbacks.on_job_start(config=config, task_function=launcher.task_function)
    return members, hydra_cfgs


def job_console(hydra: DictConfig) -> DictConfig | None:
    """The logging Hydra's run_job sets up for a job (hydra.job_logging: `[time][logger][LEVEL] - message` on the
    console), without its file handlers: a group's lines go to its group.log (train_group), and a per-job log file
    opened here would be one job's. So a job's lines look the same under every launcher; the launcher's own lines
    keep hydra.hydra_logging (`[HYDRA] ...`), as under the basic launcher."""
    if hydra.job_logging is None:
        return None
    conf = OmegaConf.to_container(hydra.job_logging, resolve=False)
    files = {name for name, h in (conf.get("handlers") or {}).items() if isinstance(h, dict) and "filename" in h}
    for name in files:
        del conf["handlers"][name]
    for holder in [conf.get("root") or {}, *(conf.get("loggers") or {}).values()]:
        if isinstance(holder, dict) and holder.get("handlers"):
            holder["handlers"] = [h for h in holder["handlers"] if h not in files]
    return OmegaConf.create(conf)


def train_group(members: list, epochs_done=None, join=None) -> list:
    """The jobs of one group trained together (fmnist_exp.job.run_group), their log lines also in each job dir's
    group.log; a signal stops them all, each KILLED with its checkpoint. Returns each job's Outcome. `epochs_done(n)`
    counts the job-epochs trained, for a sweep's bar drawn elsewhere (_workers.py)."""
    root = logging.getLogger()
    handlers = group_log([ctx.job_dir / "group.log" for _, ctx in members])
    for h in handlers:
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(h)
    try:
        return app.run_group(members, epochs_done, join)
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def group_log(paths: list[Path]) -> list[logging.Handler]:
    """Handlers that write a group's log lines to every one of `paths` (each job dir's group.log): one file, written
    once, which the other paths are hard links to; where a link cannot be made (no hard links there, or the path is
    another file already, from an earlier attempt of a requeued job) that path gets its own handler. One file per
    job would write every line K times: 256 jobs x 17 epochs, 1.1 million writes and 166 MB of copies."""
    handlers = [logging.FileHandler(paths[0])]
    for path in paths[1:]:
        try:
            if not (path.exists() and os.path.samefile(path, paths[0])):
                os.link(paths[0], path)
        except OSError:
            handlers.append(logging.FileHandler(path))
    return handlers


def end_jobs(launcher, configs: list[DictConfig], hydra_cfgs: list, members: list, outcomes: list) -> list[JobReturn]:
    """Each job's JobReturn (what Hydra's sweeper receives) and on_job_end."""
    results = []
    for config, hydra_cfg, (task_cfg, ctx), outcome in zip(configs, hydra_cfgs, members, outcomes):
        ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task), cfg=task_cfg,
                        hydra_cfg=hydra_cfg, working_dir=os.getcwd(), task_name=JobRuntime.instance().get("name"),
                        status=JobStatus.COMPLETED)
        ret.return_value = outcome.value  # a failed job returns None: the sweep goes on and its end exits 1
        launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        results.append(ret)
    return results
