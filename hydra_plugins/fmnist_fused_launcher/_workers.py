"""Fused groups trained at once, each in a worker process of its own (hydra.launcher.n_jobs, by default one per
CPU core): on a CPU, one torch thread per process beats two threads in one process on ops this small (a group of
4 at batch 16: 1.5-1.9x the throughput, benchmarks/RESULTS.md).

The launcher's process does what Hydra does around a job (output dir, .hydra/ configs, callbacks, JobReturn) and
hands each group's jobs to a free worker, costliest group first (fusion.balance); a worker trains them exactly as a
group trained in this process (_core.train_group: the same job lifecycle) and returns their outcomes. Workers run
in a process group of their own: a signal reaches the launcher, which forwards it to every worker once (each stops
its jobs KILLED with their checkpoints) and starts no more groups; a worker whose launcher dies stops its jobs
and exits.

Each worker slot is a pool of one process: a pool whose process dies (the OOM killer, kill -9) is broken, and one
pool of n would terminate its other workers with it. So only the dead worker's jobs are lost (KILLED, each run with
LOST as its reason); the other workers train on, and the slot's next group starts in a fresh worker.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable

from hydra.core.utils import JobReturn, configure_log
from omegaconf import DictConfig

from fmnist_exp.train import STOP_SIGNALS, Handlers

from . import _core

log = logging.getLogger(__name__)

LOST = ("its worker process died before recording the job (killed, or out of memory); "
        "rerun the sweep with sweep.skip_finished=true")
LOST_WAIT_S = 15.0  # how long a dead worker's tracking process may take to end its jobs' runs (see record_lost)


def launch(launcher, configs: list[DictConfig], groups: list[list[int]], workers: int) -> list[JobReturn]:
    """Train `groups` (indices of `configs`, costliest first) on `workers` worker processes; one JobReturn per
    job in input order. After a signal: the running groups end KILLED, the rest never start, the sweep exits."""
    from fmnist_exp import job, tracking
    tracking.TRACKING_PROCESS.discard_unused()  # each worker has its own tracking process
    hydra = launcher.config.hydra
    logging_cfg = (_core.job_console(hydra), hydra.verbose)  # jobs' lines as under any launcher
    results: list[JobReturn | None] = [None] * len(configs)
    pending = list(enumerate(groups, start=1))
    running: dict = {}
    free_slots = list(range(workers))
    signals = Forward(Path(str(hydra.sweep.dir)))  # a worker that gets the signal before its group's handlers are
    # in place (unpickling, logging set up) would ignore it: its jobs then find the sweep's stop mark and end KILLED
    outcomes_seen = []
    pools: list[ProcessPoolExecutor | None] = [None] * workers  # a slot's worker, started with its first group
    # the sweep's bar where a run would draw one
    feed = _Feed(sum(int(c.train.epochs) for c in configs)) if job.shows_progress(configs[0]) else None
    configure_log(*logging_cfg)  # the workers' lines this process prints (the sweep's bar) and its own, alike
    with signals, feed or contextlib.nullcontext():
        try:
            while pending or running:
                while pending and free_slots and signals.signum is None:
                    n, ids = pending.pop(0)
                    group_configs = [configs[i] for i in ids]
                    members, hydra_cfgs = _core.start_jobs(launcher, group_configs, str(n), parallel_jobs=workers)
                    slot = free_slots.pop(0)
                    future = _submit(pools, slot, members, logging_cfg, feed and feed.queue)
                    running[future] = (ids, group_configs, hydra_cfgs, members, slot)
                if not running:
                    break
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    ids, group_configs, hydra_cfgs, members, slot = running.pop(future)
                    free_slots.append(slot)
                    try:
                        outcomes = future.result()
                    except Exception as e:  # the worker died (killed, out of memory) or could not send its results
                        log.error("group of %s: %s (%s)", ", ".join(ctx.run_name for _, ctx in members), LOST,
                                  type(e).__name__)
                        if isinstance(e, BrokenProcessPool):  # the slot's next group gets a fresh worker
                            pools[slot].shutdown(wait=True)
                            pools[slot] = None
                        outcomes = record_lost(members)
                    outcomes_seen += outcomes
                    if feed is not None:
                        feed.group_done(members)
                    for i, ret in zip(ids, _core.end_jobs(launcher, group_configs, hydra_cfgs, members, outcomes)):
                        results[i] = ret
        finally:
            for pool in pools:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
    configure_log(hydra.hydra_logging, hydra.verbose)  # after the bar's logging redirect has put its handlers back
    signals.end_sweep(Path(str(hydra.sweep.dir)), outcomes_seen, len(configs))
    return results


def _submit(pools: list, slot: int, members: list, logging_cfg: tuple, feed_queue) -> Future:
    """Hand a group to the worker of `slot` (a pool of one process), starting one where the slot has none, or has
    one that died while idle (its pool is then broken)."""
    for _ in range(2):
        if pools[slot] is None:
            pools[slot] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_init_worker, initargs=(feed_queue,))
        # a worker starts (spawned in submit) with the stop signals blocked: one that reaches it while it imports
        # waits for _init_worker, which records it, rather than a KeyboardInterrupt killing it mid-import
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return pools[slot].submit(train_in_worker, members, logging_cfg)
        except BrokenProcessPool as e:
            error = e
            pools[slot].shutdown(wait=True)
            pools[slot] = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    future = Future()  # a fresh worker died at once too: the group is lost as a running one is
    future.set_exception(error)
    return future


def record_lost(members: list) -> list:
    """The outcomes of a group whose worker died: each job KILLED with LOST, written to its job dir. The jobs' runs
    were made by the worker's tracking process, which ends them KILLED when the worker goes (tracking_process.serve):
    once it has (or after LOST_WAIT_S), each such run gets LOST as its reason and its id goes into the outcome, so
    that no run stays RUNNING and the sweep's end counts the job once, by its run."""
    from fmnist_exp import job, store, tracking_process
    outcomes = [job.Outcome("KILLED", error=LOST) for _ in members]
    parent = members[0][1].parent  # the jobs of a group share their sweep
    tracked = [i for i, (cfg, _) in enumerate(members) if cfg.tracking.enabled]
    if parent and tracked:
        try:
            dirs = {i: str(members[i][1].job_dir.resolve()) for i in tracked}
            deadline = time.monotonic() + LOST_WAIT_S
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
                    store.end_killed(parent["uri"], run.info.run_id, LOST)
        except Exception as e:  # the store is unreachable: the outcomes still say what happened
            log.error("could not record the lost jobs' runs KILLED: %s", e)
    job.settle(outcomes, members, ends_sweep=False)
    return outcomes


