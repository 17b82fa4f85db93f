"""The hydra/launcher=slurm path through real `sbatch` job arrays on a one-node SLURM cluster on this machine."""
from __future__ import annotations

import time

import pytest

from conftest import run_cli, store_runs, tiny_overrides
from slurm_cluster import SlurmUnavailable, slurm_cluster

# slurm.yaml's defaults (2 CPUs, 4 GB) fit this 2-CPU node one job at a time; one CPU per job runs a sweep's
# jobs side by side, as on a real cluster
FITS_NODE = ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster (munged, slurmctld, slurmd) for this module's tests; stopped afterwards."""
    try:
        with slurm_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")


def test_slurm_sweep_finishes(slurm, tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=slurm", *FITS_NODE, *tiny_overrides(tiny_root), "train.epochs=1",
                     "optimizer=sgd,adam", cwd=tmp_path, timeout=600, env=slurm.env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{out[-3000:]}\n{slurm.jobs()}\n{slurm.log_tails()}"
    runs = store_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 2
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parents[0]["run_uuid"]}
    assert {r["status"] for r in runs} == {"FINISHED"}, out[-3000:]
    assert sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1  # the table, in the submitting process
    assert "/.submitit/" not in "".join(c["tags"]["fmnist.job_dir"] for c in children)
    deadline = time.time() + 30  # an ending job may still show as COMPLETING for a moment
    while slurm.jobs() and time.time() < deadline:
        time.sleep(1)
    assert slurm.jobs() == []  # nothing left queued or running


def children_of_sweep(tmp_path):
    runs = store_runs(tmp_path)
    return [r for r in runs if "mlflow.parentRunId" in r["tags"]], [r for r in runs if "mlflow.parentRunId" not in r["tags"]]


def test_slurm_failing_job_fails_alone(slurm, tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=slurm", *FITS_NODE, *tiny_overrides(tiny_root), "train.epochs=1",
                     "optimizer.lr=0.001,-1", cwd=tmp_path, timeout=600, env=slurm.env)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    children, parents = children_of_sweep(tmp_path)
    assert sorted(c["status"] for c in children) == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c["status"] == "FAILED")
    assert "optimizer.lr=-1" in failed["tags"]["error"]
    assert "1 of 2 jobs failed" in result.stderr and [p["status"] for p in parents] == ["FAILED"]
