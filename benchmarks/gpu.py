"""Issue 10's GPU targets as one table: the default run, the notebook grid and 256 jobs, on one GPU, tracking on.

    bash benchmarks/gpu.sh            # on the GPU machine: installs what it lacks, runs tests/test_gpu.py, then this
    python3 benchmarks/gpu.py [--skip-256] [--out FILE]

Each command runs once in a fresh directory (`python -m fmnist_exp ... train.device=cuda`), with the step replayed
as a CUDA graph (the default) and, for the single run, without (`train.cuda_graph=false`), to show what the graph
buys. Prints a markdown table: wall seconds, the target, test accuracy.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused  # noqa: E402  (run: one sweep command's wall time and accuracies; checkout_env; emit)

ROOT = Path(__file__).resolve().parents[1]
LRS, DECAYS, SEEDS = (0.0005, 0.001, 0.002, 0.004), (0, 0.0001, 0.001, 0.01), range(16)


def single(extra: list[str], data_root: Path, device: str) -> tuple[float, float, str]:
    """Wall seconds and test accuracy of one plain run, and its CUDA-graph log line."""
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "fmnist_exp", f"train.device={device}", "train.progress=off",
                                 f"data.root={data_root}", *extra], cwd=cwd, capture_output=True, text=True,
                                env=fused.checkout_env())
        wall = time.perf_counter() - start
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'the default run'} failed:\n{out[-3000:]}")
    accuracy = float(re.findall(r"Test \(best checkpoint.*accuracy ([0-9.]+)", out)[-1])
    graph = next((line.split("CUDA graph: ", 1)[1] for line in out.splitlines() if "CUDA graph: " in line), "no graph")
    return wall, accuracy, graph


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=ROOT / "data", help="Fashion-MNIST's IDX files")
    ap.add_argument("--skip-256", action="store_true", help="leave out the 256-job sweep (~3 min)")
    ap.add_argument("--device", default="cuda", help="cpu: try the script itself on a machine without a GPU")
    ap.add_argument("--epochs", type=int, help="override every run's epochs (a quick try of the script)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = ["| what | jobs | wall (s) | target | met? | test accuracy |", "|---|---:|---:|---:|---|---|"]

    def row(what, jobs, wall, target, accuracy):
        rows.append(f"| {what} | {jobs} | {wall:.1f} | <= {target} s | {'yes' if wall <= target else 'no'} | "
                    f"{accuracy} |")
        print(rows[-1], file=sys.stderr, flush=True)

    def failed(what, jobs, target, e: SystemExit):  # one try on a lent GPU: a failing row must not cost the rest
        print(e, file=sys.stderr, flush=True)
        rows.append(f"| {what} | {jobs} | failed | <= {target} s | no | {str(e).strip().splitlines()[-1][:150]} |")

    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
    tried = f" [a try: {args.epochs} epoch(s)]" if args.epochs else ""  # the label must not claim 17 epochs
    for extra, what in (([], "default run (Adam, batch 100, 17 epochs), CUDA graph"),
                        (["train.cuda_graph=false"], "default run, eager steps")):
        what += tried
        try:
            wall, accuracy, graph = single(extra + epochs, args.data_root, args.device)
        except SystemExit as e:
            failed(what, 1, 10, e)
            continue
        row(what, 1, wall, 10, f"{accuracy:.4f}")
        print(f"  {graph}", file=sys.stderr)
    sweeps = [(["+experiment=notebook"], 16, "notebook grid, fused", 30)]
    if not args.skip_256:
        sweeps.append(([f"optimizer.lr={','.join(map(str, LRS))}",
                        f"optimizer.weight_decay={','.join(map(str, DECAYS))}",
                        f"train.seed={','.join(map(str, SEEDS))}"], 256, "lr x weight decay x seed, 17 epochs, fused",
                       180))
    for overrides, jobs, what, target in sweeps:
        what += tried
        try:
            wall, accuracy, ending = fused.run(overrides, "fused", args.epochs, args.device, args.data_root)
        except SystemExit as e:
            failed(what, jobs, target, e)
            continue
        mean = sum(accuracy.values()) / len(accuracy)
        row(what, jobs, wall, target, f"mean {mean:.4f}, {min(accuracy.values()):.4f}-{max(accuracy.values()):.4f}")
    fused.emit("\n".join(rows), args.out)


if __name__ == "__main__":
    main()
