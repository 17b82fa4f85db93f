"""The hydra/launcher=slurm path through real `sbatch` job arrays on a one-node SLURM cluster on this machine."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from conftest import cli_env, make_tiny_set, run_cli, store_runs, tiny_overrides
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
    assert re.search(r"SLURM job \d+: 0 pending, 0 running, 2 done, 0 failed or lost", out)  # the status line
    assert "Bypassing sacct error" not in out  # no accounting database here: submitit's noise is filtered
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


def test_a_request_no_node_can_meet_stops_the_sweep_with_one_line(slurm, tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=64",
                     *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam", cwd=tmp_path, timeout=300,
                     env=slurm.env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "SLURM will not start these jobs: they wait for PartitionConfig" in last
    assert "cpus_per_task=64" in last and "lower hydra.launcher.cpus_per_task" in last
    runs = store_runs(tmp_path)
    assert [r["status"] for r in runs] == ["KILLED"]  # the parent only, ended with its reason, never RUNNING
    assert slurm.jobs() == []  # cancelled, not left pending


def test_scancel_ends_runs_killed_and_skip_finished_completes_the_sweep(slurm, tmp_path):
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)  # seconds per epoch at batch 16: room to cancel
    args = ["-m", "hydra/launcher=slurm", *FITS_NODE, *tiny_overrides(root), "data.batch_size=16", "train.epochs=5",
            "optimizer=sgd,adam"]
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(slurm.env))
    deadline = time.time() + 300
    while time.time() < deadline:  # both jobs are training
        logs = list((tmp_path / "multirun").glob("*/*/*/fmnist_exp.log"))
        if len(logs) == 2 and all("Training:" in p.read_text() for p in logs):
            break
        time.sleep(0.5)
    slurm.cancel_all()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    children, parents = children_of_sweep(tmp_path)
    assert len(children) == 2 and {c["status"] for c in children} == {"KILLED"}, out[-3000:]
    assert all(c["tags"]["error"] == "interrupted by SIGTERM" for c in children)
    assert [p["status"] for p in parents] == ["FAILED"]  # the sweep ended with its table, not waiting forever
    assert "2 of 2 jobs failed" in out and "0 pending, 0 running, 0 done, 2 failed or lost" in out
    result = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600, env=slurm.env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 2 and all("FINISHED" in line for line in table)
