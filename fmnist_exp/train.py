"""The training loop, top to bottom: train an epoch, validate, schedule, checkpoint, stop early, test the best.

Written once, for a group of jobs that share a training step (a single run is a group of one): the group trains
as one stacked model (stacked.py), one step a batch (step.py: eager, or a replayed CUDA graph on a GPU), and
everything else (schedule, best checkpoint, early stopping, divergence, full checkpoints) is per job, in `Member`.
`Group.epoch` trains one epoch and says what happened (`Epoch`): a job's lifecycle (job.run_group) acts on it; `fit`
runs the epochs to the end.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_exp.data import FashionMNIST, batch_sizes, pixels, write_atomic
from fmnist_exp.data import orders as data_orders
from fmnist_exp.stacked import StackedModel, StackedOptimizer, job_losses
from fmnist_exp.step import Stepper, graph_kind
from fmnist_exp.stopping import Interrupted, StopOnSignal

log = logging.getLogger(__name__)

CHECK_EVERY = 100  # steps between divergence checks: one host sync per 100 steps, not one per step


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model or optimizer."""




@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int
    monitor: str = "valid_loss"  # valid_loss | valid_acc
    patience: int | None = None  # early stopping; None = off
    min_delta: float = 0.0
    progress: bool = False  # a batch progress bar (tqdm)
    cuda_graph: bool = True  # on a GPU, replay the training step as a CUDA graph (step.py)


