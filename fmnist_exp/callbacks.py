"""Hydra callback: every run or sweep claims its own output dir; a sweep gets one MLflow parent run made before any
job starts, and its table at the end."""
from __future__ import annotations

import atexit
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from fmnist_exp import job, stopping, store

log = logging.getLogger(__name__)

WINNER_METRICS = {"ckpt_valid_loss": "winner_valid_loss", "ckpt_valid_acc": "winner_valid_acc",
                  "test_loss": "winner_test_loss", "test_acc": "winner_test_acc"}  # sweep table column -> parent metric
LOCK_FILE = ".fmnist_exp.lock"  # in a run or sweep dir: held while its run or sweep runs
# a sweep (a run) used this dir
MARKS = {"sweep": (store.PARENT_FILE, "multirun.yaml"), "run": (".hydra", "config.yaml")}


def claim_dir(config: DictConfig, mode: str):
    """Make the output dir of this sweep (mode 'sweep': hydra.sweep.dir) or single run ('run': hydra.run.dir) its
    own, and hold it (the returned lock) while it runs.

    Two sweeps or runs started in the same second get the same default dir (multirun/<date>/<time>,
    outputs/<date>/<time>), and one rerun with the same explicit dir finds the last one's files: sharing a dir, their
    checkpoints, TensorBoard files, outcomes and tables mix. So a dir that another running sweep or run holds, or
    that one used before, gives way to <dir>_2 (or the next free one), and one line says so. A SLURM job's requeued
    attempt keeps its first attempt's dir (a requeued run continues from its last.pt there). A sweep's jobs follow
    through a hydra.sweep.dir override (each job's config is composed anew from the overrides); a run's job reads
    hydra.run.dir from this very config. A crashed process's lock goes with it."""
    from filelock import FileLock, Timeout
    wanted = Path(config.hydra[mode].dir)
    if wanted.resolve() == Path.cwd().resolve():  # hydra.run.dir=. : output where the command runs, as asked
        return None
    for n in range(1, 1000):
        path = wanted if n == 1 else wanted.with_name(f"{wanted.name}_{n}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # Hydra would fail on the same mkdir with a traceback
            log.error("cannot create the %s dir %s (%s): pass hydra.%s.dir=<a folder you can write to>", mode, path,
                      e.strerror or e, mode)
            sys.exit(1)
        try:
            lock = FileLock(path / LOCK_FILE, timeout=0)
            lock.acquire()
        except Timeout:
            continue  # another running sweep or run holds it
        except (OSError, NotImplementedError):  # cannot lock here (unwritable, no flock): it goes on as asked
            return None
        if not (n == 1 and job.requeued()) and any((path / mark).exists() for mark in MARKS[mode]):
            lock.release()
            continue
        if path != wanted:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra[mode].dir = str(path)
                if mode == "sweep":
                    quoted = "'" + str(path).replace("'", "\\'") + "'"
                    config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted}")
            log.info("%s dir: %s is another %s's, so this one writes to %s", mode.capitalize(), wanted, mode, path)
        return lock
    return None


