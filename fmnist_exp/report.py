"""Sweep review: which config won, by how much. Reads the MLflow store (the source of truth), not log files.

The winner is chosen on validation data: jobs are ranked by their best checkpoint's own value of the monitored
metric (train.monitor: ckpt_valid_loss, lowest first, or ckpt_valid_acc, highest first). Test scores are shown
beside it and never used to rank.

    python -m fmnist_exp.report [SWEEP] [--by KEY] [--tracking-uri URI] [--experiment NAME]

SWEEP is a sweep directory (multirun/<date>/<time>), an MLflow parent run id, a job's run id (its sweep), or
omitted (the newest sweep of the experiment).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from fmnist_exp import config, store

METRICS = ["epochs_run", "best_epoch", "ckpt_valid_loss", "ckpt_valid_acc", "test_loss", "test_acc", "train_time"]
RANK = {"valid_loss": ("ckpt_valid_loss", True), "valid_acc": ("ckpt_valid_acc", False)}  # metric, ascending


def ranking(monitors: set[str]) -> tuple[str, bool]:
    """(column, ascending) the jobs are ranked by: their common train.monitor's checkpoint score; a sweep that
    varies train.monitor is ranked by validation loss, which every job records."""
    return RANK[monitors.pop()] if len(monitors) == 1 and next(iter(monitors)) in RANK else RANK["valid_loss"]


# a config group's option recorded as a plain value (its column and place are those of a group's `_target_`)
OPTION_PARAMS = {"optimizer.kind": "optimizer._target_"}


def _readable(key: str, keys: list[str]) -> str:
    """'model._target_' and 'optimizer.kind' -> 'model', 'optimizer'; 'data.batch_size' -> 'batch_size' unless that
    name is taken twice."""
    key = OPTION_PARAMS.get(key, key)
    if key.endswith("._target_"):
        return key.removesuffix("._target_")
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _value(key: str, value: str) -> str:
    if key == "optimizer.kind":
        return config.optimizer_name(value)  # sgd -> SGD
    return value.rsplit(".", 1)[-1] if key.endswith("._target_") else value  # fmnist_exp.models.MLP -> MLP


def sweep_table(uri: str, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per job: the config keys that vary across the sweep, status, epochs, best/test scores, reason."""
    runs = store.child_runs(uri, experiment_id, parent_run_id)
    ignored = config.where_how_keys()  # never "what varies"
    params = [{k: v for k, v in r.data.params.items() if k not in ignored} for r in runs]
    keys = sorted({k for p in params for k in p}, key=lambda k: OPTION_PARAMS.get(k, k))
    varying = [k for k in keys if len({p[k] for p in params if k in p}) > 1]
    columns = {k: _readable(k, varying) for k in varying}
    rows = []
    for r, p in zip(runs, params):
        row = {"run_id": r.info.run_id}
        row.update({columns[k]: _value(k, p[k]) if k in p else None for k in varying})
        row["status"] = r.info.status
        row.update({m: r.data.metrics.get(m) for m in METRICS})
        row["error"] = r.data.tags.get("error", "")
        row["name"] = r.data.tags.get("fmnist.overrides", r.info.run_name)
        row["trial"] = int(r.data.tags["fmnist.trial"]) if "fmnist.trial" in r.data.tags else None
        pruned = r.data.tags.get("fmnist.pruned_at_epoch")
        row["pruned_at"] = int(pruned) if pruned else None
        rows.append(row)
    trial = ["trial"] if any(row["trial"] is not None for row in rows) else []  # a search's runs
    pruned = ["pruned_at"] if any(row["pruned_at"] is not None for row in rows) else []  # its pruner stopped some
    table = pd.DataFrame(rows, columns=["run_id", *trial, *columns.values(), "status", *pruned, *METRICS, "error",
                                        "name"])
    for col in trial + pruned:
        table[col] = table[col].astype("Int64")
    for col in ("epochs_run", "best_epoch"):
        table[col] = table[col].astype("Int64")
    by, ascending = ranking({r.data.params.get("train.monitor", "valid_loss") for r in runs})
    done = table["status"] == "FINISHED"
    table = pd.concat([table[done].sort_values(by, ascending=ascending, na_position="last", kind="stable"),
                       table[~done]]).reset_index(drop=True)
    table.insert(0, "best", ["★" if i == 0 and len(table) and table.loc[0, "status"] == "FINISHED"
                             and pd.notna(table.loc[0, by]) else "" for i in range(len(table))])
    table.attrs["ranked_by"] = (by, ascending)
    table.attrs["columns"] = columns  # config key -> column: --by takes either
    return table