@dataclass
class LoopState:
    """Everything a resumed run needs to continue exactly where the last completed epoch left off."""
    epoch: int = 0  # last completed epoch (1-based)
    best: float | None = None  # best monitored value so far: its epoch's weights are the best checkpoint
    best_epoch: int = 0
    stale_epochs: int = 0  # epochs without improvement, for early stopping
    stop_best: float | None = None  # the value early stopping last counted as an improvement (by > min_delta)
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over (x, y) in eval mode (BatchNorm running stats, no dropout)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        logits = model(pixels(x[i: i + batch_size]))
        loss_sum += F.cross_entropy(logits, y[i: i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i: i + batch_size]).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes for x, in eval mode."""
    model.eval()
    return torch.cat([model(pixels(x[i: i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def _improved(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if monitor == "valid_loss" else value > best + min_delta


@dataclass(eq=False)  # each member is itself (hashed by identity): a key of Epoch.metrics
class Member:
    """One job inside a training group, as the loop sees it: its own model (initial weights in; its best weights
    once it is done, for testing), optimizer settings, LR schedule, data order, dropout stream, best checkpoint,
    early stopping and outcome. A single run is a group of one."""
    name: str
    model: nn.Module
    hyper: dict  # StackedOptimizer settings: kind, lr, weight_decay, momentum/nesterov or betas/eps
    scheduler: object  # a torch LR scheduler over a one-parameter optimizer: torch's own schedule maths, per job
    generator: torch.Generator  # the data order (CPU: the same order, and a resumable state, on any device)
    dropout: torch.Generator  # dropout masks, on the device
    settings: LoopSettings
    checkpoint: Path  # best weights (a plain state_dict of `model`)
    last: Path | None = None  # full checkpoint after every epoch
    state: LoopState = field(default_factory=LoopState)
    optimizer_state: dict | None = None  # restored from a full checkpoint
    best_weights: dict | None = None
    final: dict | None = None  # test scores and summary, once done
    error: Exception | None = None  # why it stopped without finishing (divergence, a bad checkpoint)
    label: str = ""  # its log lines' prefix in a group of several

    @property
    def lr(self) -> float:
        return self.scheduler.optimizer.param_groups[0]["lr"]

    @property
    def running(self) -> bool:
        return self.final is None and self.error is None


@dataclass
class Epoch:
    """What one epoch of a group did (Group.epoch)."""
    metrics: dict[Member, dict]  # each member that completed its epoch (its state.epoch): train/valid scores, lr, time
    left: list[Member]  # out of the stack at the epoch's end: finished or stopped early (`final` set), or diverged
    job_epochs: int  # the epochs it accounts for: one a member, plus those a member leaving early will not train


class Group:
    """Members trained together as one stacked model, an epoch at a time (`epoch`). Each member keeps its own epoch
    count, schedule, best checkpoint and early stopping; one that is done leaves the stack (`remove`), so it costs
    nothing more. All share the model's layer sizes, batch size and epochs (fusion.fusion_key)."""

    def __init__(self, members: list[Member], data: FashionMNIST, stop: StopOnSignal | None = None,
                 progress: bool = False):
        self.members = [m for m in members if m.running]
        self.data, self.stop, self.progress = data, stop, progress  # progress: a batch bar (tqdm)
        for m in self.members:
            m.label = m.label or (f"[{m.name}] " if len(self.members) > 1 else "")
        if not self.members:
            return
        first = self.members[0]
        self.model = StackedModel.from_models([m.model for m in self.members])
        self.optimizer = StackedOptimizer(list(self.model.parameters()), [m.hyper for m in self.members],
                                          self.model.param_owners())
        for k, m in enumerate(self.members):
            if m.optimizer_state is not None:
                self.optimizer.load_job_state(k, m.optimizer_state)
        self.sizes = batch_sizes(len(data.train_y), first.settings.batch_size)
        self.graph = graph_kind(data.train_x.device, first.settings.cuda_graph)
        self.stepper = Stepper(self.model, self.optimizer, data, [m.dropout for m in self.members], self.graph)

    def epoch(self) -> Epoch:
        """Train every member in the stack for its next epoch, then end each one's epoch (end_of_epoch: schedule,
        checkpoints, early stopping; testing a member that is done). A signal caught by `stop` raises Interrupted
        between steps: members not yet done keep the checkpoint of their last completed epoch."""
        data = self.data
        done = [m for m in self.members if m.state.epoch >= m.settings.epochs]  # resumed after its last epoch
        for m in done:
            finish(m, data)
        self.remove(done)
        if not self.members:
            return Epoch({}, done, 0)
        group, first = self.members, self.members[0]
        epochs = [m.state.epoch + 1 for m in group]  # each member's own
        start = time.perf_counter()
        for k, m in enumerate(group):
            self.optimizer.set_lr(k, m.lr)
        lrs = [m.lr for m in group]
        train_losses = train_epoch(self.stepper, group, data, self.sizes, epochs[0], self.progress, self.stop)
        valid_losses, valid_accs = evaluate_stack(self.model, data.valid_x, data.valid_y,
                                                  first.settings.eval_batch_size)
        epoch_time = (time.perf_counter() - start) / len(group)  # each job's share of the group's epoch
        metrics = {}
        for k, m in enumerate(group):
            if not m.running:  # diverged during this epoch
                continue
            metrics[m] = dict(train_loss=train_losses[k], valid_loss=valid_losses[k], valid_acc=valid_accs[k],
                              lr=lrs[k], epoch_time=epoch_time)
            end_of_epoch(m, metrics[m], self.model.job_state_dict(k), self.optimizer.job_state(k), data, len(group))
        left = [m for m in group if not m.running]
        job_epochs = sum(1 + (0 if m.running else m.settings.epochs - e) for m, e in zip(group, epochs))
        self.remove(left)
        return Epoch(metrics, done + left, job_epochs)

    def add(self, members: list[Member]) -> None:
        """New members join the stack between epochs (a search's trials taking the places of those that left),
        each from its own state: a fresh one trains its epoch 1 next, beside the others' later epochs. The stack is
        rebuilt from every member's own weights and optimizer state, so the members already in it train on exactly
        as they would have."""
        members = [m for m in members if m.running]
        if not members:
            return
        for k, m in enumerate(self.members):  # the stack's state back into each member, which the rebuild reads
            m.model.load_state_dict(self.model.job_state_dict(k))
            m.optimizer_state = self.optimizer.job_state(k)
        for m in members:
            m.label = m.label or f"[{m.name}] "
        self.__init__(self.members + members, self.data, self.stop, self.progress)

    def remove(self, members: list[Member]) -> None:
        """Take `members` out of the stack; the rest train on without them."""
        keep = [k for k, m in enumerate(self.members) if m not in members]
        if len(keep) == len(self.members):
            return
        self.members = [self.members[k] for k in keep]
        if keep:
            self.model = self.model.select(keep)
            self.optimizer = self.optimizer.select(keep, list(self.model.parameters()))
            self.stepper = Stepper(self.model, self.optimizer, self.data, [m.dropout for m in self.members],
                                   self.graph)


def fit(members: list[Member], data: FashionMNIST, stop: StopOnSignal | None = None,
        progress: bool = False) -> list[Epoch]:
    """Train `members` together (Group), each until its last epoch or its early stop, and test each one's best
    checkpoint: sets each member's `final`, or its `error` if it diverged. Returns what each epoch did."""
    group = Group(members, data, stop, progress)
    epochs = []
    while group.members:
        epochs.append(group.epoch())
    return epochs


