"""The machine a job runs on: its device, CPU cores, free memory and torch threads."""
from __future__ import annotations

import os

import torch

from fmnist_exp import config


def pick_device(name: str) -> torch.device:
    """auto = CUDA when there is a GPU, else CPU; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise config.ConfigError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_memory() -> int:
    """Bytes of memory free now (not counting the page cache)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pick_threads(requested: int | None, parallel_jobs: int | None, default: int) -> int:
    """Torch threads: as requested, else the cores shared evenly among parallel jobs, else torch's `default`."""
    if requested:
        return requested
    return max(1, cores() // parallel_jobs) if parallel_jobs else default
