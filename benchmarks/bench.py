"""Side-by-side benchmark: the notebook's pipeline vs fmnist_exp's training path, on this machine, in one run.

    .venv/bin/python benchmarks/bench.py [--epochs 3] [--ideas] [--sweep] [--out benchmarks/RESULTS.md]

1. For Adam and SGD at batch 100 and 16 it alternates epochs of (a) the notebook's code -- torchvision
   FashionMNIST + ToTensor per item + DataLoader, .item() every step -- and (b) fmnist_exp's loop
   (train.train_epoch on a group of one, as a single run trains, with the optimizer settings conf/ gives,
   denormals flushed as the CLI does, for both), same model and split sizes, and reports median seconds per epoch (train + validation), the
   ratio, and both valid accuracies after the same number of epochs.
2. The CLI (`python -m fmnist_exp`, the default 17-epoch run), tracking on and off, alternating: time from process
   start to the first training step and to the end of epoch 1, seconds per epoch, whole-run wall time, and peak
   RSS of each process.
3. --ideas: what each speed idea still open in our loop is worth (denormals, threads, evaluation batch size), each
   against the same baseline in the same process. (The optimizer implementations, batch gathering and
   torch.compile were measured on the eager loop before fused sweeps: benchmarks/RESULTS.md, 2026-11-28.)
4. --sweep: the 16-run `+experiment=notebook` sweep, sequential (1 job x 2 threads) and with joblib (2 jobs x 1
   thread), wall time.
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fmnist_exp import config, data, job, train  # noqa: E402
from fmnist_exp.stacked import StackedModel, StackedOptimizer  # noqa: E402
from fmnist_exp.step import Stepper  # noqa: E402

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


class NotebookDNN(nn.Module):
    """The notebook's FMNIST_DNN, verbatim in structure."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def notebook_loaders(raw_root: Path, batch_size: int):
    from torch.utils.data import DataLoader, random_split
    from torchvision import datasets, transforms
    trainset = datasets.FashionMNIST(str(raw_root), download=False, train=True, transform=transforms.ToTensor())
    trainset, validset = random_split(trainset, [50000, 10000], generator=torch.Generator().manual_seed(0))
    return (DataLoader(trainset, batch_size=batch_size, shuffle=True),
            DataLoader(validset, batch_size=batch_size, shuffle=False))


def notebook_epoch(model, optimizer, trainloader, validloader) -> tuple[float, float]:
    """One epoch exactly as the notebook wrote it; returns (seconds, valid accuracy)."""
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    model.train()
    train_loss = 0
    for images, labels in trainloader:
        images.resize_(images.size()[0], 784)
        loss = criterion(model.forward(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_loss += loss.item()
    model.eval()
    valid_accuracy = 0
    with torch.no_grad():
        for images, labels in validloader:
            images.resize_(images.size()[0], 784)
            preds = model.forward(images).max(1)[1]
            valid_accuracy += ((preds == labels).sum() / images.shape[0]).item()
    return time.perf_counter() - start, valid_accuracy / len(validloader)


class OurJob:
    """fmnist_exp's training loop for one job (a group of one, as a single run trains), stepped epoch by epoch,
    with the model and optimizer settings exactly as conf/ builds them."""

    def __init__(self, optimizer: str, batch_size: int, n_train: int):
        from hydra import compose, initialize_config_dir
        config.register()
        with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"optimizer={optimizer}", f"data.batch_size={batch_size}"])
        self.member = job.build(cfg, torch.device("cpu"))
        self.model = StackedModel.from_models([self.member.model])
        self.optimizer = StackedOptimizer(list(self.model.parameters()), [self.member.hyper])
        self.sizes = data.batch_sizes(n_train, batch_size)

    def epoch(self, dataset, eval_batch_size=1000) -> tuple[float, float]:
        start = time.perf_counter()
        stepper = Stepper(self.model, self.optimizer, dataset, [self.member.dropout])  # eager, as on a CPU
        train.train_epoch(stepper, [self.member], dataset, self.sizes, 1, False, None)
        _, accs = train.evaluate_stack(self.model, dataset.valid_x, dataset.valid_y, eval_batch_size)
        return time.perf_counter() - start, accs[0]


def notebook_optimizer(name: str, params):
    return optim.Adam(params, lr=1e-3) if name == "adam" else optim.SGD(params, lr=0.1)


def load_ours() -> data.FashionMNIST:
    return data.load(Path(tempfile.mkdtemp()), SYSTEM, False, 10000, 0, torch.device("cpu"))


