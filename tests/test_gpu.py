"""On a GPU: the training step replayed as a CUDA graph trains as the eager step does, and a run says it captured.

Skipped where torch sees no GPU (CI's machine); `bash benchmarks/gpu.sh` runs these first on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli, tiny_overrides
from fmnist_exp import data, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
GPU = torch.device("cuda")


def test_replayed_steps_match_eager_steps_on_the_gpu(tmp_path, tiny_root):
    from test_step import group  # 4 jobs: SGD/Adam/AdamW, dropout and BatchNorm in two, halving lr, an early stop

    tiny = data.load(tiny_root, tiny_root / "none", False, 100, 0, GPU)
    results = {}
    for graph in (False, True):
        members = group(tmp_path / str(graph), (0, 0, 0, 0))
        for m in members:
            m.model.to(GPU)
            m.dropout = torch.Generator(device=GPU).manual_seed(m.dropout.initial_seed())
            m.settings.cuda_graph = graph
        histories = {m.name: [] for m in members}
        for epoch in train.fit(members, tiny):
            for m, metrics in epoch.metrics.items():
                histories[m.name].append(metrics)
        assert all(m.final is not None for m in members)
        results[graph] = histories, [m.model.state_dict() for m in members], [m.dropout.get_state() for m in members]
    (eager, eager_w, eager_rng), (graphed, graphed_w, graphed_rng) = results[False], results[True]
    for name in eager:
        for e, g in zip(eager[name], graphed[name]):
            assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-5)  # dropout masks drawn alike
            assert g["valid_loss"] == pytest.approx(e["valid_loss"], rel=1e-5) and g["lr"] == e["lr"]
    for a, b in zip(graphed_w, eager_w):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(graphed_rng, eager_rng))  # each job's stream advanced alike


@pytest.mark.e2e
def test_a_gpu_run_replays_its_step_and_finishes(tmp_path, tiny_root):
    result = run_cli(*tiny_overrides(tiny_root), "train.device=cuda", "train.epochs=2", "data.batch_size=16",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CUDA graph: the training step of 1 job" in result.stderr + result.stdout
    assert "Test (best checkpoint" in result.stderr + result.stdout
