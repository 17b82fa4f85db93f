"""`hydra/launcher=joblib`: hydra-joblib-launcher's launcher (the same loky pool and knobs), with what a dead worker
leaves behind recorded.

A loky worker that dies (the OOM killer, kill -9) breaks joblib's pool: joblib kills the other workers with their
process trees (each job's tracking process too) and raises. Hydra then printed a 40-line traceback, the sweep never
reached its table, and every job that was training kept a RUNNING run for good. Here the launcher says so in one
line, records each job that did not finish KILLED in its job dir (why, and how to finish the sweep) and returns, so
the sweep ends as after any lost job (callbacks.SweepCallback: the lost jobs' runs KILLED with that reason, the table
of what finished, exit 1), and `sweep.skip_finished=true` then runs only what is left.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib.externals.loky.process_executor import TerminatedWorkerError
from omegaconf import OmegaConf

from . import _core

log = logging.getLogger(__name__)

LOST = ("its joblib worker process died before recording the job (killed, or out of memory), and joblib stopped "
        "the sweep; rerun it with sweep.skip_finished=true")


class FmnistJoblibLauncher(JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return super().launch(job_overrides, initial_job_idx)
        except TerminatedWorkerError as e:
            exit_codes = str(e).rsplit("The exit codes of the workers are ", 1)[-1].split("\n", 1)[0]
            return self._record_lost(job_overrides, initial_job_idx, exit_codes)

    def _record_lost(self, job_overrides, initial_job_idx: int, why: str) -> list[JobReturn]:
        """Each job's JobReturn as its job dir's outcome has it; jobs without one (training in a dead worker, or
        not started) are recorded KILLED with LOST."""
        from fmnist_exp import job
        results, lost = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            config = _core.job_config(self.hydra_context, self.config, overrides, idx, job_id=idx)
            path = _core.job_dir(config)
            outcome = job.read_outcome(path)
            if outcome is None:
                path.mkdir(parents=True, exist_ok=True)
                outcome = job.Outcome("KILLED", error=LOST)
                outcome.write(path)
                lost.append(path.name)
            ret = JobReturn(overrides=list(overrides), cfg=_core.task_config(config), hydra_cfg=config,
                            working_dir=os.getcwd(), task_name=OmegaConf.select(config, "hydra.job.name"),
                            status=JobStatus.COMPLETED)
            ret.return_value = outcome.value  # None for the lost jobs: the sweep's end counts them and exits 1
            results.append(ret)
        log.error("A joblib worker process died (%s: killed, or out of memory) and joblib stopped the sweep: %d of "
                  "%d jobs did not finish; rerun the sweep with sweep.skip_finished=true", why, len(lost),
                  len(results))
        return results
