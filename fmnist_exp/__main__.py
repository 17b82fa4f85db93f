"""Entry point: `python -m fmnist_exp [overrides]` or `fmnist-exp [overrides]`; add `-m` to sweep.

Hydra composes the config and calls `task` once per job; the job itself (validate, build, train, log, end its
run) is `job.run`. This module only turns a job's outcome into what Hydra and the shell expect.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading


STOPPED_STARTING = "Stopped by SIGINT before any job started: nothing was recorded"


def _stopped_while_starting(signum, frame) -> None:
    """Ctrl-C while Python imports torch, Hydra and MLflow (the first ~2 s): one line, not a traceback from
    wherever the import was. main() hands SIGINT back to Python before anything is recorded."""
    print(STOPPED_STARTING, file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "fmnist-exp":  # the command, not an import of it
    signal.signal(signal.SIGINT, _stopped_while_starting)

# torch's CPU threads (libgomp) wait for work by spinning up to 300,000 times, read when torch loads: two runs on the
# same cores (two commands, or a run beside a busy process) then spin against each other, and a step took 100-200x
# its time alone (0.9 ms -> 205 ms, two 2-thread runs on 2 cores); at 10,000 spins that is 15 ms, and a run alone
# loses nothing (benchmarks/RESULTS.md). The user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fmnist_exp import config, tracking  # noqa: E402

config.register()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float | None:
    """One job: a single run, or one child of a sweep. Returns the best checkpoint's monitored validation score
    (what an optimising sweeper would use); exits 1 for a failed single run, 128+N after signal N."""
    from fmnist_exp import job, stopping  # torch: imported after the tracking process has started (main)
    ctx = job.JobContext.from_hydra(HydraConfig.get())
    job.PROCESS.watch_signals()  # in a launcher's worker process (joblib): a stop between jobs does not kill it
    with stopping.StopOnSignal() as stop:
        outcome = job.run(cfg, ctx, stop)
    stopped = job.settle([outcome], [(cfg, ctx)])
    if stopped is not None:  # the user stopped this run, or the sweep it is a job of: 128 + N
        stopping.stop_sweep(ctx.parent, stopped, sweep=ctx.multirun)
    if outcome.status in ("FAILED", "KILLED") and not ctx.multirun:
        sys.exit(1)
    return outcome.value  # a failed sweep job returns None: the sweep goes on, its end exits 1 (callbacks.py)


def fast_exit_is_safe() -> bool:
    """Only a plain process may skip the interpreter's teardown: no profiler or coverage (they write at exit), no
    other non-daemon thread, no child process (joblib's workers are shut down by that teardown)."""
    import multiprocessing
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return False
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not others and not multiprocessing.active_children()


def tracks_in_this_process(args: list[str]) -> bool:
    """Whether jobs of this command will likely log from this process: not for --help/--cfg/-sc, not with
    tracking.enabled=false, not with a launcher that runs jobs in other processes."""
    info = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion", "-sc", "--version"}
    return not (info & set(args) or "tracking.enabled=false" in args
                or any(a.startswith("hydra/launcher=") and a.split("=", 1)[1] not in ("fused", "basic") for a in args))


def main() -> None:
    """`python -m fmnist_exp` and the console script `fmnist-exp`."""
    code: int | str | None = 0
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, caught below, until a job's own
    if tracks_in_this_process(sys.argv[1:]):
        tracking.TRACKING_PROCESS.start()  # its imports (MLflow, TensorBoard) overlap ours (torch, the data)
    try:
        task()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # Ctrl-C before a sweep or a job set its own handlers (imports, Hydra composing)
        print(STOPPED_STARTING, file=sys.stderr)
        code = 130
    if not fast_exit_is_safe():
        sys.exit(code)
    # Everything is written by now (runs ended, TensorBoard closed, MLflow flushed). Run the atexit handlers, then
    # skip the interpreter's teardown: with the CUDA build of torch it takes ~0.5 s and touches ~150 MB more memory
    # than the run itself ever used (benchmarks/RESULTS.md).
    atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


if __name__ == "__main__":
    main()