class SweepCallback(Callback):
    """Claims the sweep dir and creates the sweep's parent run (no set_experiment races in parallel jobs) before
    any job starts; prints the table and closes the parent at the end. A single run: claims its dir."""

    def __init__(self) -> None:
        self.lock = None
        self.signals: stopping.SweepSignals | None = None

    def __getstate__(self) -> dict:  # the dir's lock and the signal handlers stay with the sweep's process
        return {**self.__dict__, "lock": None, "signals": None}  # (joblib pickles us)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.lock = claim_dir(config, "run")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.lock = claim_dir(config, "sweep")
        sweep_dir = Path(config.hydra.sweep.dir)
        self.signals = stopping.SweepSignals(sweep_dir, lambda: bool(job.read_outcomes(sweep_dir))).install()
        if not config.tracking.enabled:
            return
        store.silence_noisy_loggers()
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri = run_id = None
        try:
            uri = store.resolve_uri(config.tracking.uri)
            exp_id, run_id = store.create_run(uri, config.tracking.experiment, name=str(sweep_dir),
                                              tags={"fmnist.sweep_dir": str(sweep_dir.resolve())})
            store.log_params(uri, run_id, sweep_params(config))
            store.add_sweeps_view(uri, exp_id)
            parent = {"uri": uri, "experiment_id": exp_id, "run_id": run_id}
            (sweep_dir / store.PARENT_FILE).write_text(json.dumps(parent))
        except Exception as e:  # Hydra would only warn about a callback's error and run every job into the same
            log.error("%s", e if isinstance(e, store.TrackingError) else store.store_error(uri, e))  # error
            if run_id is not None:
                end_if_running(uri, run_id, exp_id, sweep_dir)  # no job has run: the parent is deleted
            self._release()
            sys.exit(1)
        log.info("MLflow parent run %s in experiment '%s' (%s)", run_id, config.tracking.experiment, uri)
        atexit.register(end_if_running, uri, run_id, exp_id, sweep_dir)  # a sweeper or launcher that raises
        # never calls on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep table and winner (tracked sweeps), then exit 1 if any job did not finish, tracked or not."""
        if self.signals is not None:
            self.signals.defer()  # a signal now waits for the table and the parent run's end (a few seconds)
        try:
            self._end(Path(config.hydra.sweep.dir))
        finally:
            self._release()
            # a signal while the table was recorded, or one the launcher got once every job had trained (its mark)
            signum = ((self.signals.uninstall() if self.signals is not None else None)
                      or stopping.sweep_stopped(Path(config.hydra.sweep.dir)))
            if signum is not None:
                log.error("Stopped by %s at the sweep's end, once its table and runs were recorded",
                          signal.Signals(signum).name)
                sys.exit(128 + signum)

    def _end(self, sweep_dir: Path) -> None:
        parent = store.read_parent(sweep_dir)
        outcomes = job.read_outcomes(sweep_dir)
        unfinished = [(name, o) for name, o in outcomes if o.status not in ("FINISHED", "SKIPPED")]
        failures, recorded = None, True
        if parent:
            try:
                with_runs = end_orphans(parent, dict(outcomes))
                failures, total = self._report(parent, sweep_dir)
                # jobs with a run are counted by it, in the table; the others (cancelled before they ran) by outcome
                lost = [f"{name}: {o.error or o.status}" for name, o in unfinished
                        if o.run_id is None and name not in with_runs]
                failures, total = failures + lost, total + len(lost)
            except Exception as e:  # Hydra would turn it into a warning and the sweep would exit 0
                log.error("The sweep's table and winner were not recorded: the MLflow store %s failed (%s). Each "
                          "job's run and outcome.json are kept; python -m fmnist_exp.report %s prints the table once "
                          "the store answers", parent["uri"], store.first_line(e), sweep_dir)
                failures, recorded = None, False
        if failures is None:  # untracked, or the store failed: each job's outcome.json is all there is
            failures, total = [f"{name}: {o.error or o.status}" for name, o in unfinished], len(outcomes)
        if failures:
            print(f"{len(failures)} of {total} jobs failed: {'; '.join(failures)}", file=sys.stderr, flush=True)
        if failures or not recorded:
            sys.exit(1)

    def _report(self, parent: dict, sweep_dir: Path) -> tuple[list[str], int]:
        """Print, write and log the sweep table, its plots and the winner's model; end the parent run."""
        from fmnist_exp import report  # pandas: only the sweep's end needs it, not every job
        uri, parent_id = parent["uri"], parent["run_id"]
        table = report.sweep_table(uri, parent["experiment_id"], parent_id)
        print("\n" + report.format_table(table) + "\n" + report.ranked_by_line(table), flush=True)
        for path in report.write_table(table, sweep_dir):
            store.log_artifact(uri, parent_id, path)
        finished = table[table["status"] == "FINISHED"]
        try:
            log_summary(uri, parent_id, table, store.child_runs(uri, parent["experiment_id"], parent_id))
            log_sweep_plots(uri, parent_id, finished, sweep_dir)
            if len(finished) and table.loc[0, "best"] == "★":  # ranked on validation data (report.py)
                log_winner(uri, parent_id, table.loc[0, "run_id"], table.attrs["ranked_by"][0])
        except Exception as e:  # the jobs' results are safe in the store; a plotting failure must not hide them
            log.error("could not log the sweep's summary, plots or winning model: %s", e)
        failed = table[table["status"] != "FINISHED"]
        error = None
        if len(failed):  # the UI shows the parent FAILED: say why there, as a failed job's run does
            error = (f"{len(failed)} of {len(table)} jobs did not finish (see sweep_table.md): "
                     + "; ".join(f"{r.name}: {r.status}" for r in failed.itertuples())[:4000])
        store.end_run(uri, parent_id, "FAILED" if len(failed) else "FINISHED", error)
        where = "" if uri.startswith("http") else " (after make ui)"
        print(f"All sweeps side by side: {store.sweeps_view_url(uri, parent['experiment_id'])}{where}", flush=True)
        return [f"{r.name}: {r.error or r.status}" for r in failed.itertuples()], len(table)


