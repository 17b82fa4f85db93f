"""The hydra/launcher=slurm path through real `sbatch` job arrays on a one-node SLURM cluster on this machine."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fmnist_exp import models

from conftest import cli_env, make_tiny_set, run_cli, store_runs, tiny_overrides
from slurm_cluster import SlurmUnavailable, slurm_cluster

# slurm.yaml's defaults (2 CPUs, 4 GB) fit this 2-CPU node one job at a time; one CPU per job runs a sweep's
# jobs side by side, as on a real cluster
FITS_NODE = ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"]


# the CLI as a user types it; `cluster` comes with the slurm fixture (conftest); under pytest-xdist (make test) the
# module runs in one worker, so its cluster starts once
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster (munged, slurmctld, slurmd) for this module's tests; stopped afterwards."""
    try:
        with slurm_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")


def test_slurm_sweep_finishes(slurm, tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=slurm", *FITS_NODE, "hydra.launcher.fuse=false", *tiny_overrides(tiny_root),
                     "train.epochs=1", "optimizer=sgd,adam", cwd=tmp_path, timeout=600, env=slurm.env)
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
    # the status line: one task per job (fuse=false)
    assert re.search(r"SLURM job \d+: tasks 0 pending, 0 running; jobs 2 of 2 done, 0 failed or lost", out)
    assert "fused group" not in out
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


def start_training_sweep(slurm, tmp_path):
    """A 2-job SLURM sweep (one fused task) slow enough to stop: (its args, its process) once both jobs train."""
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)  # seconds per epoch at batch 16: room to stop it
    args = ["-m", "hydra/launcher=slurm", *FITS_NODE, *tiny_overrides(root), "data.batch_size=16", "train.epochs=5",
            "optimizer=sgd,adam"]
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(slurm.env))
    wait_for_log(tmp_path, r"Epoch 1/5", 2, proc)  # both jobs of the fused task are training
    return args, proc


def assert_the_rerun_finishes_it(slurm, tmp_path, args) -> None:
    result = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600, env=slurm.env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 2 and all("FINISHED" in line for line in table)


def test_scancel_ends_runs_killed_and_skip_finished_completes_the_sweep(slurm, tmp_path):
    args, proc = start_training_sweep(slurm, tmp_path)
    slurm.cancel_all()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    children, parents = children_of_sweep(tmp_path)
    assert len(children) == 2 and {c["status"] for c in children} == {"KILLED"}, out[-3000:]
    assert all(c["tags"]["error"] == "interrupted by SIGTERM" for c in children)
    assert [p["status"] for p in parents] == ["FAILED"]  # the sweep ended with its table, not waiting forever
    assert "2 of 2 jobs failed" in out and "tasks 0 pending, 0 running; jobs 0 of 2 done, 2 failed or lost" in out
    assert_the_rerun_finishes_it(slurm, tmp_path, args)