def train_in_worker(members: list, logging_cfg: tuple) -> list:
    """In a worker: one group's jobs trained together, each outcome written to its job dir; returns the outcomes."""
    from fmnist_exp import job, train
    configure_log(*logging_cfg)
    if _STOPPED is not None:  # stopped while this worker started: its jobs never begin (no runs), the sweep stops
        outcomes = [job.Outcome("KILLED", error=str(train.Interrupted(_STOPPED, started=False)), signum=_STOPPED)
                    for _ in members]
        job.settle(outcomes, members, ends_sweep=False)
        return outcomes
    if _FEED is not None:  # the launcher draws the sweep's bar: this worker's log lines and epochs go to it
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(logging.handlers.QueueHandler(_FEED))
        group = members[0][1].group
        train.EPOCHS_DONE = lambda n: _FEED.put(("epochs", group, n))
    outcomes = _core.train_group(members)
    job.settle(outcomes, members, ends_sweep=False)
    return outcomes


_FEED = None  # in a worker: the launcher's _Feed queue, when it draws the sweep's progress bar
_STOPPED = None  # in a worker: the stop signal that came while it started, if any


def _init_worker(feed_queue=None) -> None:
    """A worker's process-wide set-up: its own process group (a terminal's Ctrl-C reaches the launcher, which
    forwards it once), signals ignored between groups (train.StopOnSignal handles them during one), a watch on the
    launcher (one that dies stops the worker's jobs, and the worker ends: job.Process.watch_signals), and the
    launcher's feed, if any."""
    from fmnist_exp import job
    global _FEED, _STOPPED
    _FEED = feed_queue
    os.setpgid(0, 0)
    pending = signal.sigpending()  # blocked since the launcher spawned us (_submit)
    _STOPPED = next((sig for sig in Forward.SIGNALS if sig in pending), None)
    for sig in Forward.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards the pending ones
    job.PROCESS.watch_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, Forward.SIGNALS)


class Forward:
    """While active, the signals that stop a job (train.STOP_SIGNALS: SIGINT, SIGTERM, SLURM's SIGUSR2) are
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
            from fmnist_exp import job
            job.mark_stopped(self.sweep_dir, signum)
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
        recorded itself KILLED;
        close the parent run and exit (job.stop_sweep). A signal that came once every job had trained to its end
        (while they tested or were recorded, or after) stopped none: the sweep's end records its table and winner,
        then exits 128+N (job.STOPPED_AFTER_JOBS). A time limit's SIGUSR2 in a job's outcome (requeues used up)
        ends only its jobs: the sweep goes on to its table."""
        from fmnist_exp import job, store
        outcomes = list(outcomes)
        signum = self.signum or next((o.signum for o in outcomes if o.signum in (signal.SIGINT, signal.SIGTERM)
                                      and jobs_signals), None)
        if signum is None:
            return
        if len(outcomes) == jobs and not any(o.status == "KILLED" for o in outcomes):  # it stopped no job
            job.STOPPED_AFTER_JOBS = signum
            return
        job.stop_sweep(store.read_parent(sweep_dir), signum)

    def __enter__(self):
        self._handlers.install()
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.restore()


class _Feed:
    """The sweep's one progress bar, drawn by the launcher while its workers share a terminal: a bar per worker
    would be overwritten by the other workers' log lines (stale bars, lines starting mid-line). Workers send their
    log records and the job-epochs they train through a queue; the launcher prints the records above the bar
    (tqdm's logging redirect) and counts the epochs (a group that ends counts all its jobs' epochs: skipped, resumed,
    stopped early or failed)."""

    def __init__(self, total: int):
        self.total, self.done, self.running, self.ended = total, 0, {}, set()
        self.queue = multiprocessing.get_context("spawn").Queue()
        self._lock = threading.Lock()

    def __enter__(self):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = tqdm(total=self.total, desc="sweep", unit="job-epoch", file=sys.stderr, dynamic_ncols=True)
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._thread = threading.Thread(target=self._drain, name="sweep-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.queue.put(None)
        self._thread.join(timeout=5)
        self._redirect.__exit__(*exc)
        self.bar.close()

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            if isinstance(item, logging.LogRecord):
                logging.getLogger(item.name).handle(item)  # the launcher's handlers: printed above the bar
                continue
            _, group, n = item
            with self._lock:
                if group not in self.ended:  # a late count of a group already counted whole is dropped
                    self.running[group] = self.running.get(group, 0) + n
                    self._show()

    def group_done(self, members: list) -> None:
        with self._lock:
            group = members[0][1].group
            self.ended.add(group)
            self.running.pop(group, None)
            self.done += sum(int(cfg.train.epochs) for cfg, _ in members)
            self._show()

    def _show(self) -> None:
        self.bar.n = min(self.total, self.done + sum(self.running.values()))
        self.bar.refresh()