def compare(epochs: int, raw_root: Path) -> list[dict]:
    dataset = load_ours()
    rows = []
    for batch_size in (100, 16):
        trainloader, validloader = notebook_loaders(raw_root, batch_size)
        for opt_name in ("adam", "sgd"):
            torch.manual_seed(0)
            nb_model = NotebookDNN()
            nb_opt = notebook_optimizer(opt_name, nb_model.parameters())
            ours_job = OurJob(opt_name, batch_size, len(dataset.train_y))
            nb, ours = [], []
            for _ in range(epochs):  # alternate, so machine noise hits both alike
                nb.append(notebook_epoch(nb_model, nb_opt, trainloader, validloader))
                ours.append(ours_job.epoch(dataset))
            row = dict(optimizer=opt_name, batch_size=batch_size,
                       notebook_s=statistics.median(t for t, _ in nb), ours_s=statistics.median(t for t, _ in ours),
                       notebook_acc=nb[-1][1], ours_acc=ours[-1][1])
            row["speedup"] = row["notebook_s"] / row["ours_s"]
            print(f"{opt_name:4} batch {batch_size:3}: notebook {row['notebook_s']:.2f} s/epoch, ours "
                  f"{row['ours_s']:.2f} s/epoch ({row['speedup']:.1f}x); valid acc after {epochs} epochs "
                  f"{row['notebook_acc']:.4f} vs {row['ours_acc']:.4f}", flush=True)
            rows.append(row)
    return rows


def ideas(epochs: int) -> list[tuple[str, str, float, float]]:
    """(idea, variant, s/epoch at batch 100, s/epoch at batch 16) for our loop with Adam."""
    dataset = load_ours()
    threads = torch.get_num_threads()

    def run(batch_size, flush=True, nthreads=threads, eval_bs=1000) -> float:
        torch.set_num_threads(nthreads)
        torch.set_flush_denormal(flush)  # reaches only this thread: the denormal variants run on 1 thread
        ours = OurJob("adam", batch_size, len(dataset.train_y))
        times = [ours.epoch(dataset, eval_bs)[0] for _ in range(epochs)]
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        return statistics.median(times)

    variants = [
        ("denormals (1 thread)", "kept", {"flush": False, "nthreads": 1}),
        ("denormals (1 thread)", "flushed to zero (ours)", {"flush": True, "nthreads": 1}),
        ("threads per job", "1", {"nthreads": 1}),
        ("threads per job", f"{threads} (all cores)", {"nthreads": threads}),
        ("evaluation batch", "100", {"eval_bs": 100}),
        ("evaluation batch", "1000 (ours)", {"eval_bs": 1000}),
        ("evaluation batch", "10000", {"eval_bs": 10000}),
    ]
    rows = []
    for idea, variant, kw in variants:
        t100, t16 = run(100, **kw), run(16, **kw)
        print(f"{idea:34} {variant:36} batch 100 {t100:.3f} s/epoch, batch 16 {t16:.3f} s/epoch", flush=True)
        rows.append((idea, variant, t100, t16))
    return rows


PEAK_RSS = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, status, usage = os.wait4(p.pid, 0); "
            "print('PEAK_RSS_KB', usage.ru_maxrss, flush=True); sys.exit(os.waitstatus_to_exitcode(status))")


