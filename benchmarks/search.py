"""Benchmark of the search sweeper (issue 29's targets), side by side in one run, tracking on, the real data.

    .venv/bin/python benchmarks/search.py [--trials 64] [--epochs 17] [--batch 16 100] [--repeat 1]

For each batch size, in a fresh working dir (its own mlruns/):
  search  `+experiment=search_mlp` (TPE, seed 0, n_jobs trials at a time, fused launcher): what a user runs;
  basic   the same trials (their params enqueued in a new study) one at a time through hydra/launcher=basic:
          what a Hydra user gets today;
  grid    the same trials as one batch through the fused launcher (every config known up front, no sampling:
          a fused grid of those configs).
--pruning adds the same search with successive halving (the default pruner; the three sides above run with
hydra/sweeper/pruner=none: issue 29's targets are without pruning): pruned trials leave their groups and new ones
join (issue 30), and the groups' occupancy is printed; --pruned-only runs that side alone (issue 30's 256-trial
search). Then the notebook grid (`+experiment=notebook`, same epochs) for the best-checkpoint valid loss to beat,
and --plot PNG draws each search's best-so-far valid loss against wall time beside the notebook grid's.
With --repeat N the three sides alternate N times and each keeps its best wall (the machine is noisy).
Targets: search <= 0.5 x basic at batch 16, <= 0.8 x at batch 100; search <= 1.05 x grid; the search's best valid
loss below every notebook-grid job's. Prints a markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
OWN_LINE = re.compile(r"Search: ([\d.]+) s, of which ([\d.]+) s the launcher's")
OCCUPANCY = re.compile(r"Group occupancy: ([\d.]+) of (\d+) places per epoch while trials were left to join "
                       r"\((\d+) epochs\)")


def occupancy(out: str) -> float:
    """Members per group-epoch / places, over every group's epochs while trials were left to join."""
    groups = [(float(m), int(n), int(e)) for m, n, e in OCCUPANCY.findall(out) if int(e)]
    return sum(m * e for m, _, e in groups) / sum(n * e for _, n, e in groups) if groups else float("nan")


def best_so_far_curve(cwd: Path, study_name: str) -> list[tuple[float, float]]:
    """(seconds since the study's first trial started, best value so far) at each trial's end."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.load_study(study_name=study_name, storage=f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}")
    trials = [t for t in s.get_trials() if t.datetime_complete is not None and t.datetime_start is not None]
    t0 = min(t.datetime_start for t in trials)
    points, best = [], float("inf")
    for t in sorted(trials, key=lambda t: t.datetime_complete):
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        if t.state.name == "COMPLETE" and value is not None:
            best = min(best, value)
        points.append(((t.datetime_complete - t0).total_seconds(), best))
    return points


def grid_curve(cwd: Path) -> list[tuple[float, float]]:
    """The notebook grid's best ckpt_valid_loss so far at each job's end (seconds since the first job started)."""
    con = sqlite3.connect(cwd / "mlruns" / "mlflow.db")
    try:
        rows = con.execute("select r.start_time, r.end_time, m.value from runs r join latest_metrics m on "
                           "m.run_uuid = r.run_uuid join tags t on t.run_uuid = r.run_uuid where m.key = "
                           "'ckpt_valid_loss' and t.key = 'mlflow.parentRunId' and r.status = 'FINISHED'").fetchall()
    finally:
        con.close()
    t0 = min(start for start, _, _ in rows)
    points, best = [], float("inf")
    for _, end, value in sorted(rows, key=lambda r: r[1]):
        best = min(best, value)
        points.append(((end - t0) / 1000, best))
    return points


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        xs, ys = zip(*[(x, y) for x, y in points if y != float("inf")])
        ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel("seconds since the first trial (job) started")
    ax.set_ylabel("best ckpt_valid_loss so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-m", "fmnist_exp", *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(args)}\n{out[-3000:]}")
    return wall, out


def enqueue_copy(cwd: Path, source: str, name: str) -> int:
    """A new study `name` with the source study's trials' params enqueued (same configs, asked in order)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}"
    src = optuna.load_study(study_name=source, storage=storage)
    dst = optuna.create_study(study_name=name, storage=storage, direction=src.direction.name.lower())
    trials = [t for t in src.get_trials() if t.state.is_finished()]
    for t in trials:
        dst.enqueue_trial(t.params)
    return len(trials)


