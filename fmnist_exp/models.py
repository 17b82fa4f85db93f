"""The notebook's MLP (with its init / BatchNorm / dropout variants) and a small CNN, plus a layer summary."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _head(in_features: int, hidden: list[int], batch_norm: bool, dropout: list[float]) -> OrderedDict:
    """Linear -> (BatchNorm1d) -> ReLU -> (Dropout) per hidden layer, then Linear to 10 classes."""
    layers, width = OrderedDict(), in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm1d(h)
        layers[f"relu{i}"] = nn.ReLU()
        if dropout and dropout[i - 1] > 0:
            layers[f"dropout{i}"] = nn.Dropout(dropout[i - 1])  # nn.Dropout: eval() turns it off
        width = h
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, 10)
    return layers


def initialize(model: nn.Module, init: str, std: float = 0.01) -> None:
    """Re-initialise Linear/Conv weights: he (kaiming_normal_, fan_out, relu, as the notebook), xavier, zeros,
    normal."""
    if init == "default":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if init == "he":
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(m.weight)
        elif init == "zeros":  # every unit gets the same gradient: the notebook's cautionary example
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        elif init == "normal":
            nn.init.normal_(m.weight, mean=0.0, std=std)
        else:
            raise ValueError(f"unknown init {init!r}")


class MLP(nn.Sequential):
    """784 -> hidden... -> 10 with ReLU; the notebook's FMNIST_DNN with hidden=[128, 64]."""

    def __init__(self, hidden: list[int] = (128, 64), init: str = "default", init_std: float = 0.01,
                 batch_norm: bool = False, dropout: list[float] = ()):
        layers = OrderedDict(flatten=nn.Flatten())
        layers.update(_head(28 * 28, list(hidden), batch_norm, list(dropout)))
        super().__init__(layers)
        initialize(self, init, init_std)


class CNN(nn.Sequential):
    """[conv3x3 -> (BN) -> ReLU -> maxpool2] per entry of `channels`, then the MLP head."""

    def __init__(self, channels: list[int] = (16, 32), hidden: list[int] = (128, 64), init: str = "default",
                 init_std: float = 0.01, batch_norm: bool = False, dropout: list[float] = ()):
        layers, c_in, side = OrderedDict(), 1, 28
        for i, c in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(c_in, c, kernel_size=3, padding=1)
            if batch_norm:
                layers[f"conv_bn{i}"] = nn.BatchNorm2d(c)
            layers[f"conv_relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            c_in, side = c, side // 2
        layers["flatten"] = nn.Flatten()
        layers.update(_head(c_in * side * side, list(hidden), batch_norm, list(dropout)))
        super().__init__(layers)
        initialize(self, init, init_std)


def summary(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> str:
    """A torchsummary-style table: each layer, its output shape and parameter count, and the totals."""
    rows, hooks = [], []
    for name, module in model.named_children():
        def hook(mod, inp, out, name=name):
            rows.append((name, type(mod).__name__, list(out.shape), sum(p.numel() for p in mod.parameters())))
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    width = max(len(f"{n} ({t})") for n, t, _, _ in rows) + 2
    lines = [f"{'Layer (type)':<{width}}{'Output Shape':<22}{'Param #':>10}", "=" * (width + 32)]
    lines += [f"{f'{n} ({t})':<{width}}{str(s):<22}{c:>10,}" for n, t, s, c in rows]
    lines += ["=" * (width + 32), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


def load_best(model_cfg, job_dir: Path) -> nn.Module:
    """The model a job's config describes (its `model` node), with the job's best weights, on the CPU, in eval mode."""
    from hydra.utils import instantiate
    model = instantiate(model_cfg)
    model.load_state_dict(torch.load(Path(job_dir) / "best_model.pt", map_location="cpu", weights_only=True))
    return model.eval()


def export_best(model_cfg, job_dir: Path, example: np.ndarray) -> tuple[Path, np.ndarray]:
    """A job's best model (load_best) exported to `job_dir`/model.pt2 (export): the path and its output."""
    path = Path(job_dir) / "model.pt2"
    return path, export(load_best(model_cfg, job_dir), example, path)


def export(model: nn.Module, example: np.ndarray, path: Path) -> np.ndarray:
    """Save `model` as a `torch.export` graph at `path` (what store.log_model logs as an MLflow model), its batch
    dimension dynamic, as mlflow.pytorch does; returns the model's output for `example` (for the signature)."""
    inputs = torch.from_numpy(example)
    with torch.no_grad():
        output = model.eval()(inputs).numpy()
    graph = torch.export.export(model, (inputs,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(graph, str(path))
    return output