def test_ctrl_c_to_a_slurm_sweep_stops_its_tasks_and_skip_finished_completes_it(slurm, tmp_path):
    """Ctrl-C to the watching process said 'stopped before any job started: nothing was recorded' and exited,
    while the array trained on, unwatched, and its runs then finished under a KILLED parent. Now it cancels the
    array once: each job ends KILLED with its checkpoint, the parent KILLED, exit 130, and the rerun finishes it."""
    args, proc = start_training_sweep(slurm, tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "nothing was recorded" not in out
    assert "Sweep stopped by SIGINT: its unfinished jobs are KILLED with their last epoch's checkpoint" in out
    assert [j for j in slurm.jobs() if j.split()[1] in ("PENDING", "RUNNING")] == []  # nothing left training
    children, parents = children_of_sweep(tmp_path)
    assert len(children) == 2 and {c["status"] for c in children} == {"KILLED"}, out[-3000:]
    assert [p["status"] for p in parents] == ["KILLED"] and "stopped by SIGINT" in parents[0]["tags"]["error"]
    assert_the_rerun_finishes_it(slurm, tmp_path, args)


def test_a_task_killed_whole_leaves_no_running_run_and_counts_each_job_once(slurm, tmp_path):
    """SIGKILL to every process of a task at once (a lost node, a job's cgroup killed whole): its jobs' tracking
    processes die with them, so nothing ends their runs. The sweep's end does: each run KILLED with the reason the
    launcher recorded, never RUNNING, and each job counted once (it was once by its run and once by its dir)."""
    args, proc = start_training_sweep(slurm, tmp_path)
    task = slurm.jobs()[0].split()[0]
    pids = [int(line.split()[0]) for line in slurm.run("scontrol", "listpids", task).stdout.splitlines()[1:]]
    assert len(pids) >= 3, pids  # at least the batch shell, the task's python and its tracking process
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    children, parents = children_of_sweep(tmp_path)
    assert len(children) == 2 and {c["status"] for c in children} == {"KILLED"}, out[-3000:]
    assert all(c["tags"]["error"].startswith(f"SLURM job {task} ended without a result") for c in children), \
        [c["tags"]["error"] for c in children]
    assert [p["status"] for p in parents] == ["FAILED"]
    assert "2 of 2 jobs failed" in out, out[-3000:]


def test_fused_sweep_runs_a_task_per_group(slurm, tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=slurm", *FITS_NODE, *tiny_overrides(tiny_root), "train.epochs=2",
                     "optimizer=sgd,adam", "data.batch_size=16,100", cwd=tmp_path, timeout=600, env=slurm.env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{out[-3000:]}\n{slurm.jobs()}\n{slurm.log_tails()}"
    assert "Launching 4 jobs as 2 fused group(s)" in out
    assert re.search(r"SLURM job \d+: tasks 0 pending, 0 running; jobs 4 of 4 done, 0 failed or lost", out)
    children, parents = children_of_sweep(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert {r["status"] for r in children + parents} == {"FINISHED"}
    by_task = {}
    for c in children:  # the array task each job trained in: one per batch size
        by_task.setdefault(c["tags"]["fmnist.group"], []).append(c["name"])
    assert len(by_task) == 2 and all(len(names) == 2 for names in by_task.values())
    assert all(len({n.split("data.batch_size=")[1].split()[0] for n in names}) == 1 for names in by_task.values())
    for c in children:  # every job keeps its own outputs
        job_dir = Path(c["tags"]["fmnist.job_dir"])
        state = torch.load(job_dir / "best_model.pt", weights_only=True)
        models.MLP().load_state_dict(state)
        assert (job_dir / ".hydra" / "config.yaml").is_file() and (job_dir / "plots" / "learning_curves.png").is_file()
    assert sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1


def epochs_logged(cwd: Path) -> dict[str, list[tuple[int, float]]]:
    """run name -> [(epoch, valid_loss), ...] as logged, in step order (repeats would show)."""
    con = sqlite3.connect(cwd / "mlruns" / "mlflow.db")
    try:
        rows = con.execute("select r.name, m.step, m.value from metrics m join runs r using (run_uuid) "
                           "where m.key = 'valid_loss' order by r.name, m.step, m.timestamp").fetchall()
    finally:
        con.close()
    out: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in rows:
        out.setdefault(name, []).append((step, value))
    return out


def wait_for_log(tmp_path: Path, pattern: str, count: int, proc, timeout: float = 300) -> None:
    """Until one job log (a fused group's group.log has every job's lines) shows `pattern` `count` times."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(len(re.findall(pattern, p.read_text())) >= count
               for p in (tmp_path / "multirun").glob("*/*/*/*.log")):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count}x {pattern!r} in the job logs within {timeout} s (exit {proc.poll()})")


def finish_hurrying_requeues(proc, slurm, timeout: float = 600) -> str:
    """Wait for a sweep, letting its requeued tasks start again at once (slurm_cluster.start_requeued_now); its
    output."""
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        slurm.start_requeued_now()
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    reader.join(30)
    return "".join(out)


def test_preempted_task_is_requeued_and_continues_its_runs_exactly(slurm, tmp_path):
    """SIGUSR2 is what SLURM sends before preempting a job (and before its time limit): the fused task stops, is
    requeued, and continues both runs from their checkpoints, with the same numbers as an uninterrupted sweep."""
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)  # ~0.5 s an epoch at batch 16
    args = [*tiny_overrides(root), "data.batch_size=16", "train.epochs=30", "optimizer=sgd,adam"]
    cluster_dir, local_dir = tmp_path / "cluster", tmp_path / "local"
    cluster_dir.mkdir()
    local_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", "-m", "hydra/launcher=slurm",
                             "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=2", *args],
                            cwd=cluster_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cli_env(slurm.env))
    wait_for_log(cluster_dir, r"Epoch 3/30", 2, proc)  # both jobs are past epoch 3
    task = slurm.jobs()[0].split()[0]
    slurm.run("scancel", "--signal=USR2", task)
    out = finish_hurrying_requeues(proc, slurm)
    assert proc.returncode == 0, f"{out[-3000:]}\n{slurm.jobs()}\n{slurm.log_tails()}"
    assert "was requeued (time limit or preemption)" in out
    logs = next((cluster_dir / "multirun").glob("*/*/*/group.log")).read_text()  # the group's lines, both jobs'
    assert logs.count("interrupted by SIGUSR2") == 2 and logs.count("Requeued by SLURM: continuing MLflow run") == 2
    assert logs.count("Checkpointed for SLURM's requeue") == 2 and "Resume with" not in logs
    children, _ = children_of_sweep(cluster_dir)
    assert len(children) == 2 and {c["status"] for c in children} == {"FINISHED"}
    assert all(c["tags"]["fmnist.requeues"] == "1" and "error" not in c["tags"] for c in children)
    resumed_after = [int(e) for e in re.findall(r"Resuming after epoch (\d+) of 30", logs)]
    assert len(resumed_after) == 2 and all(3 <= e < 30 for e in resumed_after)
    # the same sweep without SLURM or a stop: every epoch's valid loss is the same number, each logged once
    local = run_cli("-m", *args, cwd=local_dir, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    requeued, uninterrupted = epochs_logged(cluster_dir), epochs_logged(local_dir)
    runs = [n for n in requeued if "optimizer=" in n]
    assert len(runs) == 2
    for name in runs:
        assert [e for e, _ in requeued[name]] == list(range(1, 31))
        assert requeued[name] == uninterrupted[name]


def test_time_limit_requeues_up_to_max_num_timeout_then_ends_killed_with_checkpoint(slurm, tmp_path):
    """A 3-minute limit with SLURM's own --signal=USR2@90: the first warning requeues the job, which continues its
    run; the second (max_num_timeout=1) leaves the run KILLED with its last checkpoint and the reason. SLURM may send
    the warning up to 60 s early (its --signal docs): with a 2-minute limit it once came before the task had
    installed its handlers, and SIGUSR2's default action ended it (CI, 2026-11-29); 3 minutes leave 30-90 s."""
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", "-m", "hydra/launcher=slurm",
                             "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=2",
                             "hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=90",
                             "hydra.launcher.max_num_timeout=1", *tiny_overrides(root), "data.batch_size=16",
                             "train.epochs=10000", "optimizer=adam"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(slurm.env))
    out = finish_hurrying_requeues(proc, slurm)
    assert proc.returncode == 1, f"{out[-3000:]}\n{slurm.jobs()}\n{slurm.log_tails()}"
    assert "was requeued (time limit or preemption)" in out
    submission = next((tmp_path / "multirun").glob("*/*/.submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@90" in submission and "#SBATCH --time=3" in submission
    children, parents = children_of_sweep(tmp_path)
    log = next((tmp_path / "multirun").glob("*/*/*/fmnist_exp.log")).read_text()
    assert len(children) == 1 and children[0]["status"] == "KILLED", f"{out[-2000:]}\n{log[-3000:]}"
    run = children[0]
    assert "fmnist.requeues" in run["tags"], f"{run['tags'].get('error')}\n{log[-3000:]}"
    assert run["tags"]["fmnist.requeues"] == "1"
    assert "interrupted by SIGUSR2" in run["tags"]["error"]
    assert "not requeued (timed-out too many times" in run["tags"]["error"]
    # SLURM checks time limits now and then: under load its first warning can come before epoch 1 is done, and
    # the requeued job then continues the same run from its start
    resumed = re.search(r"Resuming after epoch (\d+) of 10000", log)
    first = int(resumed.group(1)) if resumed else 0
    epochs = [e for e, _ in epochs_logged(tmp_path)[run["name"]]]
    assert epochs == list(range(1, len(epochs) + 1)) and first < len(epochs)  # continued, nothing repeated
    assert list((tmp_path / "mlruns").glob(f"**/{run['run_uuid']}/artifacts/checkpoints/last.pt"))
    assert "1 of 1 jobs failed" in out and [p["status"] for p in parents] == ["FAILED"]


def test_requeued_untracked_job_continues_from_its_job_dir(tmp_path):
    """No cluster needed: a job stopped by SIGUSR2 and started again as SLURM starts a requeued job (same job dir,
    SLURM_RESTART_COUNT=1) continues from its own last.pt, even without MLflow, and ends with the numbers of a run
    that was never stopped."""
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    args = [*tiny_overrides(root), "data.batch_size=16", "train.epochs=8", "tracking.enabled=false"]
    job_dir, whole_dir = tmp_path / "job", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args, f"hydra.run.dir={job_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        log = job_dir / "fmnist_exp.log"
        if log.is_file() and "Epoch 2/8" in log.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-2000:]  # stopped as by SIGTERM: no submitit to requeue it
    first = json.loads((job_dir / "outcome.json").read_text())
    assert first["status"] == "KILLED" and first["signum"] == signal.SIGUSR2
    assert "interrupted by SIGUSR2 (SLURM's warning before a time limit or preemption)" in out
    again = run_cli(*args, f"hydra.run.dir={job_dir}", cwd=tmp_path, env={"SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = int(re.search(r"Requeued by SLURM: resuming after epoch (\d+) of 8", again.stdout + again.stderr)[1])
    assert 2 <= resumed < 8
    whole = run_cli(*args, f"hydra.run.dir={whole_dir}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    ended = json.loads((job_dir / "outcome.json").read_text())
    assert ended["status"] == "FINISHED" and ended["value"] == json.loads((whole_dir / "outcome.json").read_text())["value"]
    assert (torch.load(job_dir / "best_model.pt", weights_only=True)["fc1.weight"]
            == torch.load(whole_dir / "best_model.pt", weights_only=True)["fc1.weight"]).all()
