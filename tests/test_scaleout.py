"""Jobs in other processes (submitit's local executor, as on a SLURM cluster) still land under one parent in one
store, stop as under any launcher, and a task killed outright leaves no run RUNNING."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, make_tiny_set, run_cli, store_runs, tiny_overrides

LOCAL = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]


@pytest.mark.e2e
def test_submitit_local_sweep_has_one_parent(tmp_path, tiny_root):
    result = run_cli(*LOCAL, *tiny_overrides(tiny_root), "train.epochs=2", "optimizer=sgd,adam",
                     "data.batch_size=20,50", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Launching 4 jobs as 2 fused group(s)" in out  # a task per group, as on a SLURM cluster
    runs = store_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 4
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parents[0]["run_uuid"]}
    assert {r["status"] for r in runs} == {"FINISHED"}
    assert sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1  # the table, in the submitting process
    assert "/.submitit/" not in "".join(c["tags"]["fmnist.job_dir"] for c in children)
    # the tasks' epoch lines reach the sweep's own output, as under the fused launcher (submitit left them in its
    # log files: nothing printed from submission to the table); submitit's own lines stay there
    for c in children:
        assert f"[{c['name']}] Epoch 2/2 | train loss" in result.stdout, result.stdout[-3000:]
    assert "Starting with JobEnvironment" not in out
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert [p.name for p in (sweep_dir / ".submitit").iterdir() if not p.name[0].isdigit()] == []  # no `%j` dir
    # the two tasks run at once and share the cores (each took them all: 4 jobs on 2 cores trained ~50x slower)
    assert {c["tags"]["fmnist.threads"] for c in children} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}


@pytest.fixture
def slow_root(tmp_path):
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    return root


def _sweep(cwd, root, *extra):
    return [*LOCAL, *tiny_overrides(root), "data.batch_size=16,100", "train.epochs=5", "optimizer=sgd,adam", *extra]


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(), start_new_session=True)


def _wait_for_epoch(cwd, proc, timeout=180):
    """submitit's tasks log to their own files: wait until both tasks have trained an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        logs = [p.read_text(errors="replace") for p in cwd.glob("multirun/*/*/.submitit/*/*_log.out")]
        if sum("Epoch 1/5" in text for text in logs) >= 2:
            return
        time.sleep(0.2)
    raise AssertionError(f"no epoch within {timeout} s")


