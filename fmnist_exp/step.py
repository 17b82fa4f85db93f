"""One training step of a stacked group (gather the batch, forward, backward, optimizer), run eagerly, or on a GPU
captured once as a CUDA graph and replayed for every full batch.

On an H200 an eager step of the notebook MLP costs ~1.2 ms at any batch size, nearly all of it kernel launches;
replayed as a graph the same step costs 0.14-0.18 ms (issue 10). Everything a step reads stays at one address
(parameters, gradients, optimizer state, per-job learning rates and step counts on the device, the batch indices
in a static tensor), so a replay is exactly the eager step: schedules change a job's lr between epochs without a
recapture, and each job's dropout generator is registered with the graph, so replay i draws what eager step i would.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from fmnist_exp.data import FashionMNIST, pixels
from fmnist_exp.stacked import StackedModel, StackedOptimizer, job_losses

log = logging.getLogger(__name__)


class CaptureFailed(RuntimeError):
    """The training step could not be captured as a CUDA graph (the run can train without: train.cuda_graph=false)."""


WARMUP_STEPS = 3  # eager steps (real batches) on a side stream before capture, as torch's whole-network example does


def step(model: StackedModel, optimizer: StackedOptimizer, data: FashionMNIST, idx: torch.Tensor,
         dropout: list[torch.Generator]) -> torch.Tensor:
    """Train every job on one batch: idx (B,) is one batch all jobs share, (K, B) a batch per job. Returns each
    job's loss on it, shape (K,)."""
    if idx.dim() == 1:  # index_select, not x[idx]: the same rows, ~6x faster than advanced indexing on a 4-d tensor
        x, y = data.train_x.index_select(0, idx), data.train_y.index_select(0, idx)
    else:
        flat = idx.reshape(-1)
        x = data.train_x.index_select(0, flat).view(*idx.shape, *data.train_x.shape[1:])
        y = data.train_y.index_select(0, flat).view(idx.shape)
    losses = job_losses(model(pixels(x), dropout), y)
    optimizer.zero_grad()
    losses.sum().backward()  # each job's gradient is its own loss's: the sum does not mix them
    optimizer.step()
    return losses.detach()


class CudaGraph:
    """torch.cuda.CUDAGraph as the Stepper uses it (tests stand in a CPU double with the same four methods)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def register(self, generator: torch.Generator) -> None:
        self.graph.register_generator_state(generator)

    def capture(self, fn):
        """Record fn's kernels (nothing runs: the replay that follows does) and return its static output."""
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def graph_kind(device: torch.device, enabled: bool):
    """What replays a group's step on this device: CudaGraph on CUDA when enabled, else None (eager)."""
    return CudaGraph if enabled and device.type == "cuda" else None


class Stepper:
    """A group's training step: eager, or with `graph` (CudaGraph) the first WARMUP_STEPS full batches run eagerly on
    a side stream, the next one is captured, and every full batch after replays it (a smaller last batch runs
    eagerly). Built anew whenever the stack changes (a job leaves it): a graph holds its tensors' addresses."""

    captures = 0  # per process: the capture cost is logged once, at INFO

    def __init__(self, model: StackedModel, optimizer: StackedOptimizer, data: FashionMNIST,
                 dropout: list[torch.Generator], graph=None):
        self.model, self.optimizer, self.data, self.dropout, self.graph_type = model, optimizer, data, dropout, graph
        self.graph = self.static_idx = self.static_losses = None
        self.shape: torch.Size | None = None  # the full batch's index shape, the one the graph takes
        self.warm = 0

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """Train on the batch `idx` (see `step`); the returned losses are valid until the next call."""
        if self.graph_type is None:
            return step(self.model, self.optimizer, self.data, idx, self.dropout)
        if self.shape is None:
            self.shape = idx.shape
        if idx.shape != self.shape:
            return step(self.model, self.optimizer, self.data, idx, self.dropout)
        if self.graph is None:
            if self.warm < WARMUP_STEPS:
                self.warm += 1
                with self._side_stream():
                    return step(self.model, self.optimizer, self.data, idx, self.dropout)
            self._capture(idx)
        self.static_idx.copy_(idx)
        self.graph.replay()
        return self.static_losses

    @contextlib.contextmanager
    def _side_stream(self):
        if self.data.train_x.device.type != "cuda":
            yield
            return
        side, current = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def _capture(self, idx: torch.Tensor) -> None:
        start = time.perf_counter()
        graph = self.graph_type()
        dropping = {k for ps in self.model.dropout.values() for k, p in enumerate(ps) if p > 0}
        for k in sorted(dropping):  # a replay then advances each job's own stream as its eager step would
            graph.register(self.dropout[k])
        self.static_idx = idx.clone()
        self.optimizer.zero_grad()  # the captured backward allocates the gradients it then rewrites every replay
        try:
            self.static_losses = graph.capture(
                lambda: step(self.model, self.optimizer, self.data, self.static_idx, self.dropout))
        except RuntimeError as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CaptureFailed(f"capturing the training step as a CUDA graph failed ({why}); "
                               "train with train.cuda_graph=false") from e
        self.graph = graph
        Stepper.captures += 1
        log.log(logging.INFO if Stepper.captures == 1 else logging.DEBUG,
                "CUDA graph: the training step of %d job%s (batch %s) captured in %.0f ms after %d eager steps; "
                "replayed for every full batch", self.model.num_jobs, "s" * (self.model.num_jobs != 1),
                "x".join(map(str, idx.shape)), 1000 * (time.perf_counter() - start), WARMUP_STEPS)
