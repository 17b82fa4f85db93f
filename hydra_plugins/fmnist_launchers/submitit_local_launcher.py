"""`hydra/launcher=submitit_local`: the SLURM launcher's path (a task per fused group, the same job lifecycle) on this
machine, through submitit's local executor."""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Callable

from hydra.core.utils import JobReturn

from fmnist_exp import launching as app

from .slurm_launcher import FmnistSlurmLauncher, _no_return, _result

log = logging.getLogger(__name__)


class FmnistLocalLauncher(FmnistSlurmLauncher):
    """`hydra/launcher=submitit_local`: the SLURM path (a task per fused group, the same lifecycle) on this machine,
    through submitit's local executor, which starts every task at once, each a process under a controller process
    of submitit's. What submitit's own local launcher lacked, added here:

    - torch threads: the cores shared among the tasks (each task took them all: 4 jobs on 2 cores trained 50-500x
      slower than under joblib);
    - a stop signal to the sweep's process (Ctrl-C, `kill PID`) reaches each task once, as SIGTERM through its
      controller (which forwards SIGTERM): the running jobs end KILLED with their checkpoints, the others before they
      start (stopping.mark_stopped), and the sweep stops in one line; controllers and tasks start with SIGINT
      blocked, so a terminal's Ctrl-C reaches only this process (submitit's controllers would print tracebacks and
      SIGKILL their tasks);
    - a task that ends without a result (kill -9, out of memory) is recorded KILLED and the sweep goes on to its
      table (submitit raises 'has not produced any output').
    """

    _EXECUTOR = "local"

    def _stop_tasks(self, signum: int) -> None:
        """SIGTERM to each running task's controller, which sends it on to the task (a signal before the tasks
        exist is left to the stop mark: stopping.mark_stopped)."""
        for task in self._tasks:
            process = getattr(task, "_process", None)  # submitit's LocalJob: its controller's Popen
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    def _sharing(self, n_tasks: int) -> int | None:
        return n_tasks

    def _submit(self, tasks):
        # SIGINT blocked while submitit starts its controllers: they and their tasks keep it blocked (a terminal's
        # Ctrl-C reaches only this process, which forwards it once); one that comes meanwhile is handled after
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super()._submit(tasks)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _watch(self, tasks, groups: list[list[int]], dir_of: Callable[[int], Path]) -> list[JobReturn]:
        results: dict[int, JobReturn] = {}
        ended: set[int] = set()
        read: dict[int, int] = {}  # task -> how far its stdout was relayed
        while len(ended) < len(tasks):
            for t, task in enumerate(tasks):
                if t in ended:
                    continue
                read[t] = _relay(task.paths.stdout, read.get(t, 0))
                if task.paths.result_pickle.exists():
                    read[t] = _relay(task.paths.stdout, read[t])  # its last lines
                    results.update(zip(groups[t], _result(task, len(groups[t]))))
                    ended.add(t)
                elif task.done():  # its controller exited without a result
                    read[t] = _relay(task.paths.stdout, read[t])  # its last lines (an error, a signal's)
                    stopped = self._signals.signum
                    error = (app.stopped_before_start(stopped) if stopped else
                             f"its process ended without a result (killed, or out of memory: see "
                             f"{task.paths.stderr}); rerun the sweep with sweep.skip_finished=true")
                    if not stopped:
                        log.error("submitit task %s: %s", task.job_id, error)
                    for i in groups[t]:
                        app.record_killed(dir_of(i), error, stopped)
                        results[i] = _no_return()
                    ended.add(t)
            if len(ended) < len(tasks):
                time.sleep(0.2)
        with contextlib.suppress(OSError):  # submitit's local controllers make their folder's pattern too: an
            Path(str(self.params["submitit_folder"])).rmdir()  # empty `%j` dir beside the tasks' own
        return [results[i] for i in range(sum(len(g) for g in groups))]


def _relay(path: Path, offset: int) -> int:
    """Print the app's lines that a local task wrote to its stdout file since `offset` (epoch lines, test scores,
    errors; not submitit's own), as the fused launcher's workers print theirs: without it the sweep was silent
    from submission to its table. Returns how far the file was read (up to its last whole line)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:  # not written yet
        return offset
    whole = chunk[:chunk.rfind(b"\n") + 1]
    lines = [line for line in whole.decode(errors="replace").splitlines() if "][fmnist_exp" in line]
    if lines:
        print("\n".join(lines), flush=True)
    return offset + len(whole)
