"""Stacked training equals training each job alone: optimizer, forward, BatchNorm stats, state dicts, dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmnist_exp.models import CNN, MLP
from fmnist_exp.stacked import StackedModel, StackedOptimizer, job_losses

HYPER = [  # kinds interleaved on purpose: one optimizer serves them all
    dict(kind="sgd", lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False),
    dict(kind="adam", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8),
    dict(kind="sgd", lr=0.05, weight_decay=1e-3, momentum=0.9, nesterov=True),
    dict(kind="adamw", lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    dict(kind="adam", lr=3e-3, weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
    dict(kind="sgd", lr=0.02, weight_decay=0.0, momentum=0.5, nesterov=False),
]


def torch_optimizer(params, h: dict) -> torch.optim.Optimizer:
    """The job's optimizer as a single run builds it (non-fused reference implementation)."""
    if h["kind"] == "sgd":
        return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                               weight_decay=h["weight_decay"], foreach=False)
    cls = torch.optim.Adam if h["kind"] == "adam" else torch.optim.AdamW
    return cls(params, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], foreach=False)


def max_diff(stacked: list[torch.Tensor], alone: list[list[torch.Tensor]]) -> list[float]:
    """Per job, the largest difference between its slice of the stacked tensors and its own tensors."""
    return [max(float((s.detach()[k] - a.detach()).abs().max()) for s, a in zip(stacked, job))
            for k, job in enumerate(alone)]


def test_optimizer_equals_torch_optim_job_by_job():
    k, g = len(HYPER), torch.Generator().manual_seed(0)
    params = [torch.randn(k, 7, 5, generator=g).requires_grad_(), torch.randn(k, 5, generator=g).requires_grad_()]
    alone = [[p[j].detach().clone().requires_grad_() for p in params] for j in range(k)]
    start = [p.detach().clone() for p in params]
    opt = StackedOptimizer(params, HYPER)
    refs = [torch_optimizer(ps, h) for ps, h in zip(alone, HYPER)]
    for step in range(100):
        if step == 50:  # a schedule changes every job's lr between epochs
            for j, ref in enumerate(refs):
                opt.set_lr(j, opt.lr_of(j) * 0.3)
                ref.param_groups[0]["lr"] *= 0.3
        for j, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            for job in range(k):
                alone[job][j].grad = p.grad[job].clone()
        opt.step()
        for ref in refs:
            ref.step()
    diffs = max_diff(params, alone)
    assert max(diffs) <= 1e-6, diffs
    assert min(max_diff(start, alone)) > 1e-2  # every job moved
    assert opt.lr_of(0) == pytest.approx(0.03) and float(opt.lr[0]) == pytest.approx(0.03)


def test_optimizer_state_round_trips_through_torch_optim_and_select():
    k, g = len(HYPER), torch.Generator().manual_seed(1)
    params = [torch.randn(k, 4, 3, generator=g).requires_grad_()]
    opt = StackedOptimizer(params, HYPER)
    for _ in range(5):
        params[0].grad = torch.randn(params[0].shape, generator=g)
        opt.step()
    # Each job's state resumes in its own torch.optim optimizer ...
    alone = [[params[0][j].detach().clone().requires_grad_()] for j in range(k)]
    refs = [torch_optimizer(ps, h) for ps, h in zip(alone, HYPER)]
    for j, ref in enumerate(refs):
        ref.load_state_dict(opt.job_state(j))
    # ... and in a stacked optimizer of fewer jobs: through select, or a fresh one that loads torch.optim's state.
    keep = [4, 1, 2]
    kept, loaded = ([params[0].detach()[keep].clone().requires_grad_()] for _ in range(2))
    small, fresh = opt.select(keep, kept), StackedOptimizer(loaded, [HYPER[j] for j in keep])
    for i, j in enumerate(keep):
        fresh.load_job_state(i, refs[j].state_dict())
    for _ in range(3):
        params[0].grad = torch.randn(params[0].shape, generator=g)
        kept[0].grad, loaded[0].grad = params[0].grad[keep].clone(), params[0].grad[keep].clone()
        for j in range(k):
            alone[j][0].grad = params[0].grad[j].clone()
        for o in (opt, small, fresh, *refs):
            o.step()
    assert max(max_diff(params, alone)) <= 1e-6
    assert max(max_diff(kept, [alone[j] for j in keep])) <= 1e-6
    assert max(max_diff(loaded, [alone[j] for j in keep])) <= 1e-6
    assert [h["kind"] for h in small.hyper] == ["adam", "adam", "sgd"]


