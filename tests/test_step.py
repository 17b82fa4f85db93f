"""The training step replayed as a graph trains exactly as the eager step (step.py).

No GPU here: a CPU double stands in for torch.cuda.CUDAGraph with its semantics (capture records the step and runs
nothing, the replay that follows runs it, every later replay runs it again from the same static tensors), so what
the Stepper does around the graph (warm-up, static batch indices, static losses, a smaller last batch, recapture
after a job leaves the stack, each dropout job's generator registered) is checked here; tests/test_gpu.py runs the
real graph where there is a GPU.
"""
from __future__ import annotations

import logging

import pytest
import torch

from fmnist_exp import data, step, train
from fmnist_exp.models import MLP

CPU = torch.device("cpu")


class ReplayDouble:
    """torch.cuda.CUDAGraph's behaviour on the CPU. Capturing runs fn once (the Stepper's replay right after a capture
    is then the no-op, so each batch is still trained once: a Stepper that skipped that replay, or replayed twice,
    trains on the wrong batches and fails the equality below)."""

    made: list[ReplayDouble] = []

    def __init__(self):
        self.fn = self.out = None
        self.registered, self.replays, self.pending = [], 0, False
        ReplayDouble.made.append(self)

    def register(self, generator):
        self.registered.append(generator)

    def capture(self, fn):
        self.fn, self.out, self.pending = fn, fn(), True
        return self.out

    def replay(self):
        self.replays += 1
        if self.pending:
            self.pending = False
            return
        self.out.copy_(self.fn())


@pytest.fixture
def tiny(tiny_root):
    return data.load(tiny_root, tiny_root / "none", False, 100, 0, CPU)  # 500 training examples


def group(tmp_path, seeds, patience=None) -> list[train.Member]:
    """4 jobs of one architecture: SGD and Adam, dropout in two, BatchNorm in two, a step schedule, one that stops
    early."""
    jobs = [("sgd", 0.05, [0.0, 0.0]), ("adam", 1e-2, [0.3, 0.0]), ("adamw", 1e-2, [0.0, 0.5]), ("adam", 3e-3, [0, 0])]
    tmp_path.mkdir(parents=True, exist_ok=True)
    members = []
    for i, ((kind, lr, dropout), seed) in enumerate(zip(jobs, seeds)):
        torch.manual_seed(seed)
        stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        members.append(train.Member(
            name=f"job{i}", model=MLP(hidden=[32, 16], dropout=dropout, batch_norm=i % 2 == 1),
            hyper={"kind": kind, "lr": lr},
            scheduler=torch.optim.lr_scheduler.StepLR(stand_in, step_size=1, gamma=0.5),
            generator=torch.Generator().manual_seed(seed), dropout=torch.Generator().manual_seed(seed),
            settings=train.LoopSettings(epochs=3, batch_size=48, eval_batch_size=64,  # 10 full batches + 20
                                        patience=1 if i == 3 else patience, min_delta=10.0 if i == 3 else 0.0),
            checkpoint=tmp_path / f"best{i}.pt"))
    return members


def trained(members, tiny):
    histories = {m.name: [] for m in members}
    for epoch in train.fit(members, tiny):
        for m, metrics in epoch.metrics.items():
            histories[m.name].append(dict(metrics, epoch_time=0))
    assert all(m.error is None and m.final is not None for m in members)
    return histories, [m.model.state_dict() for m in members]


@pytest.mark.parametrize("seeds", [(0, 0, 0, 0), (0, 1, 2, 3)], ids=["one batch for all", "a batch per job"])
def test_a_replayed_step_trains_exactly_as_the_eager_step(tmp_path, tiny, monkeypatch, caplog, seeds):
    eager_history, eager_weights = trained(group(tmp_path / "eager", seeds), tiny)
    ReplayDouble.made.clear()
    monkeypatch.setattr(train, "graph_kind", lambda device, enabled: ReplayDouble if enabled else None)
    monkeypatch.setattr(step.Stepper, "captures", 0)
    members = group(tmp_path / "graph", seeds)
    with caplog.at_level(logging.INFO, logger="fmnist_exp.step"):
        graph_history, graph_weights = trained(members, tiny)
    assert graph_history == eager_history  # losses, accuracies and learning rates, to the last bit
    for a, b in zip(graph_weights, eager_weights):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [len(h) for h in graph_history.values()] == [3, 3, 3, 2]  # job3 stopped early: the stack shrank
    first, again = ReplayDouble.made  # a capture for the group of 4, a recapture for the 3 left
    # epoch 1: 3 eager warm-up batches, then replays of the other 7 full ones (the last batch of 20 runs eagerly)
    assert first.replays == 7 + 10 and again.replays == 10 - step.WARMUP_STEPS
    assert first.registered == [members[1].dropout, members[2].dropout] == again.registered  # dropout jobs only
    captured = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(captured) == 1 and "4 jobs" in captured[0]  # the capture cost is logged once


def test_a_graph_sees_each_epochs_learning_rates(tmp_path, tiny, monkeypatch):
    """The schedule halves each job's lr every epoch; the captured step reads the new values without recapture."""
    seen = []
    real = step.step

    def recording(model, optimizer, data_, idx, dropout):
        seen.append(optimizer.lr.clone())
        return real(model, optimizer, data_, idx, dropout)

    monkeypatch.setattr(step, "step", recording)
    monkeypatch.setattr(train, "graph_kind", lambda device, enabled: ReplayDouble)
    ReplayDouble.made.clear()
    members = group(tmp_path, (0, 0, 0, 0), patience=None)[:3]
    for m in members:
        m.settings.epochs = 2
    trained(members, tiny)
    assert len(ReplayDouble.made) == 1  # one capture for both epochs
    assert torch.equal(seen[0], torch.tensor([0.05, 1e-2, 1e-2])) and torch.equal(seen[-1], seen[0] / 2)


def test_cpu_and_disabled_graphs_step_eagerly():
    assert step.graph_kind(torch.device("cpu"), True) is None
    assert step.graph_kind(torch.device("cuda"), False) is None
    assert step.graph_kind(torch.device("cuda"), True) is step.CudaGraph


def test_a_step_that_cannot_be_captured_says_how_to_train_without_graphs(tmp_path, tiny, monkeypatch):
    class Refusing(ReplayDouble):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(train, "graph_kind", lambda device, enabled: Refusing)
    with pytest.raises(step.CaptureFailed, match=r"^capturing the training step as a CUDA graph failed \(operation not "
                                           r"permitted when stream is capturing\); train with train.cuda_graph=false$"):
        train.fit(group(tmp_path, (0, 0, 0, 0)), tiny)
