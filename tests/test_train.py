"""The training loop on tiny data: best checkpoint, early stopping, schedules, divergence."""
from __future__ import annotations

import pytest
import torch

from fmnist_exp import data, train
from fmnist_exp.models import MLP

CPU = torch.device("cpu")


@pytest.fixture
def tiny(tiny_root):
    return data.load(tiny_root, tiny_root / "none", False, 100, 0, CPU)


def member(tmp_path, kind="adam", lr=1e-2, scheduler=None, **settings) -> train.Member:
    """A group of one, built the way job.build builds it."""
    torch.manual_seed(0)
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return train.Member(
        name="t", model=MLP(hidden=[32, 16]), hyper={"kind": kind, "lr": lr},
        scheduler=(scheduler or (lambda o: torch.optim.lr_scheduler.ConstantLR(o, 1.0, 0)))(stand_in),
        generator=torch.Generator().manual_seed(0), dropout=torch.Generator().manual_seed(0),
        settings=train.LoopSettings(**{"epochs": 4, "batch_size": 50, "eval_batch_size": 64, **settings}),
        checkpoint=tmp_path / "best.pt")


def fit(tiny, tmp_path, optimizer_cls=torch.optim.Adam, lr=1e-2, scheduler=None, **settings):
    kind = {torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}[optimizer_cls]
    m = member(tmp_path, kind, lr, scheduler, **settings)
    history = [epoch.metrics[m] for epoch in train.fit([m], tiny) if m in epoch.metrics]
    if m.error is not None:
        raise m.error
    return m.model, m.final, history


def test_learns_tiny_data_and_tests_the_best_checkpoint(tiny, tmp_path):
    model, final, history = fit(tiny, tmp_path, epochs=6)
    assert len(history) == 6 and all(h["epoch_time"] > 0 for h in history)
    assert final["ckpt_valid_acc"] > 0.9  # the class is written in the image: learnable
    best = min(range(6), key=lambda i: history[i]["valid_loss"])
    assert final["best_epoch"] == best + 1
    # the tested checkpoint's own validation scores, not each one's best over all epochs
    assert (final["ckpt_valid_loss"], final["ckpt_valid_acc"]) == (history[best]["valid_loss"],
                                                                   history[best]["valid_acc"])
    reloaded = MLP(hidden=[32, 16])
    reloaded.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))
    loss, acc = train.evaluate(reloaded, tiny.test_x, tiny.test_y, 64)  # same batches as the loop
    assert (loss, acc) == (final["test_loss"], final["test_acc"])


def test_monitor_valid_acc_keeps_the_most_accurate_epoch(tiny, tmp_path):
    _, final, history = fit(tiny, tmp_path, epochs=5, monitor="valid_acc")
    accs = [h["valid_acc"] for h in history]
    assert final["best_epoch"] == accs.index(max(accs)) + 1
    at_best = history[final["best_epoch"] - 1]
    assert final["ckpt_valid_loss"] == at_best["valid_loss"] and final["ckpt_valid_acc"] == max(accs)


def test_early_stopping_stops_when_the_monitor_stalls(tiny, tmp_path):
    # lr so small the loss moves far less than min_delta: every epoch after the first is "stale"
    _, final, history = fit(tiny, tmp_path, optimizer_cls=torch.optim.SGD, lr=1e-9, epochs=20, patience=2,
                            min_delta=0.5)
    assert len(history) == 3 and final["epochs_run"] == 3
    losses = [h["valid_loss"] for h in history]
    assert final["best_epoch"] == losses.index(min(losses)) + 1  # the best checkpoint ignores min_delta


def test_min_delta_does_not_choose_the_best_checkpoint(tiny, tmp_path):
    _, final, history = fit(tiny, tmp_path, epochs=4, min_delta=10.0)  # no early stopping; every margin < 10
    losses = [h["valid_loss"] for h in history]
    assert losses.index(min(losses)) > 0 and final["best_epoch"] == losses.index(min(losses)) + 1


@pytest.mark.parametrize("make,expected", [
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), [0.01, 0.01, 0.005, 0.005]),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4), [0.01, 0.008536, 0.005, 0.001464]),
])
def test_schedules_set_the_logged_lr(tiny, tmp_path, make, expected):
    _, _, history = fit(tiny, tmp_path, scheduler=make)
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-3)


def test_plateau_schedule_is_stepped_with_valid_loss(tiny, tmp_path):
    make = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0)
    _, _, history = fit(tiny, tmp_path, scheduler=make)  # threshold=10: no epoch counts as better
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])


def test_divergence_stops_with_a_clear_message(tiny, tmp_path):
    with pytest.raises(train.TrainingDiverged) as e:
        fit(tiny, tmp_path, optimizer_cls=torch.optim.SGD, lr=1e12)
    message = str(e.value)
    assert "at epoch 1, step" in message and "lower optimizer.lr (now 1e+12)" in message


@pytest.mark.parametrize("kind,kernel", [("sgd", "_fused_sgd_"), ("adam", "_fused_adam_"), ("adamw", "_fused_adamw_")])
def test_each_step_runs_torchs_fused_optimizer_kernel(tiny, tmp_path, monkeypatch, kind, kernel):
    """One C++ kernel per job and step (CPU and CUDA): no Python loop over parameters, no host sync."""
    calls = []
    real = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m = member(tmp_path, kind, 1e-2, epochs=1)
    train.fit([m], tiny)
    assert m.final is not None and len(calls) == len(train.batch_sizes(len(tiny.train_y), 50))
