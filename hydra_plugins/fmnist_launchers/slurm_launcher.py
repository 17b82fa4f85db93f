"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, watched the way a user needs on a cluster.

Submission is submitit's (the same `sbatch` job array). Waiting is ours, from `squeue` and the result files rather
than `sacct`, which many clusters (and the tests' one-node cluster) do not run: submitit then logs three warnings
per poll and never learns that a job was cancelled, so the sweep waits forever. Here:

- a sweep's jobs that can share a training step go as one array task per fused group (`fuse: true`, the default);
- one status line (pending / running / done / failed), written again only when it changes;
- SIGUSR2 (SLURM's warning before a time limit or preemption) stops a task's jobs at the next step, each run KILLED
  with its checkpoint; submitit requeues the task and the requeued task continues each job's own run from it;
- a job that left the queue without a result (scancel, killed by SLURM) is reported and recorded as KILLED in its
  job dir (`outcome.json`), and the sweep goes on to its table and exits 1;
- Ctrl-C or SIGTERM to the sweep's process cancels the array once (each job KILLED with its checkpoint) and ends the
  sweep as every launcher does: the parent KILLED, one line on how to finish it, exit 128+N;
- jobs pending for a reason that waiting will not clear (the request exceeds every node: PartitionConfig,
  BadConstraints, ...) stop the sweep at once with one line saying which request to lower.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from fmnist_exp import launching as app

log = logging.getLogger(__name__)

# squeue reasons that mean the request can never be met as it stands (`man squeue`, JOB REASON CODES)
IMPOSSIBLE = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "ReqNodeNotAvail",
              "InvalidQOS", "InvalidAccount", "QOSMaxCpuPerJobLimit", "QOSMaxMemoryPerJob", "QOSMaxGRESPerJob"}
LOST_AFTER_S = 15.0  # a job gone from the queue this long without a result file was cancelled or killed
POLL_S = 2.0


class _SacctNoise(logging.Filter):
    """submitit's 'Bypassing sacct error' warnings: the status line says what they cannot."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


class FmnistSlurmLauncher(SlurmLauncher):
    """One SLURM array task per fused group (`fuse: true`, as hydra/launcher=fused groups jobs on one machine), or
    per job; each task runs its jobs through the same lifecycle as every other launcher (fmnist_exp.job)."""

    def __init__(self, fuse: bool = True, max_group: Optional[int] = 64, **params: Any) -> None:
        super().__init__(**params)
        self.fuse, self.max_group = fuse, max_group

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit and watch; a stop signal (Ctrl-C, `kill PID`) from submission on stops every task once
        (`_stop_tasks`) and the sweep ends as under every launcher (Forward.end_sweep: the parent KILLED, one line
        on how to finish it, exit 128+N)."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self._tasks = []
        with app.Forward(sweep_dir) as self._signals:  # jobs not started yet find its stop mark and end KILLED
            self._signals.forward = self._stop_tasks
            results = self._launch(job_overrides, initial_job_idx)
        self._signals.end_sweep(sweep_dir, (o for _, o in app.read_outcomes(sweep_dir)), len(job_overrides),
                                jobs_signals=self._EXECUTOR == "local")  # on a cluster, a job's SIGTERM is scancel's
        return results

    def _stop_tasks(self, signum: int) -> None:
        """scancel the array: SLURM sends each task SIGTERM, and its jobs stop at the next step, KILLED with their
        checkpoints (a signal before the array exists is left to the stop mark and to _submit)."""
        if self._tasks:
            subprocess.run(["scancel", self._tasks[0].job_id.split("_")[0]], capture_output=True)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _core
        groups = None
        if self.fuse:
            groups, _ = _core.plan(_core.load_configs(self, job_overrides, initial_job_idx), self.max_group)
        else:
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        groups = groups or [[i] for i in range(len(job_overrides))]
        tasks = self._submit([[(list(job_overrides[i]), initial_job_idx + i) for i in g] for g in groups])
        return self._watch(tasks, groups, lambda i: job_dir(self.hydra_context, self.config,
                                                            list(job_overrides[i]), initial_job_idx + i))

    def _watch(self, tasks, groups: list[list[int]], dir_of: Callable[[int], Path]) -> list[JobReturn]:
        return watch(tasks, groups, dir_of, self.params)

    def _submit(self, tasks: list[list[tuple[list[str], int]]]):
        """submitit's executor and job array, as BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2.0) makes
        them; one array task per entry of `tasks` (its jobs' overrides and numbers)."""
        import submitit
        logging.getLogger("submitit").addFilter(_SacctNoise())
        params = self.params
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{x if x in baseparams else f"{self._EXECUTOR}_{x}": y for x, y in params.items()
                                      if x not in specific_init_keys | {"submitit_folder"}})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        state = Singleton.get_state()
        n = len(tasks)
        self._tasks = executor.map_array(self, tasks, ["hydra.sweep.dir"] * n, [state] * n, [self._sharing(n)] * n)
        if self._signals.signum is not None:  # stopped while submitting: the tasks exist now
            self._stop_tasks(self._signals.signum)
        return self._tasks

    def _sharing(self, n_tasks: int) -> int | None:
        """How many of the array's tasks share one machine's cores: none here (SLURM gives each its CPUs)."""
        return None

    def __call__(self, jobs: list[tuple[list[str], int]], job_dir_key: str,
                 singleton_state: dict, sharing: int | None = None) -> list[JobReturn]:
        """One array task, on a node: its jobs trained together as one fused group, or its one job as Hydra runs it.
        A requeued task (after SIGUSR2, `checkpoint`) is this call again: each job continues its own run."""
        import submitit

        from . import _core
        Singleton.set_state(singleton_state)
        setup_globals()
        if sharing:  # tasks started at once on this machine: torch's threads share its cores
            app.share_cores(sharing)
        task_id = submitit.JobEnvironment().job_id
        configs = [_core.job_config(self.hydra_context, self.config, overrides, idx, job_id=task_id)
                   for overrides, idx in jobs]
        if len(configs) == 1:
            return [run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=configs[0],
                            job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return _core.run_group(self, configs, group_name=task_id)


def job_dir(hydra_context, config, overrides: list[str], idx: int) -> Path:
    """Where Hydra will put job `idx` (its output dir), computed here as the job will."""
    from . import _core
    return _core.job_dir(_core.job_config(hydra_context, config, overrides, idx))


def squeue(array_id: str) -> dict[str, tuple[str, str, str]] | None:
    """{job id: (state, reason, start time)} of the array's tasks still in the queue (`-r`: one line per task), or
    None when squeue itself failed (slurmctld busy or restarting): that poll knows nothing, and read as an empty
    queue it made running tasks look lost. A job SLURM no longer knows ('Invalid job id') is an empty queue."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T %S %r"], capture_output=True, text=True)
    if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
        return None
    queue = {}
    for line in out.stdout.splitlines():
        job_id, state, start, reason = (line.split(None, 3) + ["", "", ""])[:4]
        queue[job_id] = (state, reason.strip(), start)
    return queue


def impossible_request(reason: str, params: dict[str, Any]) -> str:
    asked = ", ".join(f"{k}={params.get(k)}" for k in ("partition", "cpus_per_task", "mem_gb", "gpus_per_node",
                                                         "timeout_min", "constraint") if params.get(k) is not None)
    return (f"SLURM will not start these jobs: they wait for {reason} (the request {asked} exceeds what the "
            f"partition's nodes or limits allow); lower hydra.launcher.cpus_per_task / mem_gb / gpus_per_node / "
            f"timeout_min or choose hydra.launcher.partition (sinfo -o '%P %c %m %G %l' lists what nodes have)")


def watch(tasks, groups: list[list[int]], dir_of: Callable[[int], Path], params: dict[str, Any]) -> list[JobReturn]:
    """Wait for every task of the array (task t runs the jobs `groups[t]`), with one status line; jobs of a lost
    task are recorded (in `dir_of(i)`, job i's output dir), impossible requests stop the sweep."""
    array_id = tasks[0].job_id.split("_")[0]
    n_jobs = sum(len(g) for g in groups)
    results: dict[int, JobReturn] = {}  # by job
    ended: set[int] = set()  # tasks
    gone_since: dict[int, float] = {}
    started: dict[int, str] = {}  # task -> its start time; a new one means SLURM requeued it
    last_line = ""
    while len(ended) < len(tasks):
        polled = squeue(array_id)
        queue = polled or {}
        for t, task in enumerate(tasks):
            if t in ended:
                continue
            state, _, start = queue.get(task.job_id, ("", "", ""))
            if task.job_id in queue:
                gone_since.pop(t, None)  # (it is lost only if it stays gone)
            if task.paths.result_pickle.exists():
                results.update(zip(groups[t], _result(task, len(groups[t]))))
                ended.add(t)
            elif polled is None:
                continue
            elif task.job_id not in queue:  # gone without a result
                if time.monotonic() - gone_since.setdefault(t, time.monotonic()) >= LOST_AFTER_S:
                    error = (f"SLURM job {task.job_id} ended without a result (cancelled, or killed by SLURM: "
                             f"see {task.paths.stderr})")
                    log.error("%s", error)
                    for i in groups[t]:
                        app.record_killed(dir_of(i), error)
                        results[i] = _no_return()
                    ended.add(t)
            elif state == "RUNNING" and t not in started:
                started[t] = start
            elif t in started and start != started[t]:  # requeued (after SIGUSR2): it started again
                del started[t]
                log.info("SLURM job %s was requeued (time limit or preemption): its jobs will continue their runs "
                         "from their last checkpoints", task.job_id)
        states = [queue.get(task.job_id, ("",))[0] for t, task in enumerate(tasks) if t not in ended]
        stuck = {reason for state, reason, _ in queue.values() if state == "PENDING" and reason in IMPOSSIBLE}
        if stuck:
            subprocess.run(["scancel", array_id], capture_output=True)
            print(file=sys.stderr)
            raise SystemExit(impossible_request(sorted(stuck)[0], params))
        failed = sum(r.status == JobStatus.FAILED or r.return_value is None for r in results.values())
        line = (f"SLURM job {array_id}: tasks {states.count('PENDING')} pending, {states.count('RUNNING')} running; "
                f"jobs {len(results) - failed} of {n_jobs} done, {failed} failed or lost")
        if polled is not None and line != last_line:
            log.info("%s", line)
            last_line = line
        if len(ended) < len(tasks):
            time.sleep(POLL_S)
    return [results[i] for i in range(n_jobs)]


def _result(task, n: int) -> list[JobReturn]:
    try:
        return list(task.results()[0])
    except Exception as e:  # the task's own process raised outside our jobs (Hydra's run_job)
        log.error("SLURM job %s failed: %s", task.job_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return [_no_return() for _ in range(n)]


def _no_return() -> JobReturn:
    """A job that produced no return value: COMPLETED for Hydra's sweeper (which would raise on FAILED and skip the
    sweep's table), None as value; its run or outcome.json says what happened."""
    r = JobReturn()
    r.status = JobStatus.COMPLETED
    r._return_value = None
    return r