ORPHANED = ("its process ended without recording the job (killed together with its tracking process: a lost node, "
            "out of memory, kill -9); rerun the sweep with sweep.skip_finished=true")


def end_orphans(parent: dict, outcomes: dict[str, job.Outcome]) -> set[str]:
    """At a sweep's end no job runs any more: a child run still RUNNING lost its training process and its tracking
    process at once (a cluster node lost, a job's processes killed whole). End it KILLED with the reason its job
    dir's outcome gives (a launcher records lost jobs there), else ORPHANED, so no run stays RUNNING. Returns the job
    dir names that have a run (their jobs are counted by their runs, once)."""
    uri = parent["uri"]
    runs = store.child_runs(uri, parent["experiment_id"], parent["run_id"])
    for run in runs:
        if run.info.status == "RUNNING":
            outcome = outcomes.get(Path(run.data.tags.get("fmnist.job_dir", "")).name)
            reason = outcome.error if outcome is not None and outcome.error else ORPHANED
            log.error("%s: %s", run.info.run_name, reason)
            store.end_killed(uri, run.info.run_id, reason)
    return {Path(r.data.tags["fmnist.job_dir"]).name for r in runs if "fmnist.job_dir" in r.data.tags}


def end_if_running(uri: str, run_id: str, experiment_id: str, sweep_dir: Path) -> None:
    """At exit: a parent run still RUNNING means the sweep ended without its table. If no job got as far as a run or
    an outcome (a typo in a swept value, which Hydra finds when it composes the jobs: `optimizer=sgd,adamm`), the
    sweep recorded nothing: its parent is deleted, as a typo in a single run leaves no run. Otherwise (its launcher
    raised, e.g. its cluster jobs were cancelled) it ends KILLED with that reason, never RUNNING."""
    try:
        if store.get_run(uri, run_id).info.status != "RUNNING":
            return
        if not job.read_outcomes(sweep_dir) and not store.child_runs(uri, experiment_id, run_id):
            store.discard_run(uri, run_id)
            (sweep_dir / store.PARENT_FILE).unlink(missing_ok=True)
            return
        store.end_killed(uri, run_id, "the sweep ended before all its jobs reported (a launcher error, or its jobs "
                                      "were cancelled); rerun it with sweep.skip_finished=true")
    except Exception as e:  # exiting anyway: say why the run may still show RUNNING
        log.error("could not end the sweep's parent run %s: %s", run_id, e)