CASES = {
    "mlp": (MLP, dict(hidden=[32, 16])),
    "mlp_bn": (MLP, dict(hidden=[32, 16], batch_norm=True)),
    "cnn": (CNN, dict(channels=[4, 8], hidden=[16])),
    "cnn_bn": (CNN, dict(channels=[4, 8], hidden=[16], batch_norm=True)),
}


def step_both(stacked, opt, models, refs, x, y) -> None:
    """One step of the stack and of each model alone (its torch.optim optimizer) on the same batch: x (B, ...) and
    y (B,) shared, or one per job in front."""
    opt.zero_grad()
    job_losses(stacked(x), y).sum().backward()
    opt.step()
    for k, (m, ref) in enumerate(zip(models, refs)):
        ref.zero_grad()
        F.cross_entropy(m(x if x.dim() == 4 else x[k]), y if y.dim() == 1 else y[k]).backward()
        ref.step()


def assert_jobs_are_their_models(stacked, models) -> None:
    """Each job's slice of the stack is its model's state dict: the same keys, the same values within 1e-5."""
    for k, m in enumerate(models):
        mine, theirs = stacked.job_state_dict(k), m.state_dict()
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-5, msg=f"job {k} {key}")


def seeded_models(cls, kwargs, seeds=(0, 1, 2)):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(cls(**kwargs))
    return models


