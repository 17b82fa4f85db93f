"""Side-by-side benchmark: the notebook's pipeline vs fmnist_exp's training path, on this machine, in one run.

    .venv/bin/python benchmarks/bench.py [--epochs 2] [--out benchmarks/RESULTS.md]

For Adam and SGD at batch 100 and 16 it alternates epochs of (a) the notebook's code — torchvision
FashionMNIST + ToTensor per item + DataLoader, .item() every step — and (b) fmnist_exp.train.train_epoch on one
in-memory tensor, same model, optimizer and split sizes, and reports median seconds per epoch (train +
validation), the ratio, and both valid accuracies after the same number of epochs. Then it measures the CLI:
time from process start to the first training step, peak RSS of a run, and tracking on vs off.
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import resource
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmnist_exp import data, train  # noqa: E402
from fmnist_exp.models import MLP  # noqa: E402

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


def our_epoch(model, optimizer, dataset, batch_size, generator) -> tuple[float, float]:
    start = time.perf_counter()
    train.train_epoch(model, optimizer, dataset, batch_size, generator, 1, progress=False)
    _, acc = train.evaluate(model, dataset.valid_x, dataset.valid_y, 1000)
    return time.perf_counter() - start, acc


def make_optimizer(name, params):
    return optim.Adam(params, lr=1e-3) if name == "adam" else optim.SGD(params, lr=0.1)


def compare(epochs: int, raw_root: Path) -> list[dict]:
    dataset = data.load(Path(tempfile.mkdtemp()), SYSTEM, False, 10000, 0, torch.device("cpu"))
    rows = []
    for batch_size in (100, 16):
        trainloader, validloader = notebook_loaders(raw_root, batch_size)
        for opt_name in ("adam", "sgd"):
            torch.manual_seed(0)
            nb_model = NotebookDNN()
            nb_opt = make_optimizer(opt_name, nb_model.parameters())
            torch.manual_seed(0)
            our_model = MLP()
            our_opt = make_optimizer(opt_name, our_model.parameters())
            gen = torch.Generator().manual_seed(0)
            nb, ours = [], []
            for _ in range(epochs):  # alternate, so machine noise hits both alike
                nb.append(notebook_epoch(nb_model, nb_opt, trainloader, validloader))
                ours.append(our_epoch(our_model, our_opt, dataset, batch_size, gen))
            row = dict(optimizer=opt_name, batch_size=batch_size,
                       notebook_s=statistics.median(t for t, _ in nb), ours_s=statistics.median(t for t, _ in ours),
                       notebook_acc=nb[-1][1], ours_acc=ours[-1][1])
            row["speedup"] = row["notebook_s"] / row["ours_s"]
            print(f"{opt_name:4} batch {batch_size:3}: notebook {row['notebook_s']:.2f} s/epoch, ours "
                  f"{row['ours_s']:.2f} s/epoch ({row['speedup']:.1f}x); valid acc after {epochs} epochs "
                  f"{row['notebook_acc']:.4f} vs {row['ours_acc']:.4f}", flush=True)
            rows.append(row)
    return rows


def cli_run(args: list[str], cwd: Path) -> dict:
    """Run the CLI; time to the first training step, wall time, per-epoch times and peak RSS of the child."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    first_step, epochs = None, []
    for line in proc.stdout:
        if first_step is None and "Training:" in line:
            first_step = time.perf_counter() - start
        if "| train loss" in line:
            epochs.append(float(line.rsplit("|", 1)[1].strip().removesuffix(" s")))
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"CLI run failed: {args}")
    return dict(first_step=first_step, wall=wall, epoch_s=statistics.median(epochs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None, help="append a results section to this markdown file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmnist_bench_"))
    raw = work / "FashionMNIST" / "raw"  # the notebook's torchvision layout, uncompressed
    raw.mkdir(parents=True)
    for f in SYSTEM.glob("*.gz"):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
    rows = compare(args.epochs, work)

    cwd = work / "cli"
    cwd.mkdir()
    common = ["train.epochs=3", "train.progress=off"]
    cli_run(["train.epochs=1", "tracking.enabled=false"], cwd)  # warm the data cache and the OS page cache
    runs = {}
    for rep in range(2):  # alternate tracking on/off
        for tracking_on in (True, False):
            r = cli_run([*common, f"tracking.enabled={str(tracking_on).lower()}"], cwd)
            runs.setdefault(tracking_on, []).append(r)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    on = {k: statistics.median(r[k] for r in runs[True]) for k in ("first_step", "wall", "epoch_s")}
    off = {k: statistics.median(r[k] for r in runs[False]) for k in ("first_step", "wall", "epoch_s")}
    print(f"start-up to first training step: {off['first_step']:.2f} s (tracking off), "
          f"{on['first_step']:.2f} s (on)")
    print(f"3-epoch run wall: tracking on {on['wall']:.1f} s, off {off['wall']:.1f} s "
          f"(+{100 * (on['wall'] / off['wall'] - 1):.0f}%); epoch time on {on['epoch_s']:.2f} s, off "
          f"{off['epoch_s']:.2f} s (+{100 * (on['epoch_s'] / off['epoch_s'] - 1):.1f}%)")
    print(f"peak RSS of a run (largest child): {peak_rss_mb:.0f} MB")
    if args.out:
        lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cores, "
                 f"torch {torch.__version__}, {args.epochs} epochs per pipeline\n",
                 "| optimizer | batch | notebook s/epoch | ours s/epoch | speed-up | notebook valid acc | ours valid acc |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['optimizer']} | {r['batch_size']} | {r['notebook_s']:.2f} | {r['ours_s']:.2f} | "
                  f"{r['speedup']:.1f}× | {r['notebook_acc']:.4f} | {r['ours_acc']:.4f} |" for r in rows]
        lines += ["", f"- start-up to first training step: {off['first_step']:.2f} s (tracking off), "
                      f"{on['first_step']:.2f} s (on)",
                  f"- peak RSS of a run: {peak_rss_mb:.0f} MB",
                  f"- tracking on vs off, 3-epoch run: wall {on['wall']:.1f} s vs {off['wall']:.1f} s; median epoch "
                  f"{on['epoch_s']:.2f} s vs {off['epoch_s']:.2f} s", ""]
        with open(args.out, "a") as f:
            f.write("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