def command_line() -> str:
    """The command as typed: `python -m fmnist_exp ...` or `fmnist-exp ...`."""
    prog = Path(sys.argv[0])
    prog_name = "python -m fmnist_exp" if prog.name == "__main__.py" else prog.name
    return " ".join([prog_name, *map(shlex.quote, sys.argv[1:])])


def sweep_params(config: DictConfig) -> dict[str, str]:
    """What the sweep was, as the parent's params: each swept key with its values as written
    (`sweep.optimizer` = `sgd,adam`), from the sweeper's params (e.g. +experiment=notebook) and the command line
    (which wins, as in Hydra's sweeper), and the command line itself (`sweep.command`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = {f"sweep.{k}": str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if o.is_sweep_override():
            params[f"sweep.{o.key_or_group}"] = o.input_line.split("=", 1)[1]  # as typed: sgd,adam or range(1,4)
        else:
            params.pop(f"sweep.{o.key_or_group}", None)  # optimizer=sgd +experiment=notebook: SGD only
    params["sweep.command"] = command_line()
    return params


def log_summary(uri: str, parent_id: str, table, runs: list) -> None:
    """The sweep's results on its parent run, so the runs list can sort and filter whole sweeps: the config
    values every job shares (params), how many jobs ran and failed, the winner's scores (metrics; the winner is
    chosen on validation data, report.py) and the data set the jobs trained on (input). `runs`: the table's runs
    (store.child_runs)."""
    import pandas as pd
    params = [r.data.params for r in runs if r.data.params]
    shared = {k: v for k, v in params[0].items() if all(p.get(k) == v for p in params[1:])} if params else {}
    shared = {k: v for k, v in shared.items() if not k.startswith("sweep.")}  # the config's sweep.skip_finished
    # would pass for a swept key among the parent's sweep.<key> params
    store.log_params(uri, parent_id, shared)
    metrics = {"jobs": len(table), "jobs_failed": int((table["status"] != "FINISHED").sum())}
    if len(table) and table.loc[0, "best"] == "★":
        winner = table.loc[0]
        metrics.update({name: float(winner[col]) for col, name in WINNER_METRICS.items() if pd.notna(winner[col])})
    store.log_metrics(uri, parent_id, metrics)
    store.log_dataset_of(uri, parent_id, runs)


def log_sweep_plots(uri: str, parent_id: str, finished, sweep_dir: Path) -> None:
    """valid_acc curves of every job overlaid, and test accuracy per job, on the parent run."""
    from fmnist_exp import plots
    curves = {r.name: store.metric_history(uri, r.run_id, "valid_acc") for r in finished.itertuples()}
    for fig, name in ((plots.sweep_curves(curves), "sweep_valid_acc.png"),
                      (plots.sweep_bars(list(finished["name"]), list(finished["test_acc"])), "sweep_test_acc.png")):
        plots.save(fig, sweep_dir / name)
        store.log_artifact(uri, parent_id, sweep_dir / name, "plots")


def log_winner(uri: str, parent_id: str, run_id: str, ranked_by: str) -> None:
    """The best job's model (best on validation data), as an MLflow model on the parent run (once per sweep:
    it is slow)."""
    import torch
    from omegaconf import OmegaConf

    from fmnist_exp import data, models
    run = store.get_run(uri, run_id)
    job_dir = Path(run.data.tags["fmnist.job_dir"])
    job_cfg = OmegaConf.load(job_dir / "config.yaml")
    arrays, _, _ = data.load_arrays(Path(job_cfg.data.root), Path(job_cfg.data.system_dir), False, job_cfg.data.cache)
    example = data.example_input(arrays["test_images"])
    graph, output = models.export_best(job_cfg.model, job_dir, example)
    store.log_model(uri, parent_id, graph, example, output, str(torch.__version__))
    store.set_tags(uri, parent_id, {"fmnist.winner": f"{run.data.tags.get('fmnist.overrides')} ({run_id})",
                                    "fmnist.winner_run_id": run_id, "fmnist.winner_ranked_by": ranked_by})
