"""Hydra callback for sweeps: one MLflow parent run made before any job starts, the sweep table at the end."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fmnist_exp import job, tracking

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes or hosts find their parent


def read_parent(sweep_dir: Path) -> dict[str, str] | None:
    """The parent run a sweep's jobs log under: {'uri', 'experiment_id', 'run_id'}, or None if not tracked."""
    path = sweep_dir / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class SweepCallback(Callback):
    """Creates the sweep's parent run (no set_experiment races in parallel jobs) and closes it at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        tracking.silence_noisy_loggers()
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri = tracking.resolve_uri(config.tracking.uri)
        exp_id, run_id = tracking.create_run(uri, config.tracking.experiment, name=str(sweep_dir),
                                             tags={"fmnist.sweep_dir": str(sweep_dir.resolve())})
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"uri": uri, "experiment_id": exp_id, "run_id": run_id}))
        log.info("MLflow parent run %s in experiment '%s' (%s)", run_id, config.tracking.experiment, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep table and winner (tracked sweeps), then exit 1 if any job did not finish, tracked or not."""
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = read_parent(sweep_dir)
        if parent:
            failures, total = self._report(parent, sweep_dir)
        else:  # untracked: each job's outcome.json is all there is
            outcomes = job.read_outcomes(sweep_dir)
            failures = [f"{name}: {o.error or o.status}" for name, o in outcomes
                        if o.status not in ("FINISHED", "SKIPPED")]
            total = len(outcomes)
        if failures:
            print(f"{len(failures)} of {total} jobs failed: {'; '.join(failures)}", file=sys.stderr, flush=True)
            sys.exit(1)

    def _report(self, parent: dict, sweep_dir: Path) -> tuple[list[str], int]:
        """Print, write and log the sweep table, its plots and the winner's model; end the parent run."""
        from fmnist_exp import report  # pandas: only the sweep's end needs it, not every job
        uri, parent_id = parent["uri"], parent["run_id"]
        table = report.sweep_table(uri, parent["experiment_id"], parent_id)
        print("\n" + report.format_table(table) + "\n" + report.ranked_by_line(table), flush=True)
        c = tracking.client(uri)
        for path in report.write_table(table, sweep_dir):
            c.log_artifact(parent_id, str(path))
        finished = table[table["status"] == "FINISHED"]
        try:
            log_sweep_plots(uri, parent_id, finished, sweep_dir)
            if len(finished) and table.loc[0, "best"] == "★":  # ranked on validation data (report.py)
                log_winner(uri, parent_id, table.loc[0, "run_id"], table.attrs["ranked_by"][0])
        except Exception as e:  # the jobs' results are safe in the store; a plotting failure must not hide them
            log.error("could not log the sweep's plots or winning model: %s", e)
        failed = table[table["status"] != "FINISHED"]
        tracking.end_run(uri, parent_id, "FAILED" if len(failed) else "FINISHED")
        return [f"{r.name}: {r.error or r.status}" for r in failed.itertuples()], len(table)


def log_sweep_plots(uri: str, parent_id: str, finished, sweep_dir: Path) -> None:
    """valid_acc curves of every job overlaid, and test accuracy per job, on the parent run."""
    from fmnist_exp import plots
    c = tracking.client(uri)
    curves = {r.name: [(m.step, m.value) for m in sorted(c.get_metric_history(r.run_id, "valid_acc"),
                                                          key=lambda m: m.step)]
              for r in finished.itertuples()}
    for fig, name in ((plots.sweep_curves(curves), "sweep_valid_acc.png"),
                      (plots.sweep_bars(list(finished["name"]), list(finished["test_acc"])), "sweep_test_acc.png")):
        plots.save(fig, sweep_dir / name)
        c.log_artifact(parent_id, str(sweep_dir / name), "plots")


def log_winner(uri: str, parent_id: str, run_id: str, ranked_by: str) -> None:
    """The best job's model (best on validation data), as an MLflow model on the parent run (once per sweep:
    it is slow)."""
    from omegaconf import OmegaConf

    from fmnist_exp import data, models
    run = tracking.client(uri).get_run(run_id)
    job_dir = Path(run.data.tags["fmnist.job_dir"])
    job_cfg = OmegaConf.load(job_dir / "config.yaml")
    arrays, _, _ = data.load_arrays(Path(job_cfg.data.root), Path(job_cfg.data.system_dir), False, job_cfg.data.cache)
    example = data.example_input(arrays["test_images"])
    tracking.log_model(uri, parent_id, models.load_best(job_cfg.model, job_dir), example)
    c = tracking.client(uri)
    c.set_tag(parent_id, "fmnist.winner", f"{run.data.tags.get('fmnist.overrides')} ({run_id})")
    c.set_tag(parent_id, "fmnist.winner_run_id", run_id)
    c.set_tag(parent_id, "fmnist.winner_ranked_by", ranked_by)
