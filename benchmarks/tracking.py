"""What tracking costs a run: the default run (Adam, batch 100, 17 epochs) with tracking on and off, alternating.

    .venv/bin/python benchmarks/tracking.py [--reps 3] [--out benchmarks/RESULTS.md]

Per setting, the best of --reps runs (the machine is shared and has slow phases: the best run is the one least
disturbed) of: wall time, epoch 1 and the median epoch as logged, and peak memory, as the largest single process
(what `/usr/bin/time` reports) and as the whole process tree at its largest moment (training process plus the
tracking process, sampled every 20 ms). Then the targets of issue 11, met or not:
tracking on <= 1.10 x off (wall), epoch 1 <= 1.5 x a steady epoch (tracking on), peak RSS <= 1 GB (tracking on).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused  # noqa: E402  (checkout_env: the environment of a run of this checkout)
PEAK_RSS = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, status, usage = os.wait4(p.pid, 0); "
            "print('PEAK_RSS_KB', usage.ru_maxrss, flush=True); sys.exit(os.waitstatus_to_exitcode(status))")


def tree_rss_kb(root: int) -> int:
    """Resident memory of `root` and all its descendants, now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run(tracking_on: bool, cwd: Path) -> dict:
    args = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "fmnist_exp", "train.progress=off",
            f"tracking.enabled={str(tracking_on).lower()}"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fused.checkout_env(PYTHONUNBUFFERED="1"))
    peak_tree = [0]

    def sample():
        while proc.poll() is None:
            peak_tree[0] = max(peak_tree[0], tree_rss_kb(proc.pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    epochs, largest, output = [], None, []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("PEAK_RSS_KB "):
            largest = int(line.split()[1]) / 1024
        if "| train loss" in line:
            epochs.append(float(line.rsplit("|", 1)[1].strip().removesuffix(" s")))
    wall = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit("".join(output[-20:]))
    sampler.join()
    return dict(wall=wall, epoch1=epochs[0], epoch=statistics.median(epochs[1:]), largest_mb=largest,
                tree_mb=peak_tree[0] / 1024, acc=next(l for l in output if "Test (best" in l).rsplit()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the results to this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        run(False, cwd)  # warm the data cache and the page cache
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(args.reps):
            for on in (True, False):
                r = run(on, cwd)
                runs[on].append(r)
                print(f"rep {rep + 1}, tracking {'on ' if on else 'off'}: wall {r['wall']:.2f} s, epoch 1 "
                      f"{r['epoch1']:.2f} s, epoch {r['epoch']:.3f} s, largest process {r['largest_mb']:.0f} MB, "
                      f"process tree {r['tree_mb']:.0f} MB, test acc {r['acc']}", flush=True)
    best = {on: min(rs, key=lambda r: r["wall"]) for on, rs in runs.items()}
    on, off = best[True], best[False]
    peak_on = max(r["largest_mb"] for r in runs[True])
    checks = [(f"wall, tracking on / off <= 1.10", on["wall"] / off["wall"], on["wall"] / off["wall"] <= 1.10),
              ("epoch 1 / steady epoch (on) <= 1.5", on["epoch1"] / on["epoch"], on["epoch1"] / on["epoch"] <= 1.5),
              ("peak RSS, largest process (on) <= 1024 MB", peak_on, peak_on <= 1024)]
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — tracking cost ({platform.node()}, {os.cpu_count()} cores), "
             f"`benchmarks/tracking.py --reps {args.reps}`, best run of each\n",
             "| | tracking off | tracking on |", "|---|---:|---:|",
             f"| whole run, wall (s) | {off['wall']:.2f} | {on['wall']:.2f} |",
             f"| epoch 1 (s) | {off['epoch1']:.2f} | {on['epoch1']:.2f} |",
             f"| steady epoch, median (s) | {off['epoch']:.3f} | {on['epoch']:.3f} |",
             f"| peak RSS, largest process (MB, max over runs) | {max(r['largest_mb'] for r in runs[False]):.0f} | "
             f"{peak_on:.0f} |",
             f"| peak RSS, whole process tree (MB, max over runs) | {max(r['tree_mb'] for r in runs[False]):.0f} | "
             f"{max(r['tree_mb'] for r in runs[True]):.0f} |", "",
             "| target | measured | met |", "|---|---:|---|",
             *[f"| {name} | {value:.2f} | {'yes' if ok else 'NO'} |" for name, value, ok in checks], ""]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