def train_epoch(stepper: Stepper, group: list[Member], data: FashionMNIST, sizes: list[int], epoch: int,
                progress: bool, stop: StopOnSignal | None) -> list[float]:
    """One pass over the training split for every member, each in its own order; returns each member's mean batch
    loss (as the notebook reports). A member whose loss turns non-finite gets its `error` and trains no more."""
    stepper.model.train()
    device, k = data.train_x.device, len(group)
    # each member's own shuffle; members that share a seed share an order, and then one batch serves them all
    orders = data_orders(len(data.train_y), [m.generator for m in group], device)
    shared = bool((orders == orders[:1]).all()) if k > 1 else True
    losses = torch.zeros(k, len(sizes), device=device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sizes), desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr)
    offset = 0
    try:
        for step, size in enumerate(sizes):
            if stop is not None and stop.signum is not None:
                raise Interrupted(stop.signum)
            idx = orders[0, offset: offset + size] if shared else orders[:, offset: offset + size]
            offset += size
            losses[:, step] = stepper(idx)
            if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(sizes):
                if diverged(losses, step, group) and not any(m.running for m in group):
                    break
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return losses.mean(1).tolist()


def diverged(losses: torch.Tensor, step: int, group: list[Member]) -> bool:
    """Check the last CHECK_EVERY steps (one host sync); members with a non-finite loss get their error."""
    window = losses[:, max(0, step + 1 - CHECK_EVERY): step + 1]
    bad = ~torch.isfinite(window)
    if not bad.any():
        return False
    for k in bad.any(1).nonzero().flatten().tolist():
        m = group[k]
        if m.running:
            at = max(0, step + 1 - CHECK_EVERY) + int(bad[k].nonzero()[0])
            m.error = TrainingDiverged(
                f"training diverged: loss is {losses[k, at].item()} at epoch {m.state.epoch + 1}, step {at + 1}; "
                f"lower optimizer.lr (now {m.lr:g}) or add regularization=batchnorm")
    return True


