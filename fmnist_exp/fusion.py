"""Which jobs of a sweep train together, and how the groups are shared out. Jobs whose training step has the same
shapes (fusion_key) can train as one stacked model (stacked.py, train.fit); plan_groups splits them into jobs with
and without BatchNorm, then by seed, where a cost estimate (group_cost) says the parts cost less, and cuts groups to
max_group and to what fits in memory (jobs_that_fit); balance halves groups for worker processes while that ends
the sweep sooner. The fused launcher (hydra_plugins/fmnist_launchers) asks this module for its plan; a job's
own lifecycle is job.py's.
"""
from __future__ import annotations

import json
import sys

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fmnist_exp.machine import free_memory, pick_device


def fusion_key(cfg: DictConfig) -> str:
    """What a training step's shapes depend on, and the process settings it runs under (threads, the denormal
    flag): jobs with equal keys train together as one stacked model. Seed,
    init, dropout probabilities, BatchNorm on or off, optimizer, schedule, early stopping and monitor may differ
    within a group (plan_groups still parts seeds and BatchNorm where that costs less)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("init", "init_std", "dropout", "batch_norm")}
    d, t = cfg.data, cfg.train
    return json.dumps({"model": model, "data": OmegaConf.to_container(d, resolve=True), "epochs": t.epochs,
                       "device": t.device, "cuda_graph": t.cuda_graph, "threads": t.threads,
                       "flush_denormal": t.flush_denormal, "progress": t.progress,
                       "resume": t.resume, "tracking": OmegaConf.to_container(cfg.tracking, resolve=True),
                       "skip_finished": cfg.sweep.skip_finished}, sort_keys=True)


def describe_fusion(cfgs: list[DictConfig]) -> str:
    """One line on what a group shares, for the launcher's log."""
    cfg, m = cfgs[0], cfgs[0].model
    arch = f"{m._target_.rsplit('.', 1)[-1]} {list(m.channels) if 'channels' in m else ''}{list(m.hidden)}"
    batches = f", seed {cfg.train.seed} (one batch for all)" if shares_batches(cfgs) else ""
    norm = sum(map(batch_norm, cfgs))
    bn = "" if not norm else " +BN" if norm == len(cfgs) else f" (+BN for {norm} of {len(cfgs)})"
    return (f"model {arch}{bn}, batch {cfg.data.batch_size}, {cfg.train.epochs} "
            f"epochs, valid {cfg.data.valid_size} (split {cfg.data.split_seed}), device {cfg.train.device}{batches}")


def plan_groups(cfgs: list[DictConfig], max_group: int | None) -> list[list[int]]:
    """Indices of `cfgs` in groups that fuse (input order kept inside a group), each at most max_group long. Jobs
    of one seed share their batches (one wide first-layer product for all): a group is split into jobs with and
    without BatchNorm, then by seed, where the parts are estimated to cost less than the whole (group_cost)."""
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        try:
            key = fusion_key(cfg)
        except Exception:  # a config that cannot even say what it is fails in its own group, with its reason
            key = f"alone-{i}"
        by_key.setdefault(key, []).append(i)
    groups = []
    for ids in by_key.values():
        size = min(max_group or len(ids), jobs_that_fit(cfgs[ids[0]])) if len(ids) > 1 else 1
        for bn_part in split_by(ids, cfgs, batch_norm):
            for part in split_by(bn_part, cfgs, lambda c: c.train.seed):
                groups += [part[j: j + size] for j in range(0, len(part), size)]
    return groups


def shares_batches(cfgs: list[DictConfig]) -> bool:
    """Whether these jobs (several, of one fusion key) share one seed, hence one data order: one batch a step."""
    return len(cfgs) > 1 and len({c.train.seed for c in cfgs}) == 1


def batch_norm(cfg: DictConfig) -> bool:
    """Whether this job's model has BatchNorm (a per-job switch inside a group, StackedModel.normalised)."""
    return bool(cfg.model.get("batch_norm"))


def split_by(ids: list[int], cfgs: list[DictConfig], value) -> list[list[int]]:
    """`ids` (one fusion key) as one part per `value(cfg)` (a seed; BatchNorm on or off) when that is estimated
    to cost less, else as they are."""
    if len(ids) < 2:  # also a config that failed to say what it is (its own group): nothing to read from it
        return [ids]
    parts_by: dict = {}
    for i in ids:
        parts_by.setdefault(value(cfgs[i]), []).append(i)
    parts = list(parts_by.values())
    if len(parts) > 1 and sum(group_cost([cfgs[i] for i in p]) for p in parts) < group_cost([cfgs[i] for i in ids]):
        return parts
    return [ids]


# A fused step's cost on one CPU thread, in us: a fixed part per step of the group, plus a part per job that grows
# with the batch (fitted to benchmarks/stacked_step.py at K = 1 and 4, batch 16 and 100: within ~15 %); BatchNorm
# makes a job's part ~1.35x (the notebook grid's groups of 4, trained in worker processes); jobs that share a seed,
# and so their batches, ~0.86x: jobs of several seeds take their first layer job by job on a CPU, exactly as alone
# (stacked.py; `stacked_step.py --ks 2 8 32 --batches 16 100 --threads 1 --clock cpu`: shared / per-job batches
# 0.81-0.89 at batch 16, 0.83-0.91 at batch 100).
STEP_US, JOB_STEP_US, SAMPLE_US, BATCH_NORM, SHARED_BATCH = 250.0, 60.0, 7.5, 1.35, 0.86
# Jobs with and without BatchNorm in one group: every job pays for BatchNorm, plus ~4 % (torch.where, stand-ins).
# One mixed group vs the two apart, 1 thread (benchmarks/stacked_step.py --mixed --ks 2 4 8 --threads 1 --clock
# cpu): 0.76 / 0.95 / 1.01x at K = 2 / 4 / 8 and batch 16, 0.95 / 1.21 / 1.15x at batch 100; this estimate gives
# 0.78 / 0.92 / 1.03 and 0.98 / 1.11 / 1.15. So on a CPU small groups mix (a step's fixed part dominates) and the
# notebook grid's 4 + 4 stay apart; on a GPU, where a step costs its launches, one step serves both.
MIXED_BN = 1.04
# On a GPU a step replayed as a CUDA graph is ~150 us whatever it holds, and a job adds ~1.4 us at batch 16 (issue
# 10's H200 probe: 9.8 / 3.7 / 2.0 us per job-step at K = 16 / 64 / 256); the batch's share is a guess, unmeasured.
GPU_STEP_US, GPU_JOB_STEP_US, GPU_SAMPLE_US = 150.0, 0.4, 0.06