@pytest.mark.parametrize("case", CASES)
def test_stacked_forward_and_training_equal_each_model_alone(case):
    cls, kwargs = CASES[case]
    models = seeded_models(cls, kwargs)
    stacked = StackedModel.from_models(models)
    g = torch.Generator().manual_seed(2)
    x, xs = torch.rand(6, 1, 28, 28, generator=g), torch.rand(3, 6, 1, 28, 28, generator=g)
    for train in (True, False):  # train: batch statistics (and running-stat updates on both sides)
        stacked.train(train)
        for m in models:
            m.train(train)
        shared, per_job = stacked(x), stacked(xs)
        assert shared.shape == per_job.shape == (3, 6, 10)
        for k, m in enumerate(models):
            torch.testing.assert_close(shared[k], m(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(per_job[k], m(xs[k]), rtol=0, atol=1e-5)
    stacked.train()
    for m in models:
        m.train()
    hyper = [dict(kind="sgd", lr=0.1, weight_decay=1e-3, momentum=0.9, nesterov=False)] * 3
    opt = StackedOptimizer(list(stacked.parameters()), hyper)
    refs = [torch_optimizer(m.parameters(), h) for m, h in zip(models, hyper)]
    for step in range(3):
        xs, y = torch.rand(3, 8, 1, 28, 28, generator=g), torch.randint(0, 10, (3, 8), generator=g)
        step_both(stacked, opt, models, refs, *((x[:4], y[0, :4]) if step == 1 else (xs, y)))  # shared, per job
    assert_jobs_are_their_models(stacked, models)
    initial = seeded_models(cls, kwargs)[0].fc1.weight.detach()
    assert float((stacked.job_state_dict(0)["fc1.weight"] - initial).abs().max()) > 0  # training moved it


@pytest.mark.parametrize("case", ["mlp_bn", "cnn_bn"])
def test_job_state_dict_loads_strict_and_select_keeps_the_right_jobs(case):
    cls, kwargs = CASES[case]
    models = seeded_models(cls, kwargs, seeds=(0, 1, 2, 3))
    stacked = StackedModel.from_models(models)
    x = torch.rand(5, 1, 28, 28)
    stacked(x)  # moves the BatchNorm running stats away from their initial values
    stacked.eval()
    out = stacked(x)
    for k in range(4):
        alone = cls(**kwargs)
        alone.load_state_dict(stacked.job_state_dict(k), strict=True)
        torch.testing.assert_close(alone.eval()(x), out[k], rtol=0, atol=1e-5)
    kept = stacked.select([3, 1])
    assert kept.num_jobs == 2 and not kept.training
    torch.testing.assert_close(kept(x), out[[3, 1]], rtol=0, atol=1e-6)
    assert kept.job_state_dict(0).keys() == stacked.job_state_dict(3).keys()
    assert all(torch.equal(v, stacked.job_state_dict(1)[key]) for key, v in kept.job_state_dict(1).items())
    kept.load_job_state_dict(0, models[0].state_dict())  # a fresh copy of job 0's initial weights
    torch.testing.assert_close(kept(x)[0], models[0].eval()(x), rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="missing"):
        kept.load_job_state_dict(1, {"fc1.weight": models[0].fc1.weight})


@pytest.mark.parametrize("cls, kwargs", [(MLP, dict(hidden=[32, 16])), (CNN, dict(channels=[4, 8], hidden=[16]))],
                         ids=["mlp", "cnn"])
def test_jobs_with_and_without_batchnorm_stack_and_each_trains_as_alone(cls, kwargs):
    """BatchNorm is a per-job switch: jobs without it keep their activations (and gradients) exactly, own no
    BatchNorm parameters, and their state dicts and optimizer states are their own models' ones."""
    drop = [0.3] + [0.0] * (len(kwargs["hidden"]) - 1)
    variants = [dict(), dict(batch_norm=True), dict(dropout=drop), dict(batch_norm=True, dropout=[0.5, *drop[1:]])]
    models = []
    for seed, extra in enumerate(variants):
        torch.manual_seed(seed)
        models.append(cls(**kwargs, **extra))
    stacked = StackedModel.from_models(models)
    assert stacked.dropout == {"dropout1": [0.0, 0.0, 0.3, 0.5]}  # after relu1, with or without bn1 before it
    assert [name for name, _, _ in stacked.plan if name in ("fc1", "bn1", "relu1", "dropout1")] == \
        ["fc1", "bn1", "relu1", "dropout1"]
    for m in models[2:]:  # the training below compares without dropout masks (per-job dropout: tests below)
        m.dropout1.p = 0.0
    stacked = StackedModel.from_models(models)
    assert stacked.normalised == {name: [False, True, False, True] for name, kind, _ in stacked.plan if kind == "bn"}
    owners = stacked.param_owners()
    assert [sum(own) for own in owners] == [len(list(m.parameters())) for m in models]
    # SGD for the BatchNorm jobs: Adam turns the ~0 gradient of a bias before BatchNorm (rounding noise) into steps
    hyper = [HYPER[1], HYPER[2], HYPER[3], HYPER[5]]
    opt = StackedOptimizer(list(stacked.parameters()), hyper, owners)
    refs = [torch_optimizer(m.parameters(), h) for m, h in zip(models, hyper)]
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        xs, y = torch.rand(4, 8, 1, 28, 28, generator=g), torch.randint(0, 10, (4, 8), generator=g)
        step_both(stacked, opt, models, refs, *((xs[0], y[0]) if step % 2 else (xs, y)))  # shared, per job
    assert_jobs_are_their_models(stacked, models)
    for k, m in enumerate(models):
        mine, state = stacked.job_state_dict(k), opt.job_state(k)
        assert len(state["state"]) == len(list(m.parameters()))
        torch_optimizer(m.parameters(), hyper[k]).load_state_dict(state)  # its own optimizer takes it as it is
        cls(**kwargs, **variants[k]).load_state_dict(mine, strict=True)
    loaded = StackedOptimizer([p.detach().clone() for p in stacked.parameters()], hyper, owners)
    for k in range(4):  # a resumed group loads each job's own state into the stack
        loaded.load_job_state(k, opt.job_state(k))
        pairs = zip(loaded.job_state(k)["state"].values(), opt.job_state(k)["state"].values())
        for i, (mine, theirs) in enumerate(pairs):
            assert mine.keys() == theirs.keys(), (k, i)
            assert all(mine[key] is theirs[key] is None or torch.equal(mine[key], theirs[key]) for key in mine), (k, i)
    # jobs without BatchNorm left alone in a stack skip its layers; the ones kept keep their weights and state
    plain = stacked.select([2, 0])
    assert plain.normalised == {name: [False, False] for name in stacked.normalised}
    x = torch.rand(5, 1, 28, 28, generator=g)
    torch.testing.assert_close(plain.eval()(x), torch.stack([models[2].eval()(x), models[0].eval()(x)]),
                               rtol=0, atol=1e-5)
    small = opt.select([2, 0], list(plain.parameters()))
    assert small.job_state(0)["state"].keys() == opt.job_state(2)["state"].keys()
    assert StackedModel.from_models([models[1], models[3]]).normalised == {}  # all with BatchNorm: no masks


def test_architectures_that_differ_do_not_stack():
    bn = MLP(batch_norm=True)
    bn.bn2.momentum = 0.2
    with pytest.raises(ValueError, match=r"job 2 differs from job 1 at layer 5: "
                                         r"bn2 bn shape=\('BatchNorm1d', 64\) momentum=0.2 eps=1e-05 vs "
                                         r"bn2 bn shape=\('BatchNorm1d', 64\) momentum=0.1 eps=1e-05"):
        StackedModel.from_models([MLP(), MLP(batch_norm=True), bn])
    with pytest.raises(ValueError, match=r"job 1 differs from job 0 at layer 3: "
                                         r"fc2 linear shape=\(128, 32\) vs fc2 linear shape=\(128, 64\)"):
        StackedModel.from_models([MLP(), MLP(hidden=[128, 32])])
    with pytest.raises(ValueError, match="job 1 is a CNN, job 0 a MLP"):
        StackedModel.from_models([MLP(), CNN()])
    with pytest.raises(ValueError, match="differs"):
        StackedModel.from_models([CNN(channels=[4, 8]), CNN(channels=[4, 16])])


def dropout_probe(dropout):
    """An MLP whose logits are its dropout layer's output: every hidden unit is 1 before dropout."""
    model = MLP(hidden=[10], dropout=dropout)
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(1.0)
        model.fc2.weight.copy_(torch.eye(10))
        model.fc2.bias.zero_()
    return model


def test_dropout_probability_is_per_job_and_reproducible():
    stacked = StackedModel.from_models([dropout_probe([0.5]), dropout_probe([]), dropout_probe([0.2])])
    assert stacked.dropout == {"dropout1": [0.5, 0.0, 0.2]}
    x = torch.rand(300, 1, 28, 28)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    out = stacked(x, gens)
    zeros = (out == 0).float().mean(dim=(1, 2))
    assert 0.45 < zeros[0] < 0.55 and zeros[1] == 0 and 0.15 < zeros[2] < 0.25
    torch.testing.assert_close(out[0][out[0] != 0], torch.full_like(out[0][out[0] != 0], 2.0))  # kept units x 1/(1-p)
    torch.testing.assert_close(out[1], torch.ones_like(out[1]))
    again = stacked(x, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    assert torch.equal(out, again)
    assert not torch.equal(out, stacked(x, [torch.Generator().manual_seed(s) for s in (20, 11, 12)]))
    assert torch.equal(stacked.eval()(x), torch.ones(3, 300, 10))
    assert stacked.select([1, 0]).dropout == {"dropout1": [0.0, 0.5]}


def test_a_diverged_job_leaves_the_others_untouched():
    models = seeded_models(MLP, dict(hidden=[32, 16], batch_norm=True))
    stacked = StackedModel.from_models(models)
    broken = {key: torch.full_like(v, float("nan")) if v.is_floating_point() else v
              for key, v in models[1].state_dict().items()}
    stacked.load_job_state_dict(1, broken)
    # SGD: Adam would turn the bias before BatchNorm's ~0 gradient (rounding noise) into full-size steps
    hyper = [dict(kind="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=False)] * 3
    opt = StackedOptimizer(list(stacked.parameters()), hyper)
    refs = [torch_optimizer(m.parameters(), h) for m, h in zip(models, hyper)]
    g = torch.Generator().manual_seed(3)
    for x in (torch.rand(3, 8, 1, 28, 28, generator=g), torch.rand(8, 1, 28, 28, generator=g)):
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        losses = job_losses(stacked(x), y)
        losses.sum().backward()
        opt.step()
        assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
        for k in (0, 2):
            refs[k].zero_grad()
            F.cross_entropy(models[k](x[k] if x.dim() == 5 else x), y).backward()
            refs[k].step()
    for k in (0, 2):
        for key, v in models[k].state_dict().items():
            torch.testing.assert_close(stacked.job_state_dict(k)[key], v, rtol=0, atol=1e-5, msg=f"job {k} {key}")
