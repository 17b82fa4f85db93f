"""The app as a launcher sees it: all that hydra_plugins/fmnist_launchers may import of fmnist_exp.

A launcher composes each job's config and does what Hydra does around a job (output dir, callbacks, JobReturn);
it asks this module to tell our jobs from others (`is_job`), group them (`plan`, `pick_workers`), set up a worker
process (`start_worker`, `share_cores`), train a group to its outcomes (`run_group`, then `settle`; in a search,
new trials from a `TrialSource` join a running group when they `fits` it), record jobs
that never reported (`record_killed`, `record_lost`), and stop (`Forward` and the rest of stopping.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from omegaconf import DictConfig, OmegaConf

from fmnist_exp import stopping, store, tracking
from fmnist_exp.stopping import STOP_SIGNALS, Forward, StopOnSignal, stop_sweep  # noqa: F401

if TYPE_CHECKING:
    from fmnist_exp.job import JobContext, Outcome

log = logging.getLogger(__name__)

# Hydra imports every launcher module at each start, before the command has started its tracking process: what
# needs torch (job, fusion) is imported on first use
FROM_JOB = {"JobContext", "Outcome", "read_outcome", "read_outcomes", "record_killed", "settle", "shows_progress"}


def __getattr__(name: str):
    """`launching.Outcome` and the other FROM_JOB names, from job.py on first use."""
    if name in FROM_JOB:
        from fmnist_exp import job
        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_job(config: DictConfig) -> bool:
    """Whether a composed config is an fmnist_exp job (a launcher runs other apps' jobs as Hydra would)."""
    target = OmegaConf.select(config, "model._target_", default="")
    return isinstance(target, str) and target.startswith("fmnist_exp.models.") and "train" in config


@dataclass
class Plan:
    groups: list[list[int]]  # indices of the jobs, a list per fused group, costliest first when balanced
    workers: int  # groups trained at once, a process each
    shares: list[str]  # what each group's jobs share, for its log line


def plan(cfgs: list[DictConfig], max_group: int | None, workers: int = 1, required: bool = False) -> Plan:
    """Jobs (task configs) in fused groups (fusion.plan_groups), and how many groups train at once: up to `workers`,
    the groups then balanced for them (fusion.balance) when that pays (fusion.workers_pay) or the user asked
    (`required`)."""
    from fmnist_exp import fusion
    groups = fusion.plan_groups(cfgs, max_group)
    if workers > 1:
        balanced = fusion.balance(groups, cfgs, workers)
        if required or fusion.workers_pay(groups, balanced, cfgs, workers):
            groups = balanced
        else:
            workers = 1
    return Plan(groups, min(workers, len(groups)), [fusion.describe_fusion([cfgs[i] for i in g]) for g in groups])


WORKER_BYTES = 3 << 29  # 1.5 GB of free memory per worker process


def pick_workers(cfgs: list[DictConfig]) -> int:
    """Worker processes for these jobs (their composed configs, as the launcher has them) when the user sets none:
    one per CPU core (each torch thread a core: on a CPU, a process per core beats threads on ops this small,
    benchmarks/RESULTS.md), as memory allows, and one on a GPU, which a single process keeps busy."""
    from fmnist_exp import fusion, machine
    if any(fusion.on_gpu(c) for c in cfgs):
        return 1
    threads = max(int(c.train.threads or 1) for c in cfgs)
    try:  # a worker and its tracking process peak at ~1.1 GB (benchmarks/RESULTS.md)
        memory = machine.free_memory() // WORKER_BYTES
    except (ValueError, OSError, AttributeError):
        memory = machine.cores()
    return max(1, min(machine.cores() // threads, memory))


def share_cores(processes: int) -> None:
    """This process is one of `processes` started at once on this machine: torch's threads share its cores."""
    import torch

    from fmnist_exp import machine
    torch.set_num_threads(max(1, machine.cores() // processes))


def start_worker() -> None:
    """A launcher's worker process: stops between jobs ignored, the launcher's death watched (stopping.py)."""
    from fmnist_exp import job
    job.PROCESS.watch_signals()


def discard_tracking_process() -> None:
    """The launcher's own tracking process, started ahead by __main__, is not needed: each worker has its own."""
    tracking.TRACKING_PROCESS.discard_unused()


class TrialSource(Protocol):
    """A search's trials, for a launcher that can start them inside a running group (the search sweeper sets it
    as `launcher.trials`): when jobs leave a group, `take(n)` gives up to n more trials' overrides (none once the
    search has asked all its trials); the launcher composes each, gives back the ones that do not fit the group
    (`give_back`: the sweeper launches them in its next batch), and says which job each one that joins became
    (`started`, before it trains) and how it ended (`ended`, its JobReturn)."""

    def take(self, n: int) -> list[list[str]]: ...

    def give_back(self, overrides: list[str]) -> None: ...

    def started(self, overrides: list[str], num: int) -> None: ...

    def ended(self, overrides: list[str], ret) -> None: ...


def fits(config: DictConfig, group_config: DictConfig) -> bool:
    """Whether a job (task config) can train in the group of `group_config` (the same fusion.fusion_key)."""
    from fmnist_exp import fusion
    return fusion.fusion_key(config) == fusion.fusion_key(group_config)


def run_group(members: list[tuple[DictConfig, JobContext]], epochs_done=None, join=None) -> list[Outcome]:
    """Train a group's jobs (each its task config and context) together, stopping on a signal (each KILLED with
    its checkpoint); one Outcome per job. `epochs_done(n)` hears each epoch's job-epochs, for a progress bar drawn
    by the launcher. `join(free)`, in a search, gives up to `free` more jobs (task config, context) to take the
    places of those that left: their Outcomes follow the members', in the order they joined. The caller then calls
    `settle`."""
    from fmnist_exp import job
    with StopOnSignal() as stop:
        return job.run_group(members, stop, epochs_done=epochs_done, join=join)


def record_lost(members: list[tuple[DictConfig, JobContext]], error: str, wait_s: float) -> list[Outcome]:
    """The outcomes of a group whose worker died: each job KILLED with `error`, written to its job dir. The jobs'
    runs were made by the worker's tracking process, which ends them KILLED when the worker goes
    (tracking_process.serve): once it has (or after `wait_s`), each such run gets `error` as its reason and its id
    goes into the outcome, so that no run stays RUNNING and the sweep's end counts the job once, by its run."""
    from fmnist_exp import tracking_process
    from fmnist_exp.job import Outcome, settle
    outcomes = [Outcome("KILLED", error=error) for _ in members]
    parent = members[0][1].parent  # the jobs of a group share their sweep
    tracked = [i for i, (cfg, _) in enumerate(members) if cfg.tracking.enabled]
    if parent and tracked:
        try:
            dirs = {i: str(members[i][1].job_dir.resolve()) for i in tracked}
            deadline = time.monotonic() + wait_s
            while True:
                by_dir = {r.data.tags.get("fmnist.job_dir"): r
                          for r in store.child_runs(parent["uri"], parent["experiment_id"], parent["run_id"])}
                runs = {i: by_dir.get(d) for i, d in dirs.items()}
                if time.monotonic() >= deadline or all(r is not None and r.info.status != "RUNNING"
                                                       for r in runs.values()):
                    break
                time.sleep(0.5)
            for i, run in runs.items():
                if run is None:  # the worker died before the job's run was made: the sweep's end counts its dir
                    continue
                outcomes[i].run_id = run.info.run_id
                if run.info.status == "RUNNING" or run.data.tags.get("error") == tracking_process.NOT_ENDED:
                    store.end_killed(parent["uri"], run.info.run_id, error)
        except Exception as e:  # the store is unreachable: the outcomes still say what happened
            log.error("could not record the lost jobs' runs KILLED: %s", e)
    settle(outcomes, members, ends_sweep=False)
    return outcomes


def stopped_before_start(signum: int) -> str:
    """The error of a job that a stop reached before it started."""
    return str(stopping.Interrupted(signum, started=False))
