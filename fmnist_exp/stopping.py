"""Stopping, in one place: the signals that stop a job or a sweep, the stop mark in a sweep dir, forwarding a stop
to workers and cluster tasks, a worker whose launcher died, and ending a stopped sweep's parent run.

Who does what on Ctrl-C (or SIGTERM, or SLURM's SIGUSR2):
- a job training: StopOnSignal records the signal; the loop stops at the next step and the job ends KILLED with its
  last epoch's checkpoint (job.run_group); job.settle writes each outcome and ends a stopped sweep (stop_sweep);
- a launcher whose jobs run in other processes: Forward marks the sweep stopped (mark_stopped: jobs that start later
  end KILLED before they start) and sends the signal on once; after the launch, Forward.end_sweep ends the sweep;
- the sweep's process between jobs: SweepSignals (callbacks.SweepCallback installs it) ends the sweep the same way;
- a launcher's worker process: WorkerSignals ignores stops between jobs and watches for its launcher's death.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from fmnist_exp import store

log = logging.getLogger("fmnist_exp")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Handlers:
    """One handler for some signals while installed, the previous ones put back after: what StopOnSignal,
    SweepSignals, Forward and WorkerSignals share. Off the main thread (where Python allows no handlers; some
    launchers run jobs there) it installs none and leaves the process's own."""

    def __init__(self, signals, handler):
        self.signals, self.handler, self._previous = tuple(signals), handler, {}

    def install(self) -> Handlers:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self.handler)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGUSR2 arrived: the current epoch was abandoned; the last completed one is
    checkpointed."""

    def __init__(self, signum: int, started: bool = True):
        why = " (SLURM's warning before a time limit or preemption)" if signum == signal.SIGUSR2 else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{why}{'' if started else ' before it started'}")
        self.signum, self.started = signum, started


class StopOnSignal:
    """While active, SIGINT/SIGTERM/SIGUSR2 only set `signum`: the loop stops at the next step and the job records
    itself KILLED (SIGUSR2 is SLURM's warning before a time limit or preemption: job.settle then hands it to
    submitit, which requeues the job). A second signal during training stops it at once (raised where it lands; the
    last epoch's checkpoint is intact), a second one after training (testing, logging, or recording a stop) is
    ignored, and a third goes to the handler that was there before (Python's default in a single run: the process
    stops at once)."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self.recording = False  # set once training is over: the job is writing its results or its stop
        self._handlers = Handlers(STOP_SIGNALS, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.signum = signum
            return
        self._handlers.restore()  # a third signal is not ignored
        if not self.recording:
            raise Interrupted(signum)

    def __enter__(self):
        self._handlers.install()
        return self

    def __exit__(self, *exc):
        self._handlers.restore()


STOPPED_FILE = "sweep_stopped"  # in a sweep dir: the signal that stopped the sweep (see mark_stopped)


def mark_stopped(sweep_dir: Path, signum: int) -> None:
    """A launcher whose jobs run in other processes (joblib, submitit's local executor) was stopped: it forwards the
    signal to the jobs running, and jobs that start after it (already handed to a worker, or a process still
    starting) find this mark and end KILLED before they start (run_group)."""
    with contextlib.suppress(OSError):
        (sweep_dir / STOPPED_FILE).write_text(str(signum))


def sweep_stopped(sweep_dir: Path | None) -> int | None:
    """The signal that stopped the sweep of `sweep_dir`, if a launcher marked it stopped."""
    try:
        return int((sweep_dir / STOPPED_FILE).read_text()) if sweep_dir else None
    except (OSError, ValueError):
        return None


LAUNCHER_GONE = ("its sweep's process died while it trained (kill -9, out of memory?), so its worker stopped it; "
                 "rerun the sweep with sweep.skip_finished=true")
PARENT_GONE = ("the sweep's process died before the sweep ended (kill -9, out of memory?); rerun the same command "
               "with sweep.skip_finished=true to finish it")


def launcher_gone() -> bool:
    """In a launcher's worker process (the fused launcher's, joblib's): whether the launcher has died."""
    launcher = multiprocessing.parent_process()
    return launcher is not None and os.getppid() != launcher.pid


def stop_sweep(parent: dict | None, signum: int, sweep: bool = True, started: bool = True):
    """The user stopped the process with signal `signum`: close the sweep's parent run too (if any: KILLED, saying
    why), say how to finish the sweep, and exit as an interrupted process does (128 + N). Every launcher ends a
    stopped sweep this way; a single run (`sweep=False`) only exits: its job has said how to resume it. A sweep
    stopped before any job `started` recorded nothing: its parent is left to the exit hook, which deletes it
    (callbacks.end_if_running)."""
    name = signal.Signals(signum).name
    if sweep and not started:
        log.error("Sweep stopped by %s before any job started: nothing was recorded", name)
        sys.exit(128 + signum)
    if parent:
        try:
            store.end_killed(parent["uri"], parent["run_id"], f"stopped by {name}: rerun the same command with "
                                                              "sweep.skip_finished=true to finish it")
        except Exception as e:  # exiting anyway: the atexit check (callbacks.end_if_running) tries again
            log.error("could not end the sweep's parent run: %s", e)
    if sweep:
        log.error("Sweep stopped by %s: its unfinished jobs are KILLED with their last epoch's checkpoint; to finish "
                  "it, rerun the same command with sweep.skip_finished=true (finished jobs are skipped, stopped ones "
                  "resume)", name)
    sys.exit(128 + signum)


class SweepSignals:
    """SIGINT / SIGTERM while no job of the sweep's process is training (Hydra composing, the launcher between jobs
    or groups, workers starting): the same end as a stop during training (stop_sweep: the parent KILLED saying
    why, one line on how to finish the sweep, exit 128+N) instead of a traceback, or a silent death that left the
    parent RUNNING. A job's training and the fused launcher's workers install their own handlers over these and
    put them back after. At the sweep's end (`defer`) a signal waits until the table and the runs are recorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, sweep_dir: Path, started: Callable[[], bool]):
        self.sweep_dir, self.started, self.deferring, self.signum = sweep_dir, started, False, None
        self._handlers = Handlers(self.SIGNALS, self._handle)

    def install(self) -> SweepSignals:
        self._handlers.install()
        return self

    def defer(self) -> None:
        self.deferring = True

    def uninstall(self) -> int | None:
        """Put the previous handlers back; the signal that came while deferring, if any."""
        self._handlers.restore()
        return self.signum

    def _handle(self, signum, frame) -> None:
        if self.deferring:
            self.signum = self.signum or signum
            return
        self.uninstall()  # a second signal: Python's default
        stop_sweep(store.read_parent(self.sweep_dir), signum, started=self.started())


class Forward:
    """While active, the signals that stop a job (STOP_SIGNALS: SIGINT, SIGTERM, SLURM's SIGUSR2) are
    recorded and sent on to every worker process (each stops its jobs at the next step, KILLED with their
    checkpoints); a third signal gets the default behaviour."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, sweep_dir: Path | None = None):
        self.signum: int | None = None
        self.count = 0
        self.sweep_dir = sweep_dir  # where to mark the sweep stopped, for jobs that start after the signal
        self._handlers = Handlers(self.SIGNALS, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.sweep_dir is not None and self.count == 1:
            mark_stopped(self.sweep_dir, signum)
        self.forward(signum)
        if self.count >= 3:
            self.__exit__()
            signal.raise_signal(signum)

    def forward(self, signum: int) -> None:
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    def end_sweep(self, sweep_dir: Path, outcomes: Iterable, jobs: int, jobs_signals: bool = True) -> None:
        """After the launch of `jobs` jobs: if the user stopped the sweep (a signal to this process, or, with
        `jobs_signals`, to the jobs' processes directly: SIGINT or SIGTERM in a job's outcome, as a terminal's Ctrl-C
        reaches a process group; not on a cluster, where SLURM's SIGTERM is scancel's), every started job has
        recorded itself KILLED: close the parent run and exit (stop_sweep). A signal that came once every job had
        trained to its end (while they tested or were recorded, or after) stopped none: the sweep's end records its
        table and winner, then exits 128+N (it finds the stop mark). A time limit's SIGUSR2 in a job's outcome
        (requeues used up) ends only its jobs: the sweep goes on to its table."""
        outcomes = list(outcomes)
        signum = self.signum or next((o.signum for o in outcomes if o.signum in (signal.SIGINT, signal.SIGTERM)
                                      and jobs_signals), None)
        if signum is None:
            return
        if len(outcomes) == jobs and not any(o.status == "KILLED" for o in outcomes):  # it stopped no job
            mark_stopped(sweep_dir, signum)
            return
        stop_sweep(store.read_parent(sweep_dir), signum)

    def __enter__(self):
        self._handlers.install()
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.restore()


class WorkerSignals:
    """In a launcher's worker process (joblib's loky workers; the fused launcher's call this from their initializer):
    a process group of its own, so a terminal's Ctrl-C reaches only the launcher, which forwards it once (Forward),
    and a stop signal between jobs does not kill the worker: the launcher has marked the sweep stopped first
    (mark_stopped), so its next jobs end KILLED before they start. A worker whose launcher dies (kill -9) stops its
    jobs, ends the sweep's parent run (`parent()`: the run of the worker's last job), and exits."""

    def __init__(self, parent: Callable[[], dict | None]):
        self.parent = parent
        self._watching: Handlers | None = None

    def install(self) -> None:
        launcher = multiprocessing.parent_process()
        if self._watching is not None or launcher is None:
            return
        with contextlib.suppress(OSError):  # (ProcessLookupError: the launcher is gone; PermissionError)
            if os.getpgid(0) == os.getpgid(launcher.pid):
                os.setpgid(0, 0)
        self._watching = Handlers(STOP_SIGNALS, self._between_jobs).install()
        self.watch_launcher(launcher.pid)

    def watch_launcher(self, pid: int) -> None:
        """A thread that sends this process SIGTERM once the launcher (`pid`) has died: a job training stops KILLED
        with its checkpoint (then settle ends the process), and an idle worker ends at once (_between_jobs)."""
        def watch() -> None:
            while os.getppid() == pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, name="watch-launcher", daemon=True).start()

    def _between_jobs(self, signum, frame) -> None:
        if launcher_gone():
            self.abandon()

    def abandon(self) -> None:
        """The launcher is dead and no job of this worker trains: end the sweep's parent run KILLED (nobody else
        will: its table is never printed), then exit; the jobs' tracking processes end with it."""
        parent = self.parent()
        if parent:
            with contextlib.suppress(Exception):
                store.end_killed(parent["uri"], parent["run_id"], PARENT_GONE, only_if_running=True)
        logging.shutdown()
        os._exit(1)