def end_of_epoch(m: Member, metrics: dict, weights: dict, optimizer_state: dict, data: FashionMNIST,
                 jobs: int = 1) -> None:
    """One member's epoch bookkeeping: schedule, best checkpoint, full checkpoint, tracking, early stopping."""
    s, state = m.settings, m.state
    plateau = isinstance(m.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    m.scheduler.optimizer.step()  # the stand-in has no gradient: changes nothing, keeps the schedule's order check
    m.scheduler.step(metrics["valid_loss"]) if plateau else m.scheduler.step()
    epoch = state.epoch + 1
    took = metrics["epoch_time"]  # in a group of `jobs`, each job's share of the group's epoch (its epoch_time)
    log.info("%sEpoch %d/%d | train loss %.3f | valid loss %.3f | valid acc %.3f | lr %.2e | %s",
             m.label, epoch, s.epochs, metrics["train_loss"], metrics["valid_loss"], metrics["valid_acc"],
             metrics["lr"], f"{took:.2f} s" if jobs == 1 else f"{took:.2f} s a job ({jobs} in {took * jobs:.2f} s)")
    value = metrics[s.monitor]
    if _improved(value, state.best, s.monitor, 0.0):  # the best checkpoint is the best epoch, by any margin
        state.best, state.best_epoch = value, epoch
        m.best_weights = weights
        save_atomic(weights, m.checkpoint)
    if _improved(value, state.stop_best, s.monitor, s.min_delta):  # early stopping: improved by more than min_delta
        state.stop_best, state.stale_epochs = value, 0
    else:
        state.stale_epochs += 1
    state.epoch = epoch
    state.history.append({"epoch": epoch, **metrics})
    if m.last is not None:
        save_checkpoint(m, weights, optimizer_state)
    if s.patience is not None and state.stale_epochs >= s.patience:
        by = f" by more than min_delta={s.min_delta:g}" if s.min_delta else ""
        log.info("%sEarly stopping: %s has not improved%s for %d epoch%s (best %.4f at epoch %d)",
                 m.label, s.monitor, by, s.patience, "" if s.patience == 1 else "s", state.best, state.best_epoch)
        finish(m, data)
    elif epoch == s.epochs:
        finish(m, data)


def finish(m: Member, data: FashionMNIST) -> None:
    """Test the member's best checkpoint (in its own plain model) and record its final scores."""
    state, s = m.state, m.settings
    m.model.load_state_dict(m.best_weights)
    test_loss, test_acc = evaluate(m.model, data.test_x, data.test_y, s.eval_batch_size)
    log.info("%sTest (best checkpoint, epoch %d) | loss %.4f | accuracy %.4f",
             m.label, state.best_epoch, test_loss, test_acc)
    at_best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    # the tested checkpoint's own validation scores (not the best of each over all epochs): what a sweep ranks by
    m.final = dict(test_loss=test_loss, test_acc=test_acc, best_epoch=state.best_epoch,
                   ckpt_valid_loss=at_best.get("valid_loss", math.nan),
                   ckpt_valid_acc=at_best.get("valid_acc", math.nan),
                   epochs_run=state.epoch, train_time=sum(h["epoch_time"] for h in state.history))


@torch.no_grad()
def evaluate_stack(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """Each job's mean cross-entropy and accuracy over (x, y), in eval mode; read back once at the end (no host
    sync per batch)."""
    model.eval()
    loss_sum = torch.zeros(model.num_jobs, device=x.device)
    correct = torch.zeros(model.num_jobs, device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        logits, target = model(pixels(x[i: i + batch_size])), y[i: i + batch_size]
        loss_sum += job_losses(logits, target) * len(target)
        correct += (logits.argmax(-1) == target).sum(1)
    return (loss_sum / len(y)).tolist(), (correct.double() / len(y)).tolist()


def save_atomic(obj, path: Path) -> None:
    """torch.save whole or not at all: a crash never leaves a half-written checkpoint."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_checkpoint(m: Member, weights: dict, optimizer_state: dict) -> None:
    """Everything `m` needs to continue after its last completed epoch: weights, optimizer state (torch.optim's
    format), schedule, loop state, best weights so far and its RNG states. Loads with weights_only=True."""
    state = m.state
    save_atomic({
        "model": weights,
        "best_model": m.best_weights,
        "optimizer": optimizer_state,
        "scheduler": m.scheduler.state_dict(),
        "lr": m.lr,  # the next epoch's, as the schedule set it (the schedule's state does not hold it)
        "loop": {"epoch": state.epoch, "best": state.best, "best_epoch": state.best_epoch,
                 "stale_epochs": state.stale_epochs, "stop_best": state.stop_best, "history": state.history},
        "rng": {"generator": m.generator.get_state(), "dropout": m.dropout.get_state(),
                "dropout_device": m.dropout.device.type},
    }, m.last)


def restore_checkpoint(path: Path, m: Member) -> None:
    """Load a full checkpoint into a member built from the same config; its best weights go to m.checkpoint.
    Raises CheckpointMismatch (before anything of the run is touched) when the checkpoint does not fit."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a checkpoint: torch raises RuntimeError, UnpicklingError, EOFError...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointMismatch(f"{path}: not a readable checkpoint ({first}); delete it to resume from the MLflow "
                                 "run's own copy, or start the run anew without train.resume") from None
    try:
        missing = {"model", "optimizer", "scheduler", "lr", "best_model", "loop", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"it has no {', '.join(sorted(missing))}")
        m.model.load_state_dict(ckpt["model"])
        kind = "momentum_buffer" if m.hyper["kind"] == "sgd" else "exp_avg"
        if any(kind not in s for s in ckpt["optimizer"]["state"].values()):
            raise ValueError(f"its optimizer state is not {m.hyper['kind']}'s")
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatch(f"{path}: this checkpoint does not fit the configured model/optimizer ({first}); "
                                 "resume with the same model and optimizer overrides as the original run")
    try:
        m.generator.set_state(ckpt["rng"]["generator"])
    except (KeyError, TypeError):
        raise CheckpointMismatch(f"{path}: it has no data-order state (not a checkpoint of this version); start the "
                                 "run anew without train.resume") from None
    except RuntimeError:
        raise CheckpointMismatch(f"{path}: its data-order state was saved on a GPU by an older version and cannot "
                                 "continue here; resume it on a machine with a GPU (train.device=cuda)")
    m.optimizer_state = ckpt["optimizer"]
    m.scheduler.load_state_dict(ckpt["scheduler"])
    m.scheduler.optimizer.param_groups[0]["lr"] = ckpt["lr"]
    if ckpt["rng"]["dropout_device"] == m.dropout.device.type:
        m.dropout.set_state(ckpt["rng"]["dropout"])
    else:  # resumed on another kind of device: dropout masks continue from a fresh, still seeded stream
        m.dropout.manual_seed(m.dropout.initial_seed() + len(ckpt["loop"]["history"]))
    m.best_weights = ckpt["best_model"]
    save_atomic(m.best_weights, m.checkpoint)
    loop = ckpt["loop"]
    m.state = LoopState(epoch=loop["epoch"], best=loop["best"], best_epoch=loop["best_epoch"],
                        stale_epochs=loop["stale_epochs"], history=list(loop["history"]),
                        stop_best=loop.get("stop_best", loop["best"]))  # checkpoints before it had one best
