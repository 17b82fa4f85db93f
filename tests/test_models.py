"""Model shapes for every init/BatchNorm/dropout combination, dropout off in eval(), He init, a pinned loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fmnist_exp.models import CNN, MLP, summary

INITS = ["default", "he", "xavier", "zeros", "normal"]


@pytest.mark.parametrize("cls", [MLP, CNN])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("dropout", [[], [0.5, 0.2]])
def test_output_shape(cls, init, batch_norm, dropout):
    model = cls(init=init, batch_norm=batch_norm, dropout=dropout)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules()) == bool(dropout)


def test_mlp_is_the_notebook_network():
    model = MLP()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 128), (128, 64), (64, 10)]
    assert sum(p.numel() for p in model.parameters()) == 109386  # the notebook's torchsummary total


def test_eval_turns_dropout_off():
    torch.manual_seed(0)
    model = MLP(dropout=[0.5, 0.2])
    x = torch.rand(8, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))  # the notebook's F.dropout stayed on like this
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_he_init_is_kaiming_normal_fan_out():
    torch.manual_seed(0)
    fc1 = MLP(hidden=[512, 512], init="he")[1]
    assert math.isclose(float(fc1.weight.detach().std()), math.sqrt(2 / 512), rel_tol=0.05)  # fan_out = 512 rows
    zeros = MLP(init="zeros")
    assert all(float(p.detach().abs().sum()) == 0 for n, p in zeros.named_parameters() if n.startswith("fc"))


def test_summary_lists_layers_shapes_and_counts():
    text = summary(CNN(batch_norm=True))
    assert "conv1 (Conv2d)" in text and "[1, 16, 28, 28]" in text and "conv_bn1 (BatchNorm2d)" in text
    assert f"Total params: {sum(p.numel() for p in CNN(batch_norm=True).parameters()):,}" in text


def test_pinned_loss():
    """Five fixed-seed Adam steps on fixed data give a known loss (float64, so any BLAS agrees)."""
    torch.manual_seed(0)
    model = MLP(hidden=[32, 16], init="he", batch_norm=True, dropout=[0.5, 0.2]).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.testing.assert_close(loss.item(), 2.1594474484776374, rtol=1e-9, atol=0)
    torch.testing.assert_close(F.cross_entropy(model(x), y).item(), 1.9800808482597223, rtol=1e-9, atol=0)