def _processes_of(cwd) -> list[int]:
    """Processes still running from this test's sweep (submitit's controllers and tasks write under it)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(cwd) in (p / "cmdline").read_bytes().decode(errors="replace") + \
                    str((p / "cwd").resolve()):
                found.append(int(p.name))
        except OSError:
            pass
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_under_submitit_local_ends_every_job_killed(tmp_path, slow_root, sig, to_group):
    """`kill PID` left every task training unwatched (runs RUNNING, then FINISHED under a KILLED parent); a
    terminal's Ctrl-C reached submitit's controllers (a traceback each, their tasks SIGKILLed a second later). Now
    the stop reaches each task once, every run ends KILLED, nothing keeps running, skip_finished completes it."""
    args = _sweep(tmp_path, slow_root)
    proc = _start(args, tmp_path)
    _wait_for_epoch(tmp_path, proc)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and f"Sweep stopped by {signal.Signals(sig).name}" in out, out[-3000:]
    time.sleep(1)
    assert not _processes_of(tmp_path), "a task or controller outlived the sweep"
    runs = store_runs(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 4 and {r["status"] for r in runs} == {"KILLED"}, runs
    # each says what the user sent (submitit's controller forwards a Ctrl-C to its task as SIGTERM)
    assert all(f"interrupted by {signal.Signals(sig).name}" in r["tags"]["error"] for r in children), runs
    again = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sum(line.startswith("| ") and "FINISHED" in line for line in again.stdout.splitlines()) == 4


@pytest.mark.e2e
def test_a_submitit_local_task_killed_outright_is_recorded_and_the_sweep_ends_with_its_table(tmp_path, slow_root):
    """kill -9 of a task with its tracking process: submitit raised 'has not produced any output' (a Hydra
    traceback, no table) and the task's runs stayed RUNNING for good."""
    proc = _start(_sweep(tmp_path, slow_root), tmp_path)
    _wait_for_epoch(tmp_path, proc)
    tasks = [pid for pid in _processes_of(tmp_path)
             if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert tasks
    victim = tasks[0]
    children = Path(f"/proc/{victim}/task/{victim}/children").read_text().split()
    for pid in [victim, *map(int, children)]:
        os.kill(pid, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "its process ended without a result" in out, out[-3000:]
    assert "2 of 4 jobs failed" in out and "| FINISHED" in out.replace("  ", " "), out[-3000:]
    runs = store_runs(tmp_path)
    assert "RUNNING" not in {r["status"] for r in runs}, runs
    killed = [r for r in runs if r["status"] == "KILLED"]
    assert len(killed) == 2 and all(r["tags"]["error"].startswith("its process ended without a result")
                                    for r in killed), killed


@pytest.mark.parametrize("name,target", [("submitit_slurm", "slurm_launcher.FmnistSlurmLauncher"),
                                         ("submitit_local", "submitit_local_launcher.FmnistLocalLauncher"),
                                         ("joblib", "joblib_launcher.FmnistJoblibLauncher")])
@pytest.mark.e2e
def test_the_plugins_own_launcher_names_run_our_launchers(tmp_path, name, target):
    """hydra/launcher=submitit_slurm, as Hydra's docs name it, is our watched SLURM launcher with the plugin's
    defaults (the plugin's own waited forever on a cancelled job where sacct does not run), as submitit_local and
    joblib are ours."""
    result = run_cli(f"hydra/launcher={name}", "--cfg", "hydra", "-p", "hydra.launcher", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"_target_: hydra_plugins.fmnist_launchers.{target}\n" in result.stdout


def test_a_failed_squeue_does_not_make_a_running_slurm_task_lost(tmp_path, monkeypatch):
    """squeue failing now and then (slurmctld busy) read as an empty queue: two failures 15 s apart declared a
    RUNNING task lost, recorded its jobs KILLED and went on to the table while it trained. A task is lost only when
    it stays out of a queue that squeue did answer for LOST_AFTER_S."""
    import types

    from hydra_plugins.fmnist_launchers import slurm_launcher as slurm
    clock = [0.0]
    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(slurm.time, "sleep", lambda dt: clock.__setitem__(0, clock[0] + dt))
    result = tmp_path / "task_result.pkl"
    polls = []

    def run(cmd, capture_output, text):  # squeue fails on polls 0, 4 and 8; the task runs until poll 12
        n = len(polls)
        polls.append(n)
        if n in (0, 4, 8):
            return types.SimpleNamespace(returncode=1, stdout="", stderr="slurm_load_jobs error: Socket timed out")
        if n == 12:
            result.write_bytes(b"")
        return types.SimpleNamespace(returncode=0, stdout="7_0 RUNNING 2026-12-07T05:00:00 None\n", stderr="")

    monkeypatch.setattr(slurm.subprocess, "run", run)
    done = slurm._no_return()
    monkeypatch.setattr(slurm, "_result", lambda task, n: [done] * n)
    task = types.SimpleNamespace(job_id="7_0", paths=types.SimpleNamespace(result_pickle=result, stderr="err"))
    assert slurm.watch([task], [[0]], lambda i: tmp_path / "job0", {}) == [done]
    assert not (tmp_path / "job0").exists()  # nothing recorded KILLED
    assert len(polls) == 13

    # a task SLURM no longer knows ('Invalid job id': it left the queue without a result) is still found lost
    polls.clear()
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: polls.append(1) or types.SimpleNamespace(
        returncode=1, stdout="", stderr="slurm_load_jobs error: Invalid job id specified"))
    result.unlink()
    (ret,) = slurm.watch([task], [[0]], lambda i: tmp_path / "job0", {})
    assert ret.return_value is None and "ended without a result" in (tmp_path / "job0" / "outcome.json").read_text()