def cli_run(args: list[str], cwd: Path) -> dict:
    """Run the CLI; seconds from process start to the first training step and to the end of epoch 1, epoch times
    and the gaps between epochs, wall time, and the CLI process's own peak RSS."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    # through a small Python parent: a child forked from this big process would count this process's pages in its
    # own peak RSS until it execs
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "fmnist_exp", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, epoch_ends, epochs, output, rss_mb = None, [], [], [], None
    for line in proc.stdout:
        output.append(line)
        if line.startswith("PEAK_RSS_KB "):
            rss_mb = int(line.split()[1]) / 1024
        now = time.perf_counter() - start
        if first_step is None and "Training:" in line:  # logged just before the first step
            first_step = now
        if "| train loss" in line:
            epoch_ends.append(now)
            epochs.append(float(line.rsplit("|", 1)[1].strip().removesuffix(" s")))
    wall = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"CLI run failed: {args}\n{''.join(output[-20:])}")
    gaps = [b - a for a, b in zip(epoch_ends, epoch_ends[1:])]
    return dict(first_step=first_step, epoch1_end=epoch_ends[0], wall=wall, epoch_s=statistics.median(epochs),
                cycle_s=statistics.median(gaps) if gaps else float("nan"), rss_mb=rss_mb)


def cli(cwd: Path, reps: int) -> dict[bool, dict]:
    cli_run(["train.epochs=1", "tracking.enabled=false", "train.progress=off"], cwd)  # warm the caches
    runs: dict[bool, list] = {True: [], False: []}
    for _ in range(reps):  # alternate tracking on/off
        for tracking_on in (True, False):
            runs[tracking_on].append(cli_run(["train.progress=off", f"tracking.enabled={str(tracking_on).lower()}"],
                                             cwd))
    out = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    for k in (True, False):
        out[k]["rss_mb"] = max(r["rss_mb"] for r in runs[k])
    on, off = out[True], out[False]
    print(f"first training step: {off['first_step']:.2f} s (tracking off), {on['first_step']:.2f} s (on); "
          f"epoch 1 done at {off['epoch1_end']:.2f} s vs {on['epoch1_end']:.2f} s")
    print(f"17-epoch run: wall {on['wall']:.1f} s on vs {off['wall']:.1f} s off; epoch {on['epoch_s']:.3f} vs "
          f"{off['epoch_s']:.3f} s; epoch to epoch {on['cycle_s']:.3f} vs {off['cycle_s']:.3f} s")
    print(f"peak RSS: {on['rss_mb']:.0f} MB (tracking on), {off['rss_mb']:.0f} MB (off)", flush=True)
    return out


def sweep(cwd: Path) -> dict[str, float]:
    out = {}
    for name, extra in (("sequential, 1 job x 2 threads", []),
                        ("joblib, 2 jobs x 1 thread", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "fmnist_exp", "+experiment=notebook", "train.progress=off",
                                 *extra], cwd=cwd, capture_output=True, text=True)
        out[name] = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"sweep failed ({name}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        print(f"notebook sweep, {name}: {out[name] / 60:.1f} min", flush=True)
    return out


def report(args, rows, cli_out, idea_rows, sweep_out) -> str:
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {args.epochs} epochs per pipeline\n"]
    if rows:
        lines += ["| optimizer | batch | notebook s/epoch | ours s/epoch | speed-up | notebook valid acc | "
                  "ours valid acc |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['optimizer']} | {r['batch_size']} | {r['notebook_s']:.2f} | {r['ours_s']:.2f} | "
              f"{r['speedup']:.1f}× | {r['notebook_acc']:.4f} | {r['ours_acc']:.4f} |" for r in rows]
    on, off = cli_out[True], cli_out[False]
    lines += ["", "The CLI, default run (Adam, batch 100, 17 epochs), median of the alternating runs:", "",
              "| | tracking off | tracking on |", "|---|---:|---:|",
              f"| first training step (s from process start) | {off['first_step']:.2f} | {on['first_step']:.2f} |",
              f"| end of epoch 1 (s) | {off['epoch1_end']:.2f} | {on['epoch1_end']:.2f} |",
              f"| epoch (s, as logged) | {off['epoch_s']:.3f} | {on['epoch_s']:.3f} |",
              f"| epoch to epoch (s, incl. checkpoints and logging) | {off['cycle_s']:.3f} | {on['cycle_s']:.3f} |",
              f"| whole run, wall (s) | {off['wall']:.1f} | {on['wall']:.1f} |",
              f"| peak RSS (MB, largest process) | {off['rss_mb']:.0f} | {on['rss_mb']:.0f} |", ""]
    if idea_rows:
        lines += [f"Speed ideas in our loop (median s/epoch over {args.epochs} epochs, train + validation):", "",
                  "| idea | variant | batch 100 | batch 16 |", "|---|---|---:|---:|"]
        lines += [f"| {i} | {v} | {a:.3f} | {b:.3f} |" for i, v, a, b in idea_rows]
        lines.append("")
    if sweep_out:
        lines += ["The 16-run `+experiment=notebook` sweep (17 epochs each, tracking on):", ""]
        lines += [f"- {name}: {secs / 60:.1f} min ({secs:.0f} s)" for name, secs in sweep_out.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per pipeline and per idea variant")
    ap.add_argument("--reps", type=int, default=2, help="CLI runs per tracking setting")
    ap.add_argument("--ideas", action="store_true", help="also measure each speed idea")
    ap.add_argument("--sweep", action="store_true", help="also time the 16-run notebook sweep (~10 min)")
    ap.add_argument("--out", default=None, help="append a results section to this markdown file")
    args = ap.parse_args()
    # As the CLI does (train.flush_denormal), for both pipelines: the flag is per thread, so it must be set before
    # torch starts its worker threads, and it cannot be switched for one pipeline only afterwards.
    torch.set_flush_denormal(True)
    work = Path(tempfile.mkdtemp(prefix="fmnist_bench_"))
    raw = work / "FashionMNIST" / "raw"  # the notebook's torchvision layout, uncompressed
    raw.mkdir(parents=True)
    for f in SYSTEM.glob("*.gz"):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
    rows = compare(args.epochs, work)
    idea_rows = ideas(args.epochs) if args.ideas else []
    cwd = work / "cli"
    cwd.mkdir()
    cli_out = cli(cwd, args.reps)
    sweep_out = sweep(cwd) if args.sweep else {}
    if args.out:
        with open(args.out, "a") as f:
            f.write(report(args, rows, cli_out, idea_rows, sweep_out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