def ranked_by_line(table: pd.DataFrame) -> str:
    by, ascending = table.attrs.get("ranked_by", RANK["valid_loss"])
    return (f"Ranked by {by} ({'lowest' if ascending else 'highest'} first: the best checkpoint's validation "
            "score, train.monitor); test scores are shown, not used to choose.")


def grouped(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean ± std of the scores per value of `by` (a key, or keys joined by commas: lr,weight_decay), over
    everything else that varies (seeds, ...); jobs that did not finish have no scores and are left out (counted in
    attrs["left_out"])."""
    table = table.copy()
    # what the sweep's command line chose, as each job's overrides say: a config group's option too
    # (regularization=batchnorm), which no single column of the table names
    chosen = [config.override_pairs(name) for name in table["name"]]
    for key in sorted({k for c in chosen for k in c}):
        known = key in table.columns or key in table.attrs.get("columns", {})  # train.seed: the seed column
        if not known and len({c.get(key) for c in chosen}) > 1:
            table[key] = [c.get(key) for c in chosen]
    options = [c for c in table.columns
               if c not in ("best", "run_id", "trial", "pruned_at", "status", "error", "name", *METRICS)]
    keys = [table.attrs.get("columns", {}).get(k, k) if k not in table.columns else k
            for k in by.split(",") if k]  # train.seed -> seed
    shown = ",".join(keys)
    bad = [k for k in keys if k not in options]
    if bad or not keys:
        raise SystemExit(f"error: --by {','.join(bad) or by}: not a key that varies in this sweep; choose one of "
                         f"{options} (or several, joined by commas)")
    rank, ascending = table.attrs.get("ranked_by", RANK["valid_loss"])
    done = table[table["status"] == "FINISHED"]
    if done.empty:
        raise SystemExit(f"error: --by {shown}: no job of this sweep FINISHED, so there are no scores to average; "
                         "run it without --by to see why each job stopped")
    out = []
    for value, g in done.groupby(keys, sort=False, dropna=False):
        row = {**dict(zip(keys, value)), "runs": len(g), "_rank": g[rank].mean()}
        for m in ("ckpt_valid_loss", "ckpt_valid_acc", "test_loss", "test_acc", "train_time"):  # the table's order
            d = 1 if m == "train_time" else 4  # and digits; a spread needs two runs: one is its own mean
            row[m] = f"{g[m].mean():.{d}f} ± {g[m].std(ddof=1):.{d}f}" if len(g) > 1 else f"{g[m].mean():.{d}f}"
        out.append(row)
    result = pd.DataFrame(out).sort_values("_rank", ascending=ascending).drop(columns="_rank").reset_index(drop=True)
    result.attrs["ranked_by"] = (f"mean {rank}", ascending)
    result.attrs["left_out"] = len(table) - len(done)
    return result


def sweep_jobs(sweep_dir: Path) -> list[str] | None:
    """The name of every job the sweep's command made, in order: its multirun.yaml's overrides (the command line's,
    after a preset's sweep params such as +experiment=notebook's) expanded as Hydra's basic sweeper expands them
    for every launcher. None when the sweep dir does not say."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        given = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)
    except Exception:  # no multirun.yaml (a sweep dir moved or cleaned), or one written by another Hydra
        return None
    return [config.run_name(job) for batch in batches for job in batch]


def not_started_line(table: pd.DataFrame, sweep_dir: Path) -> str | None:
    """One line naming the jobs of the sweep that have no run (stopped before they started, or lost with their
    process before it made one), which no table row shows."""
    jobs, recorded = sweep_jobs(sweep_dir), set(table["name"])
    missing = [name for name in jobs or [] if name not in recorded]
    if not missing:
        return None
    shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"{len(missing)} of {len(jobs)} jobs have no run (stopped before they started, or lost): {shown}; "
            "rerun the sweep's command with sweep.skip_finished=true to run them")


def format_table(table: pd.DataFrame) -> str:
    """The table as a terminal grid (markdown pipes): reasons only when something failed, no run ids."""
    if table.empty:
        return "(no jobs recorded)"
    shown = table.drop(columns=["run_id", "name"], errors="ignore")
    if "error" in shown and not shown["error"].astype(bool).any():
        shown = shown.drop(columns="error")
    if list(shown.columns[:2]) == ["best", "status"]:  # nothing varies (one job): name it by its overrides
        shown.insert(1, "run", table["name"])
    shown = shown.astype(object)
    for col in shown.columns:  # config values stay as written (1e-05); scores 4 decimals, seconds 1; blanks if missing
        digits = 1 if col == "train_time" else 4
        shown[col] = ["" if pd.isna(v) else f"{v:.{digits}f}" if isinstance(v, float) and col in METRICS else str(v)
                      for v in shown[col]]
    align = ["right" if c in METRICS or c == "runs" else "left" for c in shown.columns]
    return shown.to_markdown(index=False, missingval="", disable_numparse=True, colalign=align)