def on_gpu(cfg: DictConfig) -> bool:
    """Whether this job will train on a GPU (auto: where one is visible)."""
    device = str(cfg.train.device)
    return device.startswith("cuda") or device == "auto" and torch.cuda.is_available()


def group_cost(cfgs: list[DictConfig]) -> float:
    """Estimated seconds to train these jobs (one fusion key) as one group (CPU: on one thread): only its ratio to
    other groups' costs matters (it orders, splits and balances groups across worker processes)."""
    cfg, d = cfgs[0], cfgs[0].data
    # out-of-range values (a job that will fail its own validation, alone) must not stop the planning of the rest
    batch = max(1, int(d.batch_size))
    steps = -(-max(1, 60_000 - int(d.valid_size)) // batch) * max(0, int(cfg.train.epochs))
    if on_gpu(cfg):  # launch-bound: one big group beats several small ones
        return steps * (GPU_STEP_US + len(cfgs) * (GPU_JOB_STEP_US + GPU_SAMPLE_US * batch)) * 1e-6
    per_job = JOB_STEP_US + SAMPLE_US * batch
    norm = {batch_norm(c) for c in cfgs}
    if True in norm:  # every job pays for BatchNorm in a group that has it (a mixed one normalises them all)
        per_job *= BATCH_NORM * (MIXED_BN if False in norm else 1.0)
    if shares_batches(cfgs):
        per_job *= SHARED_BATCH
    return steps * (STEP_US + len(cfgs) * per_job) * 1e-6


def makespan(costs: list[float], workers: int) -> float:
    """Wall time of tasks of these costs on `workers` workers, costliest first to the least loaded worker (LPT)."""
    loads = [0.0] * max(1, workers)
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def balance(groups: list[list[int]], cfgs: list[DictConfig], workers: int) -> list[list[int]]:
    """Groups for `workers` processes training at once: the costliest group is halved while that shortens the
    sweep's estimated wall time (a smaller stack costs more per job, so a split only pays when a worker would
    otherwise idle), and the result is ordered costliest first, the order in which workers should take them."""
    cost = lambda g: group_cost([cfgs[i] for i in g])
    groups = [list(g) for g in groups]
    while workers > 1:
        top = max(groups, key=cost)
        if len(top) < 2:
            break
        half = (len(top) + 1) // 2
        # halves of one kind (BatchNorm or not) and fewer seeds: no stand-ins, more shared batches
        ordered = sorted(top, key=lambda i: (batch_norm(cfgs[i]), cfgs[i].train.seed, i))
        split = [g for g in groups if g is not top] + [sorted(ordered[:half]), sorted(ordered[half:])]
        before, after = (makespan([cost(g) for g in gs], workers) for gs in (groups, split))
        # a split that ends no sooner still pays while workers idle: it lets the next split of an equal group
        if not (after < 0.98 * before or (after <= before and len(groups) < workers)):
            break
        groups = split
    return sorted(groups, key=cost, reverse=True)


WORKER_START_S = 4.0  # a worker's start: spawn, import torch, load the data set, start its tracking process
THREAD_GAIN, CONTENTION = 1.15, 1.1  # all cores for one group vs one core; two busy processes vs one


def workers_pay(groups: list[list[int]], balanced: list[list[int]], cfgs: list[DictConfig], workers: int) -> bool:
    """Whether `balanced` on `workers` processes (a core each) should end sooner than `groups` one after another
    in this process on all cores: a short sweep does not repay the workers' start."""
    cost = lambda g: group_cost([cfgs[i] for i in g])
    in_turn = sum(cost(g) for g in groups) / THREAD_GAIN
    at_once = makespan([cost(g) for g in balanced], workers) * CONTENTION + WORKER_START_S
    return at_once < in_turn


def jobs_that_fit(cfg: DictConfig, share: float = 0.5) -> int:
    """How many jobs of this config one stacked model may hold: `share` of the device's free memory over one job's
    weights, gradients, optimizer state and a training and an evaluation batch's activations (at least 1)."""
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        return sys.maxsize  # a cluster's login node plans for GPU nodes: max_group caps the group
    try:
        device = pick_device(cfg.train.device)
        model = instantiate(cfg.model)
    except Exception:  # the job's own preparation will report what is wrong with it
        return 1
    widths = []
    hooks = [m.register_forward_hook(lambda mod, i, out: widths.append(out[0].numel())) for m in model.children()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    batches = 3 * max(1, cfg.data.batch_size) + max(1, cfg.data.eval_batch_size)  # bad values: the job fails alone
    per_job = 4 * (4 * params + sum(widths) * batches)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = free_memory()
    return max(1, int(share * free // per_job))
