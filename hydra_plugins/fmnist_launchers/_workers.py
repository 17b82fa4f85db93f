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
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log
from omegaconf import DictConfig

from fmnist_exp import launching as app

from . import _core

log = logging.getLogger(__name__)

LOST = ("its worker process died before recording the job (killed, or out of memory); "
        "rerun the sweep with sweep.skip_finished=true")
LOST_WAIT_S = 15.0  # how long a dead worker's tracking process may take to end its jobs' runs (see record_lost)


def launch(launcher, configs: list[DictConfig], groups: list[list[int]], workers: int) -> list[JobReturn]:
    """Train `groups` (indices of `configs`, costliest first) on `workers` worker processes; one JobReturn per
    job in input order. After a signal: the running groups end KILLED, the rest never start, the sweep exits."""
    app.discard_tracking_process()  # each worker has its own tracking process
    hydra = launcher.config.hydra
    logging_cfg = (_core.job_console(hydra), hydra.verbose)  # jobs' lines as under any launcher
    results: list[JobReturn | None] = [None] * len(configs)
    pending = list(enumerate(groups, start=1))
    running: dict = {}
    free_slots = list(range(workers))
    searching = getattr(launcher, "trials", None) is not None  # a search: new trials join running groups
    joiners: dict[str, _core.Joiner] = {}  # by group name
    asks = multiprocessing.get_context("spawn").Queue() if searching else None  # workers' (slot, group, free)
    answers = [multiprocessing.get_context("spawn").Queue() for _ in range(workers)] if searching else None
    signals = app.Forward(Path(str(hydra.sweep.dir)))  # a worker that gets the signal before its group's handlers are
    # in place (unpickling, logging set up) would ignore it: its jobs then find the sweep's stop mark and end KILLED
    outcomes_seen, expected = [], len(configs)
    pools: list[ProcessPoolExecutor | None] = [None] * workers  # a slot's worker, started with its first group
    # the sweep's bar where a run would draw one
    feed = _Feed(sum(int(c.train.epochs) for c in configs)) if app.shows_progress(configs[0]) else None
    configure_log(*logging_cfg)  # the workers' lines this process prints (the sweep's bar) and its own, alike
    with signals, feed or contextlib.nullcontext():
        try:
            while pending or running:
                while pending and free_slots and signals.signum is None:
                    n, ids = pending.pop(0)
                    group_configs = [configs[i] for i in ids]
                    members, hydra_cfgs = _core.start_jobs(launcher, group_configs, str(n), parallel_jobs=workers)
                    slot = free_slots.pop(0)
                    if searching:
                        joiners[str(n)] = _core.Joiner(launcher, group_configs[0], str(n), parallel_jobs=workers)
                    future = _submit(pools, slot, members, logging_cfg, feed and feed.queue,
                                     (asks, answers[slot], slot) if searching else None)
                    running[future] = (ids, group_configs, hydra_cfgs, members, slot)
                if not running:
                    break
                done, _ = wait(running, timeout=0.1 if searching else 0.5, return_when=FIRST_COMPLETED)
                if searching:
                    _answer(asks, answers, joiners, feed, stopped=signals.signum is not None)
                for future in done:
                    ids, group_configs, hydra_cfgs, members, slot = running.pop(future)
                    free_slots.append(slot)
                    joiner = joiners.pop(members[0][1].group, None)
                    if joiner is not None:  # the trials that joined this group: their jobs follow the group's
                        expected += len(joiner.configs)
                        group_configs = group_configs + joiner.configs
                        hydra_cfgs, members = hydra_cfgs + joiner.hydra_cfgs, members + joiner.members
                    try:
                        outcomes = future.result()
                    except Exception as e:  # the worker died (killed, out of memory) or could not send its results
                        log.error("group of %s: %s (%s)", ", ".join(ctx.run_name for _, ctx in members), LOST,
                                  type(e).__name__)
                        if isinstance(e, BrokenProcessPool):  # the slot's next group gets a fresh worker
                            pools[slot].shutdown(wait=True)
                            pools[slot] = None
                        outcomes = app.record_lost(members, LOST, LOST_WAIT_S)
                    outcomes_seen += outcomes
                    if feed is not None:
                        feed.group_done(members)
                    rets = _core.end_jobs(launcher, group_configs, hydra_cfgs, members, outcomes)
                    for i, ret in zip(ids, rets):
                        results[i] = ret
                    if joiner is not None:
                        joiner.ended(rets[len(ids):])
        finally:
            for pool in pools:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
    configure_log(hydra.hydra_logging, hydra.verbose)  # after the bar's logging redirect has put its handlers back
    signals.end_sweep(Path(str(hydra.sweep.dir)), outcomes_seen, expected)
    return results


