"""`hydra/launcher=joblib`: hydra-joblib-launcher's launcher (the same loky pool and knobs), stopped and broken the
way every launcher here is.

- **Signals.** A stop signal to the sweep's process (Ctrl-C, `kill PID`, `timeout`) is forwarded once to the
  workers, which run in process groups of their own (job.Process.watch_signals): running jobs end KILLED with their
  checkpoints, jobs not yet started end KILLED before they start, and the sweep then stops as under any launcher
  (job.stop_sweep). Before, SIGTERM to the sweep's process ended it while its workers trained on unwatched, and
  their runs stayed RUNNING for good; a terminal's Ctrl-C reached every worker, and the first to finish its job
  exited the sweep under the others.
- **A dead worker.** A loky worker that dies (the OOM killer, kill -9) breaks joblib's pool: joblib kills the other
  workers with their process trees (each job's tracking process too) and raises. Hydra then printed a 40-line
  traceback, the sweep never reached its table, and every job that was training kept a RUNNING run for good. Here
  the launcher says so in one line, records each job that did not finish KILLED in its job dir (why, and how to
  finish the sweep) and returns, so the sweep ends as after any lost job (callbacks.SweepCallback: the lost jobs'
  runs KILLED with that reason, the table of what finished, exit 1); `sweep.skip_finished=true` runs what is left.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib.externals.loky.process_executor import BrokenProcessPool, TerminatedWorkerError
from omegaconf import OmegaConf

from . import _core
from ._workers import Forward

log = logging.getLogger(__name__)

LOST = ("its joblib worker process died before recording the job (killed, or out of memory), and joblib stopped "
        "the sweep; rerun it with sweep.skip_finished=true")


class FmnistJoblibLauncher(JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fmnist_exp import job
        with Forward(self._sweep_dir()) as signals:
            try:
                results = super().launch(job_overrides, initial_job_idx)
            except BrokenProcessPool as e:  # TerminatedWorkerError: a worker died; else one failed while it started
                why = (f"exit code {str(e).rsplit('The exit codes of the workers are ', 1)[-1].split(chr(10), 1)[0]}"
                       if isinstance(e, TerminatedWorkerError) else str(e).split("\n", 1)[0])
                results = self._record_lost(job_overrides, initial_job_idx, why, signals.signum)
        signals.end_sweep(self._sweep_dir(), (o for _, o in job.read_outcomes(self._sweep_dir())), len(job_overrides))
        return results

    def _sweep_dir(self) -> Path:
        return Path(str(self.config.hydra.sweep.dir))

    def _record_lost(self, job_overrides, initial_job_idx: int, why: str, signum: int | None) -> list[JobReturn]:
        """Each job's JobReturn as its job dir's outcome has it; jobs without one (training in a dead worker, or
        not started) are recorded KILLED: LOST, or stopped by `signum` (a worker that got it while it started)."""
        from fmnist_exp import job, train
        results, lost = [], []
        error = LOST if signum is None else str(train.Interrupted(signum, started=False))
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            config = _core.job_config(self.hydra_context, self.config, overrides, idx, job_id=idx)
            path = _core.job_dir(config)
            outcome = job.read_outcome(path)
            if outcome is None:
                outcome = job.record_killed(path, error, signum)
                lost.append(path.name)
            ret = JobReturn(overrides=list(overrides), cfg=_core.task_config(config), hydra_cfg=config,
                            working_dir=os.getcwd(), task_name=OmegaConf.select(config, "hydra.job.name"),
                            status=JobStatus.COMPLETED)
            ret.return_value = outcome.value  # None for the lost jobs: the sweep's end counts them and exits 1
            results.append(ret)
        if signum is None:
            log.error("A joblib worker process died (%s; killed, or out of memory) and joblib stopped the sweep: %d "
                      "of %d jobs did not finish; rerun the sweep with sweep.skip_finished=true", why, len(lost),
                      len(results))
        return results