def best_valid_losses(cwd: Path, parent_name_like: str | None = None) -> list[float]:
    """ckpt_valid_loss of every FINISHED child run in cwd's store."""
    con = sqlite3.connect(cwd / "mlruns" / "mlflow.db")
    try:
        return [v for (v,) in con.execute(
            "select m.value from latest_metrics m join runs r on r.run_uuid = m.run_uuid "
            "where m.key = 'ckpt_valid_loss' and r.status = 'FINISHED'")]
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=17)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 100])
    ap.add_argument("--n-jobs", type=int, default=16, help="trials asked at once (hydra.sweeper.n_jobs)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-notebook", action="store_true")
    ap.add_argument("--pruning", action="store_true", help="also the search with successive halving")
    ap.add_argument("--pruned-only", action="store_true", help="only the search with successive halving")
    ap.add_argument("--plot", type=Path, help="PNG: best-so-far valid loss against wall time")
    ap.add_argument("--no-grid", action="store_true", help="without the side of the same trials as one batch")
    a = ap.parse_args()
    a.pruning = a.pruning or a.pruned_only
    curves = {}
    rows = []
    for batch in a.batch:
        common = ["+experiment=search_mlp", f"hydra.sweeper.n_trials={a.trials}", f"train.epochs={a.epochs}",
                  f"data.batch_size={batch}", "hydra.sweeper.sampler.seed=0", "train.progress=off",
                  "hydra/sweeper/pruner=none"]
        best = {"search": None, "basic": None, "grid": None}
        own = None
        search_best = None
        for rep in range(0 if a.pruned_only else a.repeat):
            cwd = Path(tempfile.mkdtemp(prefix=f"search-bench-{batch}-"))
            wall, out = run([*common, f"hydra.sweeper.n_jobs={a.n_jobs}", "hydra.sweeper.study_name=search"], cwd)
            m = OWN_LINE.search(out)
            own_s = float(m.group(1)) - float(m.group(2)) if m else float("nan")
            if best["search"] is None or wall < best["search"]:
                best["search"], own = wall, own_s
            search_best = min(best_valid_losses(cwd))
            n = enqueue_copy(cwd, "search", "basic")
            wall, _ = run([*common, "hydra/launcher=basic", "hydra.sweeper.n_jobs=1", "hydra.sweeper.study_name=basic"],
                          cwd)
            best["basic"] = wall if best["basic"] is None else min(best["basic"], wall)
            if not a.no_grid:
                enqueue_copy(cwd, "search", "grid")
                wall, _ = run([*common, f"hydra.sweeper.n_jobs={n}", "hydra.sweeper.study_name=grid"], cwd)
                best["grid"] = wall if best["grid"] is None else min(best["grid"], wall)
            print(f"batch {batch} rep {rep + 1}: search {best['search']:.0f} s, basic {best['basic']:.0f} s, "
                  f"grid {best['grid'] or float('nan'):.0f} s (best so far); search's own {own:.1f} s", flush=True)
        pruned = None
        if a.pruning:
            cwd = Path(tempfile.mkdtemp(prefix=f"search-bench-sh-{batch}-"))
            wall, out = run([*common[:-1], f"hydra.sweeper.n_jobs={a.n_jobs}", "hydra.sweeper.study_name=sh"], cwd)
            pruned = (wall, min(best_valid_losses(cwd)), occupancy(out))
            curves[f"search, successive halving (batch {batch}): {wall:.0f} s"] = best_so_far_curve(cwd, "sh")
            print(f"batch {batch}: search with successive halving {wall:.0f} s, best {pruned[1]:.4f}, occupancy "
                  f"{pruned[2]:.0%} of the groups' places while trials were left to join", flush=True)
        rows.append((batch, best, own, search_best, pruned))
    notebook = None
    if not a.no_notebook:
        cwd = Path(tempfile.mkdtemp(prefix="search-bench-notebook-"))
        wall, _ = run(["+experiment=notebook", f"train.epochs={a.epochs}", "train.progress=off"], cwd)
        losses = best_valid_losses(cwd)
        notebook = (wall, min(losses), len(losses), max(losses))
        curves[f"notebook grid, 16 jobs (batches 16 and 100): {wall:.0f} s"] = grid_curve(cwd)
    print(f"\n{a.trials} trials x {a.epochs} epochs, +experiment=search_mlp (TPE seed 0, {a.n_jobs} at a time), "
          f"tracking on, best of {a.repeat}\n")
    print("| batch | search (fused) | same trials, basic launcher | search / basic | same trials as one fused batch "
          "| search / grid | search's own time | search's best ckpt_valid_loss |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, best, own, search_best, _ in rows:
        if best["search"] is None:
            continue
        print(f"| {batch} | {best['search']:.0f} s | {best['basic']:.0f} s | {best['search'] / best['basic']:.2f} | "
              f"{best['grid'] or float('nan'):.0f} s | {best['search'] / (best['grid'] or float('nan')):.2f} | {own:.1f} s "
              f"({own / best['search']:.1%}) | {search_best:.4f} |")
    for batch, best, _, search_best, pruned in rows:
        if pruned and best["search"] is not None:
            print(f"\nBatch {batch} with successive halving: {pruned[0]:.0f} s ({pruned[0] / best['basic']:.2f} x "
                  f"basic, {pruned[0] / best['search']:.2f} x unpruned search), best ckpt_valid_loss {pruned[1]:.4f} "
                  f"(unpruned {search_best:.4f}), occupancy {pruned[2]:.0%}")
        elif pruned:
            print(f"\nBatch {batch} with successive halving: {pruned[0]:.0f} s, best ckpt_valid_loss "
                  f"{pruned[1]:.4f}, occupancy {pruned[2]:.0%}")
    if notebook:
        print(f"\nNotebook grid (+experiment=notebook, {a.epochs} epochs): {notebook[0]:.0f} s, best "
              f"ckpt_valid_loss {notebook[1]:.4f} of {notebook[2]} jobs (worst {notebook[3]:.4f})")
    if a.plot and curves:
        plot(curves, a.plot)


if __name__ == "__main__":
    main()