def _answer(asks, answers: list, joiners: dict, feed, stopped: bool) -> None:
    """Workers' asks for trials to fill their groups' free places: each answered with the jobs (task config,
    context) that join, composed and started here (_core.Joiner); none once the sweep is stopping."""
    import queue
    while True:
        try:
            slot, group, free = asks.get_nowait()
        except queue.Empty:
            return
        joiner = joiners.get(group)
        members = [] if stopped or joiner is None else joiner(free)
        if feed is not None and members:
            feed.add(sum(int(cfg.train.epochs) for cfg, _ in members))
        answers[slot].put(members)


JOIN_WAIT_S = 120.0  # how long a worker waits for the launcher's answer before its group trains on without new trials


def _submit(pools: list, slot: int, members: list, logging_cfg: tuple, feed_queue, joining=None) -> Future:
    """Hand a group to the worker of `slot` (a pool of one process), starting one where the slot has none, or has
    one that died while idle (its pool is then broken)."""
    for _ in range(2):
        if pools[slot] is None:
            pools[slot] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_init_worker, initargs=(feed_queue, joining))
        # a worker starts (spawned in submit) with the stop signals blocked: one that reaches it while it imports
        # waits for _init_worker, which records it, rather than a KeyboardInterrupt killing it mid-import
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, app.STOP_SIGNALS)
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


def train_in_worker(members: list, logging_cfg: tuple) -> list:
    """In a worker: one group's jobs trained together, each outcome written to its job dir; returns the outcomes
    (in a search, those of the trials that joined the group follow the group's: asked of the launcher's _answer)."""
    configure_log(*logging_cfg)
    if _STOPPED is not None:  # stopped while this worker started: its jobs never begin (no runs), the sweep stops
        outcomes = [app.Outcome("KILLED", error=app.stopped_before_start(_STOPPED), signum=_STOPPED)
                    for _ in members]
        app.settle(outcomes, members, ends_sweep=False)
        return outcomes
    epochs_done = None
    if _FEED is not None:  # the launcher draws the sweep's bar: this worker's log lines and epochs go to it
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(logging.handlers.QueueHandler(_FEED))
        group = members[0][1].group
        epochs_done = lambda n: _FEED.put(("epochs", group, n))
    joined: list = []
    join = None
    if _JOINING is not None:
        asks, answers, slot = _JOINING
        group = members[0][1].group

        def join(free: int) -> list:
            import queue
            asks.put((slot, group, free))
            try:
                new = answers.get(timeout=JOIN_WAIT_S)
            except queue.Empty:
                log.warning("group %s: no answer from the launcher in %.0f s; it trains on without new trials",
                            group, JOIN_WAIT_S)
                return []
            joined.extend(new)
            return new
    outcomes = _core.train_group(members, epochs_done, join)
    app.settle(outcomes, members + joined, ends_sweep=False)
    return outcomes


_FEED = None  # in a worker: the launcher's _Feed queue, when it draws the sweep's progress bar
_STOPPED = None  # in a worker: the stop signal that came while it started, if any
_JOINING = None  # in a worker of a search: (asks, answers, slot), its queues to the launcher's _answer


def _init_worker(feed_queue=None, joining=None) -> None:
    """A worker's process-wide set-up: its own process group (a terminal's Ctrl-C reaches the launcher, which
    forwards it once), signals ignored between groups (app.run_group handles them during one), a watch on the
    launcher (one that dies stops the worker's jobs, and the worker ends: app.start_worker), and the launcher's
    feed and, in a search, its queues for trials that join a group, if any."""
    global _FEED, _STOPPED, _JOINING
    _FEED, _JOINING = feed_queue, joining
    os.setpgid(0, 0)
    pending = signal.sigpending()  # blocked since the launcher spawned us (_submit)
    _STOPPED = next((sig for sig in app.STOP_SIGNALS if sig in pending), None)
    for sig in app.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards the pending ones
    app.start_worker()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, app.STOP_SIGNALS)


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

    def add(self, epochs: int) -> None:
        """Jobs that joined a running group (a search's trials): their epochs to train."""
        with self._lock:
            self.total += epochs
            self.bar.total = self.total
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