def write_table(table: pd.DataFrame, folder: Path) -> list[Path]:
    """sweep_table.md and sweep_table.csv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    md, csv = folder / "sweep_table.md", folder / "sweep_table.csv"
    md.write_text(format_table(table) + "\n")
    table.to_csv(csv, index=False)
    return [md, csv]


def check_store(uri: str) -> None:
    """One line, before anything reads it, for a store the report cannot read, and never a new store made by
    reading (a mistyped path would leave an empty one behind): a plain path (MLflow's retired file store), a
    SQLite file that is not there. A server that does not answer fails on the first request (no retries)."""
    if "://" not in uri:
        hint = f"sqlite:///{Path(uri).resolve()}" if uri.endswith(".db") else "sqlite:///PATH/mlruns/mlflow.db"
        raise SystemExit(f"error: --tracking-uri {uri} is a path, not a store URI: pass {hint} (a SQLite store) "
                         "or http://HOST:PORT (an MLflow server)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"error: no MLflow store at {uri.removeprefix('sqlite:///')}: run the report from the folder "
                         "you ran the sweep in, give it the sweep's directory, or pass --tracking-uri")


def find_parent(uri: str, experiment: str, sweep: str | None, recorded: dict | None = None) -> tuple[str, str]:
    """(experiment id, parent run id) for a sweep dir (`recorded`: what it records, store.read_parent), a parent
    run id (a job's run id: its sweep), or the newest sweep."""
    if sweep:
        run = store.find_run(uri, recorded["run_id"] if recorded else sweep)  # a store that fails says so (main)
        if run is None:
            raise SystemExit(f"error: {sweep} records a sweep whose parent run {recorded['run_id']} is not in {uri}"
                             if recorded else f"error: {sweep} is neither a sweep directory (with mlflow_parent.json) "
                             f"nor a run id in {uri}")
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id:  # one job of a sweep: the sweep it belongs to
            print(f"{sweep} is one job ({run.info.run_name}) of a sweep: that sweep follows", file=sys.stderr)
            run = store.get_run(uri, parent_id)
        if "fmnist.sweep_dir" not in run.data.tags:
            raise SystemExit(f"error: {sweep} is a single run ({run.info.run_name}), not a sweep: see it in mlflow "
                             "ui; the report takes a sweep (its multirun/<date>/<time> dir or its parent run id)")
        return run.info.experiment_id, run.info.run_id
    newest = store.newest_sweep(uri, experiment)
    if newest is None:
        raise SystemExit(f"error: no sweep in experiment '{experiment}' of {uri}; run one with "
                         "python -m fmnist_exp -m ...")
    return newest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fmnist_exp.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", nargs="?",
                    help="sweep dir, parent run id, a job's run id (its sweep), or nothing for the newest sweep")
    ap.add_argument("--by", help="group by this column: mean ± std of the scores over the other keys")
    ap.add_argument("--tracking-uri", default=None, help="default: sqlite:///./mlruns/mlflow.db")
    ap.add_argument("--experiment", default="fmnist", help="where the newest sweep is looked for (tracking.experiment;"
                    " default: fmnist)")
    args = ap.parse_args(argv)
    store.silence_noisy_loggers()
    recorded = store.read_parent(Path(args.sweep)) if args.sweep else None
    uri = (args.tracking_uri or (recorded or {}).get("uri")  # a sweep dir knows its store, wherever it is run from
           or store.default_uri())
    check_store(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down: one line, not 4 minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        exp_id, parent_id = find_parent(uri, args.experiment, args.sweep, recorded)
        table = sweep_table(uri, exp_id, parent_id)
        sweep_dir = store.get_run(uri, parent_id).data.tags.get("fmnist.sweep_dir")
    except store.MlflowException as e:
        reason = ("nothing answers there" if "NewConnectionError" in str(e) or "Connection refused" in str(e)
                  else store.first_line(e, 200))
        raise SystemExit(f"error: cannot read the MLflow store {uri} ({reason}); start the server (make ui) or "
                         "pass --tracking-uri sqlite:///PATH/mlruns/mlflow.db")
    shown = grouped(table, args.by) if args.by else table
    print(format_table(shown))
    print(ranked_by_line(shown))
    if shown.attrs.get("left_out"):
        print(f"{shown.attrs['left_out']} of {len(table)} jobs did not finish and are left out of the means (run the "
              "report without --by to see why each stopped)")
    missing = not_started_line(table, Path(sweep_dir)) if sweep_dir else None
    if missing:
        print(missing)
    if sweep_dir and Path(sweep_dir).is_dir() and not args.by:
        write_table(table, Path(sweep_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
