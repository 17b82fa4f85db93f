"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, watched the way a user needs on a cluster.

Submission is submitit's (the same `sbatch` job array). Waiting is ours, from `squeue` and the result files rather
than `sacct`, which many clusters (and the tests' one-node cluster) do not run: submitit then logs three warnings
per poll and never learns that a job was cancelled, so the sweep waits forever. Here:

- one status line (pending / running / done / failed), written again only when it changes;
- a job that left the queue without a result (scancel, killed by SLURM) is reported and recorded as KILLED in its
  job dir (`outcome.json`), and the sweep goes on to its table and exits 1;
- jobs pending for a reason that waiting will not clear (the request exceeds every node: PartitionConfig,
  BadConstraints, ...) stop the sweep at once with one line saying which request to lower.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

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
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self._submit(job_overrides, initial_job_idx)
        return watch(jobs, lambda i: job_dir(self.hydra_context, self.config, list(job_overrides[i]),
                                             initial_job_idx + i), self.params)

    def _submit(self, job_overrides, initial_job_idx):
        """submitit's executor and job array, as BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2.0) makes
        them."""
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
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return executor.map_array(self, *zip(*job_params))


def job_dir(hydra_context, config, overrides: list[str], idx: int) -> Path:
    """Where Hydra will put job `idx` (its output dir), computed here as the job will."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = idx
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def squeue(array_id: str) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of the array's tasks still in the queue (`-r`: one line per task)."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T %r"], capture_output=True, text=True)
    queue = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split(None, 2) + ["", ""])[:3]
        queue[job_id] = (state, reason.strip())
    return queue


def impossible_request(reason: str, params: dict[str, Any]) -> str:
    asked = ", ".join(f"{k}={params.get(k)}" for k in ("partition", "cpus_per_task", "mem_gb", "gpus_per_node",
                                                         "timeout_min", "constraint") if params.get(k) is not None)
    return (f"SLURM will not start these jobs: they wait for {reason} (the request {asked} exceeds what the "
            f"partition's nodes or limits allow); lower hydra.launcher.cpus_per_task / mem_gb / gpus_per_node / "
            f"timeout_min or choose hydra.launcher.partition (sinfo -o '%P %c %m %G %l' lists what nodes have)")


def watch(jobs, dir_of: Callable[[int], Path], params: dict[str, Any]) -> list[JobReturn]:
    """Wait for every job of the array, with one status line; lost jobs are recorded (in `dir_of(i)`, job i's
    output dir), impossible ones stop it."""
    from fmnist_exp import job as fjob
    array_id = jobs[0].job_id.split("_")[0]
    results: dict[int, JobReturn] = {}
    gone_since: dict[int, float] = {}
    last_line = ""
    while len(results) < len(jobs):
        queue = squeue(array_id)
        for i, j in enumerate(jobs):
            if i in results:
                continue
            if j.paths.result_pickle.exists():
                results[i] = _result(j)
            elif j.job_id not in queue:
                if time.monotonic() - gone_since.setdefault(i, time.monotonic()) >= LOST_AFTER_S:
                    error = (f"SLURM job {j.job_id} ended without a result (cancelled, or killed by SLURM: "
                             f"see {j.paths.stderr})")
                    log.error("%s", error)
                    folder = dir_of(i)
                    if not (folder / fjob.OUTCOME_FILE).is_file():
                        folder.mkdir(parents=True, exist_ok=True)
                        fjob.Outcome("KILLED", error=error).write(folder)
                    results[i] = _no_return()
        states = [queue.get(j.job_id, ("", ""))[0] for i, j in enumerate(jobs) if i not in results]
        stuck = {reason for state, reason in queue.values() if state == "PENDING" and reason in IMPOSSIBLE}
        if stuck:
            subprocess.run(["scancel", array_id], capture_output=True)
            print(file=sys.stderr)
            raise SystemExit(impossible_request(sorted(stuck)[0], params))
        failed = sum(r.status == JobStatus.FAILED or r.return_value is None for r in results.values())
        line = (f"SLURM job {array_id}: {states.count('PENDING')} pending, {states.count('RUNNING')} running, "
                f"{len(results) - failed} done, {failed} failed or lost")
        if line != last_line:
            log.info("%s", line)
            last_line = line
        if len(results) < len(jobs):
            time.sleep(POLL_S)
    return [results[i] for i in range(len(jobs))]


def _result(j) -> JobReturn:
    try:
        return j.results()[0]
    except Exception as e:  # the job's own process raised outside our task (Hydra's run_job)
        log.error("SLURM job %s failed: %s", j.job_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _no_return()


def _no_return() -> JobReturn:
    """A job that produced no return value: COMPLETED for Hydra's sweeper (which would raise on FAILED and skip the
    sweep's table), None as value; its run or outcome.json says what happened."""
    r = JobReturn()
    r.status = JobStatus.COMPLETED
    r._return_value = None
    return r

