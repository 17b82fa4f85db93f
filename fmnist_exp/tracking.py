"""The handle to the tracking process: each job's `Tracker` and the tracking processes that write for it.

A run logs through `Tracker` (start / log_epoch / log_metrics / log_artifact / finish), which hands every write
to the tracking process (tracking_process.py). The store's own queries and run ends are in store.py. A sweep's
parent run is made once, before its jobs start (see callbacks.py), and each job's child run points at it.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fmnist_exp.store import TrackingError, resolve_uri

METRICS_EVERY_S = 2.0  # per-epoch metrics reach MLflow at most this often: each write costs ~15 ms of CPU


class TrackingProcess:
    """A tracking process (tracking_process.py) of this process, started on first use, shared by the Trackers
    given it (TRACKING_PROCESS by default; PROCESSES holds the others a big group spreads its jobs over)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.trackers: dict[int, Tracker] = {}
        self.next_id = 0
        self.next_token = 0
        self.done: dict[int, str | None] = {}  # token -> error of a finished sync/finish
        self.used = False  # a Tracker has sent it work (else it may be discarded at once)
        self.gone: str | None = None  # why the process could not start (its last word), once known

    def start(self) -> None:
        """Start the process now if it is not running (__main__ does, before importing torch, so that its own
        imports overlap the training process's start-up)."""
        if self.proc is None or self.proc.poll() is not None:
            import socket
            from multiprocessing.connection import Connection
            ours, theirs = socket.socketpair()
            self.proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp.tracking_process", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=_child_env())
            theirs.close()
            self.conn = Connection(ours.detach())
            self.used, self.gone = False, None
            atexit.register(self.stop)

    def discard_unused(self) -> None:
        """Stop a process started ahead that no job needs (tracking.enabled=false, jobs in other processes)."""
        if self.proc is not None and not self.used:
            self.proc.kill()
            self.stop()

    def register(self, tracker: Tracker) -> int:
        self.start()
        self.used = True
        self.next_id += 1
        self.trackers[self.next_id] = tracker
        return self.next_id

    def send(self, tid: int, op: str, *args) -> None:
        if self.gone is not None:
            raise TrackingError(self.gone)
        try:
            self.conn.send((tid, op, args))
        except OSError as e:
            raise self._gone(f"the tracking process ended unexpectedly ({e}); rerun, or pass "
                             "tracking.enabled=false") from e

    def drain(self, token: int | None = None) -> None:
        """Take in the replies that have arrived (without waiting), or until the reply to `token`."""
        while token not in self.done if token is not None else self.conn.poll():
            try:
                kind, tid, *rest = self.conn.recv()
            except (EOFError, OSError) as e:
                raise self._gone("the tracking process ended unexpectedly; rerun, or pass "
                                 "tracking.enabled=false") from e
            tracker = self.trackers.get(tid)
            if kind == "gone":
                self.gone = rest[0]
                raise TrackingError(self.gone)
            if kind == "done":
                self.done[rest[0]] = rest[1]
            elif tracker is None:
                continue
            elif kind == "run":
                tracker.run_id = rest[0]
            elif kind == "error" and tracker._error is None:
                tracker._error = TrackingError(rest[0])

    def _gone(self, message: str) -> TrackingError:
        """The error for a tracking process that has gone: its last word if it left one (it could not start: a
        missing module), else `message`."""
        try:
            while self.gone is None and self.conn.poll():
                kind, _, *rest = self.conn.recv()
                if kind == "gone":
                    self.gone = rest[0]
        except (EOFError, OSError):
            pass
        return TrackingError(self.gone or message)

    def call(self, tid: int, op: str, *args) -> str | None:
        """Send op(token, *args) and wait for its reply: None, or the error message of a failed write."""
        self.next_token += 1
        token = self.next_token
        self.send(tid, op, token, *args)
        self.drain(token)
        return self.done.pop(token)

    def release(self, tid: int) -> None:
        self.trackers.pop(tid, None)

    def stop(self) -> None:
        """At exit: close the connection and wait for the process to end (it has nothing left to write by then;
        a run still open is ended KILLED by it)."""
        if self.proc is not None:
            if not self.used:
                self.proc.kill()
            self.conn.close()
            self.proc.wait(timeout=120)
            self.proc, self.conn = None, None


def _child_env() -> dict[str, str]:
    """The tracking process imports this same fmnist_exp (an editable checkout, or a wheel)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root,
            "OMP_NUM_THREADS": "1"}  # it never trains: one thread for the plots


TRACKING_PROCESS = TrackingProcess()
PROCESSES = [TRACKING_PROCESS]  # this process's tracking processes (a big group spreads its jobs over several)
JOBS_PER_PROCESS = 8  # a job's end (plots, writes) costs its tracking process ~0.2 s: 8 jobs ~1.6 s
MAX_PROCESSES = 8


def processes_for(jobs: int, spare_cores: int, requested: int | None = None) -> int:
    """How many tracking processes the trackers of `jobs` jobs trained together spread over: as requested, else
    one per JOBS_PER_PROCESS jobs as far as spare cores allow (a GPU worker's 256 jobs on a 16-core host: 8, their
    end-of-run drawing 8 at a time; 2 workers on 2 cores: 1), at most MAX_PROCESSES."""
    if requested and requested > 0:
        return requested
    return max(1, min(MAX_PROCESSES, spare_cores, -(-jobs // JOBS_PER_PROCESS)))


def pick_process(k: int, n: int) -> TrackingProcess:
    """The tracking process of the k-th job of a group spread over n (started when first used): round robin, so
    each holds every n-th job and a job's writes stay in order in one process."""
    while len(PROCESSES) < n:
        PROCESSES.append(TrackingProcess())
    return PROCESSES[k % n]


