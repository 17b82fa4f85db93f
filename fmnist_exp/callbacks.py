"""Hydra callback for sweeps: one MLflow parent run made before any job starts, the sweep table at the end."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fmnist_exp import report, tracking

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
        parent = read_parent(Path(config.hydra.sweep.dir))
        if parent is None:
            return
        table = report.sweep_table(parent["uri"], parent["experiment_id"], parent["run_id"])
        print("\n" + report.format_table(table), flush=True)
        failed = table[table["status"] != "FINISHED"] if len(table) else table
        tracking.end_run(parent["uri"], parent["run_id"], "FAILED" if len(failed) else "FINISHED")
        if len(failed):
            reasons = "; ".join(f"{r.run}: {r.error}" for r in failed.itertuples())
            print(f"{len(failed)} of {len(table)} jobs failed: {reasons}", file=sys.stderr, flush=True)
            sys.exit(1)
