"""Fused vs one-job-at-a-time sweeps, side by side: wall time of real `python -m fmnist_exp -m ...` commands.

    .venv/bin/python benchmarks/fused.py                        # design-card sweep + notebook grid + 64 jobs
    .venv/bin/python benchmarks/fused.py --only design --reps 3 --epochs 2
    .venv/bin/python benchmarks/fused.py --only notebook --reps 1 --launchers basic fused basic-1
    .venv/bin/python benchmarks/fused.py --device cuda          # on a GPU (benchmarks/gpu.sh: issue 10's GPU table)

Each sweep runs with each launcher, alternating (the machine is shared and noisy: each keeps its best), tracking
on, in a fresh directory: basic = hydra/launcher=basic (one job at a time), fused = hydra/launcher=fused as it
runs by default (groups at once in worker processes, one per core), fused-1 = the same with
hydra.launcher.n_jobs=1 (groups one after another in one process), basic-1 = basic with train.threads=1 (what
a fused worker process uses). Prints a markdown table (with the share of the fused sweep's wall time in which its
jobs were only ending: tests, plots, writes, nobody training), and a second one comparing each job's test accuracy
trained alone (basic, basic-1) and in its group (fused); --out appends them to a file. At the same thread count a
job gets the same numbers in a group as alone (tests/test_fused.py): basic-1's accuracies equal fused's, while
basic's differ by torch's own 1- vs 2-thread rounding.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEPS = {  # name -> (overrides, jobs, note)
    "design": (["optimizer=sgd,adam", "data.batch_size=16,100"], 4, "design card: SGD/Adam x batch 16/100"),
    "notebook": (["+experiment=notebook"], 16, "notebook grid: 16 jobs"),
    "64": (["optimizer.lr=0.0005,0.001,0.002,0.004", "optimizer.weight_decay=0,0.0001,0.001,0.01",
            "train.seed=0,1,2,3"], 64, "64 jobs: lr x weight decay x seed"),
}


LAUNCHERS = {"basic": ["hydra/launcher=basic"], "fused": ["hydra/launcher=fused"],
             "fused-1": ["hydra/launcher=fused", "hydra.launcher.n_jobs=1"],
             # alone on one torch thread, as fused's worker processes train: the like-for-like accuracy comparison
             "basic-1": ["hydra/launcher=basic", "train.threads=1"]}


def checkout_env(**extra: str) -> dict:
    """The environment for a `python -m fmnist_exp` that imports this checkout first, then what the caller had on
    PYTHONPATH (on a bare GPU machine: .gpu's wheels, benchmarks/gpu.sh)."""
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run(overrides: list[str], launcher: str, epochs: int | None, device: str,
        data_root: Path) -> tuple[float, dict, float]:
    """Wall seconds of one sweep command, which must succeed, its jobs' test accuracy {run name: test_acc}, and the
    seconds in which its jobs were only ending (ending_only)."""
    with tempfile.TemporaryDirectory() as cwd:
        args = [sys.executable, "-m", "fmnist_exp", "-m", *LAUNCHERS[launcher], *overrides,
                "train.progress=off", f"train.device={device}", f"data.root={data_root}"]
        if epochs:
            args.append(f"train.epochs={epochs}")
        env = checkout_env()
        start = time.perf_counter()
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{launcher} {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
        with next(Path(cwd).glob("multirun/*/*/sweep_table.csv")).open() as fh:
            accuracy = {row["name"]: float(row["test_acc"]) for row in csv.DictReader(fh)}
        return wall, accuracy, ending_only(f"sqlite:///{cwd}/mlruns/mlflow.db")


def ending_only(uri: str) -> float:
    """Seconds of the sweep during which jobs were only ending (testing, plotting, writing their runs) and none
    was training: the union of each job's [last epoch's metrics, run end] minus the union of each job's
    [run start, last epoch's metrics], from the MLflow store."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.mlflow.parentRunId != ''", max_results=10_000)
    training, ending = [], []
    for run in runs:
        last_epoch = max((m.timestamp for m in client.get_metric_history(run.info.run_id, "valid_loss")),
                         default=run.info.start_time)
        training.append((run.info.start_time, last_epoch))
        ending.append((last_epoch, run.info.end_time or last_epoch))
    return (covered(training + ending) - covered(training)) / 1000  # |E minus T| = |E or T| - |T|


def covered(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end] intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=list(SWEEPS), action="append", help="sweeps to time (default: all)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: each sweep's own)")
    ap.add_argument("--epochs-64", type=int, default=3, help="epochs of the 64-job sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--launchers", nargs="+", choices=list(LAUNCHERS), default=["basic", "fused"],
                    help="basic and fused always run; fused-1 adds groups-in-turn in one process, basic-1 the jobs "
                         "alone on one thread each (fused workers' thread count: their accuracy should equal fused's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    launchers = ["basic", "fused"] + [x for x in args.launchers if x not in ("basic", "fused")]
    extra = launchers[2:]
    data_root = Path(tempfile.mkdtemp(prefix="fmnist-bench-data-"))  # one decoded-array cache for every run
    rows = ["| sweep | jobs | epochs | basic (s) | fused (s) | fused / basic | basic s/job | fused s/job | fused: "
            "jobs only ending |" + "".join(f" {x} (s) | {x} / basic |" for x in extra),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(extra)]
    accuracy_rows = []
    for name in args.only or list(SWEEPS):
        overrides, jobs, note = SWEEPS[name]
        epochs = args.epochs_64 if name == "64" else args.epochs
        best = {x: float("inf") for x in launchers}
        accuracy, ends = {}, {}
        for rep in range(args.reps):
            for launcher in (launchers if rep % 2 == 0 else launchers[::-1]):
                wall, accuracy[launcher], ending = run(overrides, launcher, epochs, args.device, data_root)
                if wall < best[launcher]:
                    best[launcher], ends[launcher] = wall, ending / wall
                print(f"{note} | {launcher} | rep {rep + 1}: {wall:.1f} s, jobs only ending {ending:.1f} s "
                      f"({100 * ending / wall:.0f} %)", file=sys.stderr, flush=True)
        # the same jobs trained alone and in a group: their test accuracy, job by job
        for alone in [x for x in launchers if x.startswith("basic")]:
            diffs = {name: accuracy["fused"][name] - acc for name, acc in accuracy[alone].items()}
            for name, diff in sorted(diffs.items(), key=lambda item: -abs(item[1])):
                print(f"{note} | test_acc alone ({alone}) {accuracy[alone][name]:.4f} fused "
                      f"{accuracy['fused'][name]:.4f} ({diff:+.4f}) | {name}", file=sys.stderr)
            worst = max(diffs, key=lambda n: abs(diffs[n]))
            accuracy_rows.append(f"| {note} | {alone} | {len(diffs)} | {sum(accuracy[alone].values()) / len(diffs):.4f}"
                                 f" | {sum(accuracy['fused'].values()) / len(diffs):.4f} | {diffs[worst]:+.4f} "
                                 f"({worst}) |")
        b, f = best["basic"], best["fused"]
        rows.append(f"| {note} | {jobs} | {epochs or 'default'} | {b:.1f} | {f:.1f} | {f / b:.2f} | "
                    f"{b / jobs:.2f} | {f / jobs:.2f} | {100 * ends['fused']:.0f} % |" + "".join(f" {best[x]:.1f} | {best[x] / b:.2f} |"
                                                              for x in extra))
    table = "\n".join(rows + ["", "| sweep | alone | jobs | mean test_acc alone | mean test_acc fused | largest job "
                                    "difference (fused - alone) |", "|---|---|---:|---:|---:|---|", *accuracy_rows])
    emit(table, args.out)


def emit(table: str, out: Path | None) -> None:
    """Print a markdown table, and append it to `out` if given."""
    print(table)
    if out:
        with out.open("a") as fh:
            fh.write(f"\n{table}\n")


if __name__ == "__main__":
    main()