class Tracker:
    """One job's MLflow run plus TensorBoard event files in `log_dir`; every call is a no-op when disabled.

    The writes happen in the tracking process (tracking_process.py), in the order they were asked for, so training
    never waits for MLflow or TensorBoard (importing them, creating the run, logging, plotting, logging the model).
    Per-epoch metrics go to TensorBoard every epoch and to MLflow at most every METRICS_EVERY_S. `check`
    raises a write that failed (the loop calls it every epoch), `flush` waits for all writes, and `finish`
    flushes before it ends the run.
    """

    def __init__(self, uri: str | None, experiment: str, log_dir: Path, enabled: bool = True,
                 process: TrackingProcess | None = None):
        self.enabled = enabled
        self._proc = process or TRACKING_PROCESS
        self.uri = resolve_uri(uri) if enabled else None
        self.experiment = experiment
        self.log_dir = Path(log_dir)
        self.run_id: str | None = None  # set when the tracking process has made (or reopened) the run
        self._error: TrackingError | None = None  # the first failed write, until check/flush raises it
        self._id: int | None = None
        if enabled:
            self._id = self._proc.register(self)
            self._proc.send(self._id, "new", self.uri, experiment, str(self.log_dir))

    def _submit(self, op: str, *args) -> None:
        if self.enabled:
            if self._id is None:
                raise TrackingError("this tracker was closed")
            self._proc.send(self._id, op, *args)

    def check(self) -> None:
        """Raise (as TrackingError, once) a write that failed; later writes go through again."""
        if self.enabled and self._id is not None:
            self._proc.drain()
        error, self._error = self._error, None
        if error is not None:
            self._submit("resume")
            raise error

    def flush(self) -> None:
        """Wait until every write asked for so far is done; raise the first that failed."""
        if self.enabled and self._id is not None:
            self._submit("send_metrics_if_any")
            self._proc.call(self._id, "sync")
        self.check()

    # --- what a job logs -------------------------------------------------------------------------------------
    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str],
              parent_run_id: str | None = None) -> None:
        """Create the MLflow run (logging params and tags) and open the TensorBoard writer."""
        self._submit("start", run_name, params, tags, parent_run_id)

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Continue an earlier (KILLED/FAILED) run: RUNNING again, new tags, metrics continue at later steps."""
        self._submit("reopen", run_id, tags)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch metrics at step=epoch to MLflow; losses, accuracy and lr to TensorBoard. Raises a failed
        earlier write here, so a broken store stops training after one epoch, not at the end."""
        self.check()
        self._submit("log_epoch", epoch, dict(metrics))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._submit("log_metrics", dict(metrics), step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file that no longer changes (the tracking process reads it later)."""
        self._submit("log_artifact", str(path), artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        self._submit("log_text", text, filename)

    def log_figure(self, kind: str, args: tuple, path: Path, tensorboard_tag: str | None = None) -> None:
        """`plots.<kind>(*args)` drawn by the tracking process, saved as a PNG at `path`, logged under the run's
        plots/, optionally shown in TensorBoard's IMAGES tab."""
        self._submit("log_figure", kind, args, str(path), tensorboard_tag)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """TensorBoard's HPARAMS tab: this job's settings against its scores, beside every job of the sweep."""
        self._submit("log_hparams", hparams, metrics)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, int]) -> None:
        """The data set as an MLflow dataset input: the runs table's Dataset column."""
        self._submit("log_dataset", name, digest, source, profile)

    def log_model(self, graph: Path, example, output, torch_version: str) -> None:
        """The graph `models.export` saved as an MLflow model on this run (see log_model)."""
        self._submit("log_model", str(graph), example, output, torch_version)

    def set_tag(self, key: str, value: str) -> None:
        self._submit("set_tag", key, value)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Wait for every write, close TensorBoard, then end the MLflow run with `status` (FINISHED, FAILED,
        KILLED). A failed write is raised after the run has ended (never left RUNNING)."""
        if not self.enabled or self._id is None:
            return
        reply = self._proc.call(self._id, "finish", status, error)
        failure, self._error = self._error or (TrackingError(reply) if reply else None), None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Release what this tracker holds in the tracking process; finish() first to keep the writes. Safe to
        call more than once."""
        if self._id is not None:
            try:
                self._proc.send(self._id, "close")
            except TrackingError:
                pass
            self._proc.release(self._id)
            self._id = None
