"""Per-job cost of one training step of K notebook MLPs (784-128-64-10, Adam): apart, stacked, or through vmap.

    .venv/bin/python benchmarks/stacked_step.py [--ks 1 4 8 16] [--batches 100 16] [--reps 7] [--threads 2]
                                                [--clock wall|cpu] [--mixed]

A step is: gather the batch from the in-memory uint8 images, forward, cross-entropy, backward, optimizer step.
  separate   K nn.Modules, each with torch.optim.Adam(fused=True) at conf/'s Adam settings, its own batch
  stacked    fmnist_exp.stacked.StackedModel + StackedOptimizer, one batch per job (K*B rows gathered at once)
  shared     the same, one batch all jobs share (jobs with the same data order)
  vmap       torch.func.stack_module_state + functional_call + vmap, one batch per job, StackedOptimizer
The optimizer alone is also timed: StackedOptimizer (torch's fused kernel per job) against the same Adam written
as ~7 broadcast ops over the stacked tensors with (K, 1) hyperparameters, the other design considered.
Variants alternate within each repetition and the best repetition counts: the VM is shared and noisy. When other
processes load it, torch's 2-thread parallel regions stall on each other (small ops suffer most, which flatters
stacking); `--threads 1 --clock cpu` (process CPU time) is the figure that load barely moves.
Prints a markdown table of microseconds per job-step. `--mixed` instead times BatchNorm as a per-job switch: K
jobs like the notebook grid's ladder (half plain, half with BatchNorm, half of those with dropout; SGD and Adam;
one batch for all) as one stack, against the two halves as two stacks, one after the other.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmnist_exp.models import MLP  # noqa: E402
from fmnist_exp.stacked import StackedModel, StackedOptimizer, job_losses  # noqa: E402

N = 50_000  # the training split's size; the images are random, speed does not depend on them
ADAM = dict(kind="adam", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)


def models(k: int, batch_norm=(False,)) -> list[MLP]:
    """k notebook MLPs; job i has BatchNorm as batch_norm[i % len(batch_norm)] says, and a BatchNorm job whose
    i // 2 is odd dropout 0.3 too (about half of them)."""
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        bn = batch_norm[seed % len(batch_norm)]
        out.append(MLP(batch_norm=bn, dropout=[0.3, 0.3] if bn and seed // 2 % 2 else []))
    return out


def separate(k, images, labels):
    nets = models(k)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in nets]

    def step(idx):  # idx: (K, B)
        for m, opt, i in zip(nets, opts, idx):
            x = images.index_select(0, i).float().div_(255)
            loss = F.cross_entropy(m(x), labels.index_select(0, i))
            for p in m.parameters():
                p.grad = None
            loss.backward()
            opt.step()
    return step


def stacked(k, images, labels, shared=False):
    model = StackedModel.from_models(models(k))
    opt = StackedOptimizer(list(model.parameters()), [ADAM] * k)

    def step(idx):
        i = idx[0] if shared else idx.flatten()
        x = images.index_select(0, i).float().div_(255)
        x = x if shared else x.view(k, -1, 1, 28, 28)
        y = labels.index_select(0, i)
        opt.zero_grad()
        job_losses(model(x), y if shared else y.view(k, -1)).sum().backward()
        opt.step()
    return step


def grid_stack(k, images, labels, batch_norm):
    """The grid's ladder as one stack (shared batches): SGD and Adam alternating, BatchNorm as `models` gives it."""
    model = StackedModel.from_models(models(k, batch_norm))
    hyper = [dict(kind="sgd", lr=0.1), ADAM] * (k // 2) + [ADAM] * (k % 2)
    opt = StackedOptimizer(list(model.parameters()), hyper, model.param_owners())
    gens = [torch.Generator().manual_seed(i) for i in range(k)]

    def step(idx):
        opt.zero_grad()
        x = images.index_select(0, idx[0]).float().div_(255)
        job_losses(model(x, gens), labels.index_select(0, idx[0])).sum().backward()
        opt.step()
    return step


def mixed(args, images, labels, clock) -> None:
    """BatchNorm per job: K jobs, half with it, as one stack vs as two stacks of K/2 (microseconds per step)."""
    rows = []
    for batch in args.batches:
        for k in args.ks:
            steps = max(5, 2000 // (k * batch // 16 + 4))
            order = torch.randperm(N)[: steps * batch].view(steps, 1, batch)
            plain, bn = grid_stack(k // 2, images, labels, (False,)), grid_stack(k // 2, images, labels, (True,))
            fns = {"plain K/2": plain, "BatchNorm K/2": bn, "mixed K": grid_stack(k, images, labels, (False, True))}
            t = {n: v * 1e6 for n, v in best_of(fns, lambda s: (order[s],), steps, args.reps, clock).items()}
            rows.append((batch, k, t))
            print(batch, k, {n: round(v) for n, v in t.items()}, file=sys.stderr, flush=True)
    print(f"\nµs per step ({args.clock} clock), best of {args.reps}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| batch | K | plain K/2 | BatchNorm K/2 | both apart | mixed K | mixed / apart |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, k, t in rows:
        apart = t["plain K/2"] + t["BatchNorm K/2"]
        print(f"| {batch} | {k} | {t['plain K/2']:.0f} | {t['BatchNorm K/2']:.0f} | {apart:.0f} | {t['mixed K']:.0f} "
              f"| {t['mixed K'] / apart:.2f} |")


def vmapped(k, images, labels):
    nets = models(k)
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    forward = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))
    opt = StackedOptimizer(list(params.values()), [ADAM] * k)

    def step(idx):
        x = images.index_select(0, idx.flatten()).float().div_(255).view(k, -1, 1, 28, 28)
        opt.zero_grad()
        job_losses(forward(params, buffers, x), labels.index_select(0, idx.flatten()).view(k, -1)).sum().backward()
        opt.step()
    return step


def broadcast_adam(params):
    """Adam over stacked tensors with (K, 1) hyperparameters, the other design: every op covers all K jobs."""
    k, flat = params[0].shape[0], [p.view(p.shape[0], -1) for p in params]
    m, v, tmp = ([torch.zeros_like(p) for p in flat] for _ in range(3))
    lr, b1, b2, eps = (torch.full((k,), x, dtype=torch.float64) for x in (1e-3, 0.9, 0.999, 1e-8))
    steps = torch.zeros(k, dtype=torch.float64)

    @torch.no_grad()
    def step():
        steps.add_(1)
        neg_step = -lr / (1 - b1 ** steps)
        scale, shift = ((1 - b2 ** steps).sqrt() * neg_step).float()[:, None], (eps / neg_step).float()[:, None]
        w1, w2 = (1 - b1).float()[:, None], (1 - b2).float()[:, None]
        for p, g, m_, v_, t in zip(flat, (p.grad.view(k, -1) for p in params), m, v, tmp):
            m_.lerp_(g, w1)
            v_.lerp_(torch.mul(g, g, out=t), w2)
            torch.sqrt(v_, out=t).div_(scale).add_(shift)
            p.addcdiv_(m_, t)
    return step


def optimizer_only(k):
    model = StackedModel.from_models(models(k))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return {"fused per job": StackedOptimizer(params, [ADAM] * k).step, "broadcast (K,1)": broadcast_adam(params)}


def best_of(fns: dict, make_arg, steps: int, reps: int, clock=time.perf_counter) -> dict[str, float]:
    """Seconds per call of each function, best of `reps` runs of `steps` calls, the functions taking turns."""
    best = dict.fromkeys(fns, float("inf"))
    for name, fn in fns.items():  # warm-up
        fn(*make_arg(0))
    for _ in range(reps):
        for name, fn in fns.items():
            start = clock()
            for s in range(steps):
                fn(*make_arg(s))
            best[name] = min(best[name], (clock() - start) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--no-vmap", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="BatchNorm per job: one mixed stack vs two (K even)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as the CLI does: Adam's tiny second moments are slow denormals otherwise
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N,), generator=g)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.mixed:
        return mixed(args, images, labels, clock)
    rows = []
    for batch in args.batches:
        for k in args.ks:
            steps = max(5, 2000 // (k * batch // 16 + 4))
            order = torch.stack([torch.randperm(N, generator=g)[: steps * batch].view(steps, batch)
                                 for _ in range(k)], 1)  # (steps, K, B): each job its own data order
            fns = {"separate": separate(k, images, labels), "stacked": stacked(k, images, labels),
                   "shared": stacked(k, images, labels, shared=True)}
            if not args.no_vmap:
                fns["vmap"] = vmapped(k, images, labels)
            t = best_of(fns, lambda s: (order[s],), steps, args.reps, clock)
            opt = best_of(optimizer_only(k), lambda s: (), steps, args.reps, clock) if batch == args.batches[0] else {}
            rows.append((batch, k, {n: v / k * 1e6 for n, v in (t | opt).items()}))
            print(batch, k, {n: round(v) for n, v in rows[-1][2].items()}, file=sys.stderr, flush=True)
    names = list(dict.fromkeys(n for *_, r in rows for n in r))
    print(f"\nµs per job-step ({args.clock} clock), best of {args.reps}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| batch | K | " + " | ".join(names) + " | separate / stacked |")
    print("|---:|---:|" + "---:|" * (len(names) + 1))
    for batch, k, r in rows:
        cells = [f"{r[n]:.0f}" if n in r else "" for n in names]
        print(f"| {batch} | {k} | " + " | ".join(cells) + f" | {r['separate'] / r['stacked']:.2f}× |")


if __name__ == "__main__":
    main()
