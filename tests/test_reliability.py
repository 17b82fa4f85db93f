"""Failures stay contained, interrupted runs resume exactly, parallel jobs share one store, bad input is one line.

Tests run the real command (in a subprocess where signals or processes are the point, through Hydra in this
process elsewhere) and then check the real SQLite store: no run is left RUNNING.
"""
from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import cli_env, make_tiny_set, run_cli, store_runs, tiny_overrides, wait_for_children
from fmnist_exp import job, stopping, train


def client(cwd, uri=None):
    return MlflowClient(tracking_uri=uri or f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def history(c, run_id, key="valid_loss"):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def assert_nothing_running(cwd):
    runs = store_runs(cwd) if (cwd / "mlruns" / "mlflow.db").exists() else []
    assert not [r for r in runs if r["status"] == "RUNNING"], runs
    return runs


@pytest.fixture
def slow_root(tmp_path):
    """Tiny-format data big enough that an epoch at batch 16 takes about a second: room to interrupt it."""
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    return root


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env())


def wait_for(proc, marker: str) -> list[str]:
    """The output lines up to the first with `marker` in it."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    return seen


def interrupt_after(proc, marker: str, sig: int, times: int = 1, jobs: int = 0, cwd: Path | None = None
                    ) -> tuple[int, str]:
    """Wait for `marker` in the output (and, with `jobs`, for that many jobs' runs in cwd's store), send `sig`
    (`times` times), and return (exit code, whole output)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            if jobs:
                wait_for_children(cwd, jobs, proc)
            for _ in range(times):
                proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.e2e
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_resumes_exactly(tmp_path, slow_root, sig, code):
    args = [*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=3", "model.dropout=[0.3,0.1]"]
    straight = run_cli(*args, "tracking.experiment=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout[-2000:]

    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 1/3", sig)
    assert rc == code, out[-2000:]
    assert f"interrupted by {signal.Signals(sig).name}" in out and "Epoch 2/3" not in out
    runs = assert_nothing_running(tmp_path)
    (killed,) = [r for r in runs if r["status"] == "KILLED"]
    c = client(tmp_path)
    assert [s for s, _ in history(c, killed["run_uuid"])] == [1]
    assert "checkpoints/last.pt" in {a.path for a in c.list_artifacts(killed["run_uuid"], "checkpoints")}
    assert f"train.resume={killed['run_uuid']}" in out  # the message says how to resume
    assert "Sweep stopped" not in out and "skip_finished" not in out  # a single run's one way: its resume line

    resumed = run_cli(*args, f"train.resume={killed['run_uuid']}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert "Resuming after epoch 1 of 3" in resumed.stdout
    assert len(store_runs(tmp_path)) == 2  # the same MLflow run continued: no new run
    r = c.get_run(killed["run_uuid"])
    assert r.info.status == "FINISHED" and "error" not in r.data.tags
    (ref,) = c.search_runs([c.get_experiment_by_name("straight").experiment_id])
    for key in ("valid_loss", "train_loss", "valid_acc", "lr"):
        assert history(c, killed["run_uuid"], key) == history(c, ref.info.run_id, key)  # exact, no duplicates
    assert r.data.metrics["test_acc"] == ref.data.metrics["test_acc"]


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_same_config_twice_gives_identical_metrics(app, tmp_path, tiny_root):
    args = [*tiny_overrides(tiny_root), "train.epochs=3", "regularization=dropout"]
    for _ in range(2):
        assert app(*args, cwd=tmp_path).returncode == 0
    c = client(tmp_path)
    a, b = c.search_runs(["1"])
    for key in ("train_loss", "valid_loss", "valid_acc", "test_acc"):
        assert history(c, a.info.run_id, key) == history(c, b.info.run_id, key)


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_diverging_job_fails_alone(app, tmp_path, tiny_root):
    result = app("-m", *tiny_overrides(tiny_root), "train.epochs=2", "optimizer=sgd", "optimizer.lr=0.1,1e12",
                     cwd=tmp_path)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "1 of 2 jobs failed" in out and "training diverged: loss is nan at epoch 1" in out
    assert "lower optimizer.lr (now 1e+12)" in out
    runs = assert_nothing_running(tmp_path)
    bad = next(r for r in runs if r["name"].endswith("optimizer.lr=1000000000000.0"))  # as Hydra writes it
    assert bad["status"] == "FAILED" and bad["tags"]["error"].startswith("training diverged")
    good = next(r for r in runs if r["name"].endswith("optimizer.lr=0.1"))
    assert good["status"] == "FINISHED"
    assert [s for s, _ in history(client(tmp_path), good["run_uuid"])] == [1, 2]


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_resumed_sweep_skips_finished_jobs(app, tmp_path, tiny_root):
    args = [*tiny_overrides(tiny_root), "train.epochs=1"]
    first = app("-m", *args, "optimizer.lr=0.01,0.001", cwd=tmp_path)
    assert first.returncode == 0
    again = app("-m", *args, "optimizer.lr=0.01,0.001,0.003", "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:]
    assert again.stdout.count("Skipped: this config already FINISHED") == 2
    runs = assert_nothing_running(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 3  # only the new config trained again
    table = [line for line in again.stdout.splitlines() if line.startswith("|") and "FINISHED" in line]
    assert len(table) == 3  # the new sweep's table covers the reused jobs too


@pytest.mark.e2e
def test_resumed_sweep_continues_a_killed_job(tmp_path, slow_root):
    args = [*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=2"]
    rc, out = interrupt_after(start_cli("-m", *args, "optimizer.lr=0.001", cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    assert rc == 130
    runs = assert_nothing_running(tmp_path)
    assert sorted(r["status"] for r in runs) == ["KILLED", "KILLED"]  # the job and its sweep's parent
    again = run_cli("-m", *args, "optimizer.lr=0.001", "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:]
    assert "Resuming after epoch 1 of 2" in again.stdout
    runs = assert_nothing_running(tmp_path)
    job = next(r for r in runs if r["name"].endswith("optimizer.lr=0.001"))
    assert job["status"] == "FINISHED"
    assert [s for s, _ in history(client(tmp_path), job["run_uuid"])] == [1, 2]
    # the same config run again and stopped: its newest run is KILLED, but it has FINISHED once, so it is skipped
    rc, _ = interrupt_after(start_cli("-m", *args, "optimizer.lr=0.001", cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    assert rc == 130
    third = run_cli("-m", *args, "optimizer.lr=0.001", "sweep.skip_finished=true", cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-2000:]
    assert f"Skipped: this config already FINISHED as run {job['run_uuid']}" in third.stdout, third.stdout[-3000:]
    assert "Resuming" not in third.stdout


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    from conftest import compose_cfg
    from fmnist_exp import job
    cpu = torch.device("cpu")
    m = job.build(compose_cfg("model.hidden=[32,16]"), cpu, job_dir=tmp_path)
    m.best_weights = m.model.state_dict()
    adam = torch.optim.Adam(m.model.parameters())
    for p in m.model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()  # a state to save: exp_avg, exp_avg_sq, step
    train.save_checkpoint(m, m.model.state_dict(), adam.state_dict())
    other = job.build(compose_cfg("model.hidden=[64]"), cpu, job_dir=tmp_path / "other")
    with pytest.raises(train.CheckpointMismatch, match="does not fit the configured model/optimizer"):
        train.restore_checkpoint(tmp_path / "last.pt", other)
    sgd = job.build(compose_cfg("model.hidden=[32,16]", "optimizer=sgd"), cpu, job_dir=tmp_path / "sgd")
    with pytest.raises(train.CheckpointMismatch, match="its optimizer state is not sgd's"):
        train.restore_checkpoint(tmp_path / "last.pt", sgd)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_parallel_jobs_share_one_store(tmp_path, tiny_root, store, request):
    uri = request.getfixturevalue("server_uri") if store == "server" else None
    extra = [f"tracking.uri={uri}"] if uri else []
    result = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny_overrides(tiny_root),
                     "train.epochs=3", "optimizer=sgd,adam", "data.batch_size=20,50", "train.seed=0,1", *extra,
                     cwd=tmp_path, timeout=240)  # a sweep that waits for joblib's idle workers (300 s) fails here
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "database is locked" not in out
    c = client(tmp_path, uri)
    (exp,) = [e for e in c.search_experiments() if e.name == "fmnist"]
    runs = c.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 9 and len(children) == 8
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in children:
        for key in ("train_loss", "valid_loss", "valid_acc", "lr", "epoch_time"):
            assert [s for s, _ in history(c, r.info.run_id, key)] == [1, 2, 3]
        assert {"test_acc", "test_loss", "best_epoch"} <= set(r.data.metrics)
        assert r.data.params["train.threads"] == "None"  # so: the cores shared by the 2 parallel jobs
        assert r.data.tags["fmnist.threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


def _truncate(root):
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])


def _wrong_magic(root):
    path = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 0x03
    path.write_bytes(gzip.compress(bytes(raw)))


def _remove_all(root):
    for p in root.glob("*.gz"):
        p.unlink()


def _mlruns_is_a_file(root):
    (root.parent / "mlruns").write_text("not a directory")


BAD_INPUTS = [
    # (overrides, prepare, words the message must contain)
    (["data.batch_size=0"], None, "data.batch_size=0 is invalid: it must be a positive integer"),
    (["data.batch_size=-5"], None, "data.batch_size=-5 is invalid"),
    (["data.valid_size=60000"], None, "data.valid_size=60000 is invalid: it must be between 1 and 59999"),
    (["data.valid_size=0"], None, "data.valid_size=0 is invalid"),
    (["train.epochs=0"], None, "train.epochs=0 is invalid"),
    (["optimizer.lr=0"], None, "optimizer.lr=0.0 is invalid: it must be a positive number"),
    (["optimizer.lr=-0.1"], None, "optimizer.lr=-0.1 is invalid"),
    (["model.dropout=[1.0,0.2]"], None, "model.dropout[0]=1.0 is invalid: it must be in [0, 1)"),
    (["model.dropout=[-0.1,0.2]"], None, "model.dropout[0]=-0.1 is invalid"),
    # values only the library knows to refuse: built (and the schedule stepped) before any run exists
    (["optimizer=sgd", "optimizer.momentum=-1"], None, "optimizer.momentum=-1.0 is invalid for SGD"),
    (["optimizer=sgd", "optimizer.nesterov=true"], None, "optimizer.momentum=0.0, optimizer.nesterov=True is invalid"),
    (["optimizer.betas=[0.9,1.0]"], None, "optimizer.betas=[0.9,1.0] is invalid for Adam"),
    (["hydra.run.dir=/proc/fmnist_out"], None, "cannot create the run dir /proc/fmnist_out (No such file or "
                                               "directory): pass hydra.run.dir=<a folder you can write to>"),
    (["optimizer.betas=[0.9]"], None, "optimizer.betas=[0.9] is invalid: it must be two numbers (beta1, beta2)"),
    (["schedule=step", "schedule.step_size=0"], None, "schedule.step_size=0 is invalid for StepLR"),
    (["schedule=step", "schedule.gamma=-1"], None, "schedule.gamma=-1.0 is invalid for StepLR"),
    (["schedule=cosine", "schedule.T_max=0"], None, "schedule.T_max=0 is invalid for CosineAnnealingLR"),
    (["schedule=plateau", "schedule.factor=1.0"], None, "schedule.factor=1.0 is invalid for ReduceLROnPlateau"),
    (["model.init=normal", "model.init_std=-1"], None, "model.init_std=-1.0 is invalid"),
    (["model=cnn", "model.channels=[0,8]"], None, "model.channels=[0, 8] is invalid"),
    (["model=cnn", "model.channels=[4,4,4,4,4]"], None, "at most 4 conv blocks"),
    (["optimizer=rmsprop"], None, "Could not find 'optimizer/rmsprop'"),
    (["optimizer.kind=rmsprop"], None, "optimizer.kind='rmsprop' is invalid: it must be one of sgd|adam|adamw"),
    (["data.batch_size=abc"], None, "Value 'abc' of type 'str' could not be converted to Integer"),
    (["data.batchsize=16"], None, "Could not override 'data.batchsize'"),
    # what Hydra's typo hint ("To append to your config use +optimizr=sgd") led to: a run that ignored it
    (["+optimizr=sgd"], None, "optimizr is not a setting of this app (added with +, nothing would read it): did "
                              "you mean optimizer?"),
    (["+train.epoch=3"], None, "train.epoch is not a setting of this app"),
    # two presets that set the same keys: the ablation won, silently (a sweep over both trained duplicates)
    (["ablation=plain", "regularization=batchnorm"], None, "ablation=plain and regularization=batchnorm both set "
                                                           "the model's init, BatchNorm and dropout"),
    ([], _truncate, "train-images-idx3-ubyte.gz: cannot be read or decompressed"),
    ([], _wrong_magic, "t10k-labels-idx1-ubyte.gz: wrong IDX magic number 0x00000803"),
    (["data.download=true"], _remove_all, "Fashion-MNIST not found (tried"),
    ([], _mlruns_is_a_file, "cannot create the MLflow store directory"),
    (["train.resume=0123456789abcdef"], None, "train.resume=0123456789abcdef: no such MLflow run"),
    # a server that is down: MLflow's client retried for ~8 minutes, silently, deaf to SIGTERM
    (["tracking.uri=http://127.0.0.1:9"], None, "nothing answers at tracking.uri=http://127.0.0.1:9"),
    # MLflow 3's file store: its own error came after the data set loaded, cut at 300 characters, and said to
    # "make it writable"
    (["tracking.uri=./runs"], None, "tracking.uri=./runs is a directory (MLflow's file store), which MLflow 3 no "
                                    "longer writes: pass tracking.uri=sqlite:///runs/mlflow.db"),
    (["tracking.uri=file:///tmp/runs"], None, "pass tracking.uri=sqlite:////tmp/runs/mlflow.db (SQLite in that "
                                              "directory)"),
    (["train.device=cuda"] if not torch.cuda.is_available() else ["train.device=tpu"], None, "train.device="),
]


NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # a download fails at once
# the command itself, for one bad input of each kind: a range check, Hydra's compose, the data, the store
CLI_BAD_INPUTS = [b for b in BAD_INPUTS if b[0] in (["data.batch_size=0"], ["optimizer=rmsprop"],
                                                    ["tracking.uri=http://127.0.0.1:9"]) or b[1] is _truncate]


def bad_input_id(b):
    return " ".join(b[0]) or b[1].__name__


def assert_one_clear_line(result, message, cwd):
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out[-2000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) <= 1  # ours: exactly one line; Hydra's own compose errors log none
    line = next((l for l in out.splitlines() if message in l), "")
    assert errors == [] or line in errors
    if (cwd / "mlruns" / "mlflow.db").exists():
        assert store_runs(cwd) == []  # nothing half-written: no RUNNING run, no empty run


@pytest.mark.parametrize("overrides,prepare,message", BAD_INPUTS, ids=map(bad_input_id, BAD_INPUTS))
def test_bad_input_is_one_clear_line(app, tmp_path, tiny_root, overrides, prepare, message):
    """Through Hydra and the app in this process: the same composing, checks and job preparation as the command."""
    if prepare:
        prepare(tiny_root)
    assert_one_clear_line(app(*tiny_overrides(tiny_root), *overrides, cwd=tmp_path, env=NO_NETWORK), message, tmp_path)


@pytest.mark.e2e
@pytest.mark.parametrize("overrides,prepare,message", CLI_BAD_INPUTS, ids=map(bad_input_id, CLI_BAD_INPUTS))
def test_bad_input_is_one_clear_line_from_the_command(tmp_path, tiny_root, overrides, prepare, message):
    """The command's side of the contract: one line, no traceback, exit 1, nothing RUNNING."""
    if prepare:
        prepare(tiny_root)
    result = run_cli(*tiny_overrides(tiny_root), *overrides, cwd=tmp_path, env=NO_NETWORK, timeout=300)
    assert_one_clear_line(result, message, tmp_path)
    assert result.returncode == 1, (result.stdout + result.stderr)[-2000:]


@pytest.mark.e2e
def test_a_module_the_tracking_process_lacks_is_one_clear_line(tmp_path, tiny_root):
    """A machine without one of the tracking process's modules (tensorboardX was missing on the bare GPU machine)
    gets one line naming it, not a broken pipe, and no run half-written."""
    fake = tmp_path / "fake" / "tensorboardX"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tensorboardX'\", "
                                      "name='tensorboardX')\n")
    result = run_cli(*tiny_overrides(tiny_root), "train.epochs=1", cwd=tmp_path,
                     env={"PYTHONPATH": str(fake.parent)}, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-2000:]
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "the tracking process cannot import tensorboardX: install this project's dependencies (pip install -e .), "
        "or pass tracking.enabled=false"), out[-2000:]
    if (tmp_path / "mlruns" / "mlflow.db").exists():
        assert store_runs(tmp_path) == []


@pytest.mark.e2e
def test_a_machine_without_git_still_tracks(tmp_path, tiny_root):
    """Without the git program (a bare container) GitPython refuses to import unless told to be quiet; MLflow
    imports it for the commit tag. The run must not fail for that."""
    result = run_cli(*tiny_overrides(tiny_root), "train.epochs=1", cwd=tmp_path,
                     env={"GIT_PYTHON_GIT_EXECUTABLE": str(tmp_path / "no-git-here")}, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "[ERROR]" not in out, out[-2000:]
    (run,) = store_runs(tmp_path)
    assert run["status"] == "FINISHED"


@pytest.mark.e2e
def test_a_killed_training_process_leaves_no_running_run(tmp_path, slow_root):
    """SIGKILL (the OOM killer, a scheduler's hard limit) cannot be handled: the tracking process, which outlives
    the training process, ends its run KILLED with the reason."""
    proc = start_cli(*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=5", cwd=tmp_path)
    code, out = interrupt_after(proc, "Epoch 2/5", signal.SIGKILL)
    assert code == -signal.SIGKILL
    for _ in range(100):  # the tracking process sees its connection close and ends the run
        runs = store_runs(tmp_path)
        if runs and runs[0]["status"] != "RUNNING":
            break
        time.sleep(0.1)
    (run,) = assert_nothing_running(tmp_path)
    assert run["status"] == "KILLED" and "training process ended" in run["tags"]["error"]
    assert history(client(tmp_path), run["run_uuid"])[0][0] == 1  # what it was sent before is kept


@pytest.mark.e2e
def test_second_signal_stops_at_once_and_still_records_killed(tmp_path, slow_root):
    args = [*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=3"]
    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 1/3", signal.SIGINT, times=2)
    assert rc == 130, out[-2000:]
    runs = assert_nothing_running(tmp_path)
    (run,) = runs
    assert run["status"] == "KILLED" and run["tags"]["error"] == "interrupted by SIGINT"
    c = client(tmp_path)
    assert [s for s, _ in history(c, run["run_uuid"])] == [1]  # epoch 2 was cut short, epoch 1 kept
    assert "checkpoints/last.pt" in {a.path for a in c.list_artifacts(run["run_uuid"], "checkpoints")}


@pytest.mark.e2e
def test_signal_after_the_last_step_keeps_the_run_finished(tmp_path, tiny_root):
    args = [*tiny_overrides(tiny_root), "train.epochs=2"]
    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Test (best checkpoint", signal.SIGTERM)
    assert rc == 143, out[-2000:]
    assert "interrupted by SIGTERM after this run finished" in out
    (run,) = assert_nothing_running(tmp_path)
    assert run["status"] == "FINISHED" and "error" not in run["tags"]
    assert {"test_acc", "ckpt_valid_loss"} <= set(client(tmp_path).get_run(run["run_uuid"]).data.metrics)


@pytest.mark.e2e
def test_resume_is_exact_with_a_schedule_and_early_stopping(tmp_path, slow_root):
    # the lr halves every epoch; min_delta=1 makes every epoch after the first stale, so early stopping ends the
    # run after epoch 3 of 4 only if the stale count survives the interruption after epoch 2
    args = [*tiny_overrides(slow_root), "data.batch_size=64", "train.epochs=4", "optimizer=sgd", "optimizer.lr=0.5",
            "schedule=step", "schedule.step_size=1", "train.early_stopping.patience=2",
            "train.early_stopping.min_delta=1.0", "model.dropout=[0.3,0.1]"]
    straight = run_cli(*args, "tracking.experiment=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout[-2000:]
    c = client(tmp_path)
    (ref,) = c.search_runs([c.get_experiment_by_name("straight").experiment_id])
    assert [v for _, v in history(c, ref.info.run_id, "lr")] == [0.5, 0.25, 0.125]  # stopped early, scheduled

    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 2/4", signal.SIGINT)
    assert rc == 130, out[-2000:]
    (killed,) = [r for r in store_runs(tmp_path) if r["status"] == "KILLED"]
    resumed = run_cli(*args, f"train.resume={killed['run_uuid']}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    for key in ("valid_loss", "train_loss", "lr"):
        assert history(c, killed["run_uuid"], key) == history(c, ref.info.run_id, key)
    got, want = c.get_run(killed["run_uuid"]).data.metrics, ref.data.metrics
    assert {k: got[k] for k in ("epochs_run", "best_epoch", "test_acc")} == \
           {k: want[k] for k in ("epochs_run", "best_epoch", "test_acc")}


@pytest.mark.e2e
def test_resume_refuses_a_checkpoint_it_cannot_continue_before_touching_the_run(tmp_path, slow_root):
    """A full checkpoint holding a CUDA generator state (how main before 2026-11-28 saved GPU runs) cannot be
    continued on the CPU: one line, and the run stays KILLED, so skip_finished can still resume it on a GPU."""
    args = [*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=2"]
    rc, _ = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    (killed,) = store_runs(tmp_path)
    last = next(tmp_path.glob("outputs/*/*/last.pt"))
    ckpt = torch.load(last, weights_only=True)
    ckpt["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state: seed + offset
    torch.save(ckpt, last)
    result = run_cli(*args, f"train.resume={killed['run_uuid']}", cwd=tmp_path)
    assert result.returncode == 1 and "resume it on a machine with a GPU" in result.stdout + result.stderr
    (run,) = assert_nothing_running(tmp_path)
    assert run["status"] == "KILLED"


@pytest.mark.e2e
def test_resume_from_a_damaged_or_unfetchable_checkpoint_is_one_line(tmp_path, slow_root):
    """A truncated last.pt was a traceback; a store that failed to send the run's checkpoint read as 'no checkpoint',
    and the resumed run started over from epoch 1 in the same run, overwriting its metrics. Both: one line, exit 1,
    and the run stays KILLED with its epoch as it was."""
    args = [*tiny_overrides(slow_root), "data.batch_size=16", "train.epochs=2"]
    rc, _ = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    (killed,) = store_runs(tmp_path)
    last = next(tmp_path.glob("outputs/*/*/last.pt"))
    last.write_bytes(last.read_bytes()[:1000])
    result = run_cli(*args, f"train.resume={killed['run_uuid']}", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert f"{last}: not a readable checkpoint (" in out and "delete it to resume from the MLflow run's own copy" in out

    last.unlink()  # the store's copy, then, and the store fails to send it
    stored = next(tmp_path.glob(f"mlruns/artifacts/*/{killed['run_uuid']}/artifacts/checkpoints/last.pt"))
    stored.unlink()
    stored.symlink_to(tmp_path / "nowhere.pt")
    result = run_cli(*args, f"train.resume={killed['run_uuid']}", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert f"cannot fetch checkpoints/last.pt of MLflow run {killed['run_uuid']}" in out
    assert "Resuming" not in out and "Epoch 1/2" not in out
    (run,) = assert_nothing_running(tmp_path)
    assert run["status"] == "KILLED" and [s for s, _ in history(client(tmp_path), run["run_uuid"])] == [1]


def test_checkpoints_resume_on_any_device(tmp_path, tiny_root):
    """The data order comes from a CPU generator, so a checkpoint made on a GPU restores on a CPU-only machine
    (its dropout stream, drawn on the GPU, continues from a fresh seeded one)."""
    from conftest import compose_cfg
    from fmnist_exp import data, job
    cfg = compose_cfg(*tiny_overrides(tiny_root), "train.epochs=1")
    m = job.build(cfg, torch.device("cpu"), job_dir=tmp_path)
    assert m.generator.device.type == "cpu"
    train.fit([m], data.load(tiny_root, tiny_root / "none", False, 100, 0, torch.device("cpu")))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["rng"]["dropout_device"], ckpt["rng"]["dropout"] = "cuda", torch.zeros(16, dtype=torch.uint8)
    torch.save(ckpt, tmp_path / "last.pt")
    again = job.build(cfg, torch.device("cpu"), job_dir=tmp_path / "again")
    (tmp_path / "again").mkdir()
    train.restore_checkpoint(tmp_path / "last.pt", again)
    assert again.state.epoch == 1 and torch.equal(again.generator.get_state(), m.generator.get_state())
    # one epoch: the last weights are the best, which m.model holds after testing
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), m.model.state_dict().values()))


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_untracked_sweep_with_a_failed_job_exits_1(app, tmp_path, tiny_root):
    result = app("-m", *tiny_overrides(tiny_root), "tracking.enabled=false", "train.epochs=1",
                     "optimizer.lr=0.01,-1", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 of 2 jobs failed" in result.stderr and "optimizer.lr=-1.0 is invalid" in result.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_batchnorm_with_a_last_batch_of_one(app, tmp_path, tiny_root):
    # 600 - 99 = 501 training examples at batch 100: the remainder of one is left out of each epoch
    args = [f"data.root={tiny_root}", f"data.system_dir={tiny_root / 'none'}", "data.download=false",
            "data.valid_size=99", "regularization=batchnorm", "train.epochs=2", "train.progress=off"]
    result = app(*args, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "Training: 5 steps per epoch" in result.stdout
    (run,) = assert_nothing_running(tmp_path)
    assert run["status"] == "FINISHED"


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["basic", "fused"])
def test_each_job_of_a_sweep_gets_its_own_process_settings(tmp_path, tiny_root, launcher):
    """train.threads and train.flush_denormal belong to the process, but a sweep's jobs may ask for different ones
    (one process runs them all under the basic launcher, and the fused one's groups of one): each job got the first
    job's. Weights of 1e-40 are denormal: flushed to zero with the flag, kept without it."""
    args = ["-m", f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=1" if launcher == "fused" else "",
            *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd", "model.init=normal", "model.init_std=1e-40"]
    result = run_cli(*[a for a in args if a], "train.threads=1", "train.flush_denormal=true,false", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    nonzero = {}
    for run in store_runs(tmp_path):
        if "mlflow.parentRunId" in run["tags"]:
            flush = {"0": "true", "1": "false"}[Path(run["tags"]["fmnist.job_dir"]).name.split("_")[0]]  # job num
            weights = torch.load(f"{run['tags']['fmnist.job_dir']}/best_model.pt", weights_only=True)["fc1.weight"]
            nonzero[flush] = int((weights != 0).sum())
    assert nonzero["false"] > nonzero["true"], nonzero  # the same (the first job's flag) before
    result = run_cli(*[a for a in args if a], "train.threads=1,2", "hydra.sweep.dir=threads", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    threads = {Path(r["tags"]["fmnist.job_dir"]).name.split("_")[0]: r["tags"]["fmnist.threads"]
               for r in store_runs(tmp_path) if Path(r["tags"].get("fmnist.job_dir", "")).parent.name == "threads"}
    assert threads == {"0": "1", "1": "2"}, threads  # jobs 0 and 1: train.threads=1 and 2


@pytest.mark.e2e
def test_a_denormal_flag_torch_threads_cannot_take_is_one_line(tmp_path, tiny_root):
    """torch's worker threads keep the flag they started with: a later job asking for another fails with the way
    out, rather than training with the wrong one."""
    result = run_cli("-m", "hydra/launcher=basic", *tiny_overrides(tiny_root), "train.epochs=1", "train.threads=2",
                     "train.flush_denormal=true,false", cwd=tmp_path)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "1 of 2 jobs failed" in result.stderr and "sweep it with train.threads=1" in result.stderr
    assert {r["status"] for r in store_runs(tmp_path)} == {"FINISHED", "FAILED"}


@pytest.mark.parametrize("launcher, marker, sig, code", [
    (["hydra/launcher=basic"], "#1 :", signal.SIGTERM, 143),  # between two jobs: Hydra composing the next
    (["hydra.launcher.n_jobs=1"], "Test (best checkpoint", signal.SIGINT, 130),  # between two fused groups
    (["hydra.launcher.n_jobs=2"], "Launching 4 jobs", signal.SIGINT, 130)])  # fused workers starting (importing)
@pytest.mark.e2e
def test_a_stop_while_no_job_trains_ends_the_sweep_like_one_during_training(tmp_path, slow_root, launcher, marker, sig,
                                                                            code):
    """Outside a job's training no handler of ours ran: SIGTERM killed the sweep silently with its parent run left
    RUNNING for good, SIGINT printed a KeyboardInterrupt traceback (and exited 1 between basic jobs), and fused
    workers stopped while importing died with tracebacks, were reported 'died (killed, or out of memory)' and cost
    15 s each. Now the same end as a stop during training: one line, the parent KILLED saying why, 128+N."""
    args = ["-m", *launcher, *tiny_overrides(slow_root), "train.epochs=2", "optimizer=sgd,adam",
            "data.batch_size=16,100"]
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(), start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C reaches every process of the command
            break
    started = time.monotonic()
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == code, out[-3000:]
    assert time.monotonic() - started < 12, out[-3000:]
    assert "Traceback" not in out and "worker process died" not in out, out[-3000:]
    runs = assert_nothing_running(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    if f"Sweep stopped by {signal.Signals(sig).name} before any job started: nothing was recorded" in out:
        # the signal came before the launcher handed out any job (fused workers starting): nothing to finish
        assert [] == [r for r in client(tmp_path).search_runs(["1"]) if r.info.run_id in
                      {p["run_uuid"] for p in parents}], parents  # the parent deleted
    else:
        assert f"Sweep stopped by {signal.Signals(sig).name}" in out and "sweep.skip_finished=true" in out
        (parent,) = parents
        assert parent["status"] == "KILLED" and "sweep.skip_finished=true" in parent["tags"]["error"]
    again = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sum(line.startswith("| ") and "FINISHED" in line for line in again.stdout.splitlines()) == 4


@pytest.mark.e2e
def test_a_stop_at_the_sweeps_end_waits_for_its_table_and_runs(tmp_path, tiny_root):
    """SIGTERM while the table is printed and the winner logged killed the process there: the parent run stayed
    RUNNING for good (no handler ran; no atexit either), SIGINT left a traceback or was swallowed (exit 0)."""
    proc = start_cli("-m", "hydra.launcher.n_jobs=1", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam",
                     cwd=tmp_path)
    rc, out = interrupt_after(proc, "| best", signal.SIGTERM)
    assert rc == 143 and "Stopped by SIGTERM at the sweep's end, once its table and runs were recorded" in out, out
    assert "Traceback" not in out
    runs = assert_nothing_running(tmp_path)
    assert {r["status"] for r in runs} == {"FINISHED"} and len(runs) == 3  # the parent ended as the table says
    assert next(tmp_path.glob("multirun/*/*/sweep_table.md")).is_file()



@pytest.mark.e2e
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib"]], ids=["fused", "joblib"])
def test_a_stop_once_every_job_has_trained_still_records_the_table(tmp_path, tiny_root, launcher):
    """Ctrl-C just after the last job's test line, before the table: every job FINISHED, yet the sweep was stopped,
    its parent KILLED with no table or winner, and the message said its unfinished jobs were KILLED. Now the table
    and the winner are recorded, then the sweep exits 130."""
    proc = start_cli("-m", *launcher, "hydra.launcher.n_jobs=2", *tiny_overrides(tiny_root), "train.epochs=1",
                     "optimizer=sgd,adam", cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if sum("Test (best checkpoint" in s for s in seen) == 2:
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "Stopped by SIGINT at the sweep's end, once its table and runs were recorded" in out, out[-3000:]
    assert "Sweep stopped by" not in out and "Traceback" not in out, out[-3000:]
    assert sum(line.startswith("| ") and "FINISHED" in line for line in out.splitlines()) == 2, out[-3000:]
    # which job each line is about, where two print at once (joblib's epoch lines had no prefix)
    assert {line.split("] Epoch 1/1")[0].rsplit(" ", 1)[1] for line in out.splitlines() if "Epoch 1/1" in line} \
        == {"optimizer=sgd", "optimizer=adam"}, out[-3000:]
    runs = assert_nothing_running(tmp_path)
    assert {r["status"] for r in runs} == {"FINISHED"} and len(runs) == 3, runs
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    assert "fmnist.winner" in parent["tags"], parent

@pytest.mark.e2e
def test_a_joblib_worker_killed_outright_ends_the_sweep_with_its_table_and_nothing_running(tmp_path, slow_root):
    """A loky worker SIGKILLed with its tracking process (the OOM killer, kill -9 of its process tree) breaks
    joblib's pool: joblib kills the other worker's tree too and raises. The sweep says so in one line (before: a
    40-line traceback, no table, both runs RUNNING for good), ends every unfinished job KILLED saying why, prints
    its table, exits 1; skip_finished then completes it."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny_overrides(slow_root),
            "data.batch_size=16", "train.epochs=4", "optimizer=sgd,adam", "train.seed=0,1"]
    proc = start_cli(*args, cwd=tmp_path)
    seen = wait_for(proc, "Epoch 1/4")
    wait_for_children(tmp_path, 2, proc)  # the other worker's job too: it may still have been starting
    workers = [p for p in _children(proc.pid) if _children(p)]  # loky workers with a job's tracking process
    assert workers, "".join(seen)[-2000:]
    for pid in [workers[0], *_children(workers[0])]:
        os.kill(pid, signal.SIGKILL)
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "TerminatedWorkerError" not in out, out[-3000:]
    assert "A joblib worker process died (exit code {SIGKILL(-9)}; killed, or out of memory) and joblib stopped the sweep: " \
           "4 of 4 jobs did not finish; rerun the sweep with sweep.skip_finished=true" in out, out[-3000:]
    assert "4 of 4 jobs failed" in out and "| KILLED " in out, out[-3000:]  # the table, with the two killed runs
    runs = assert_nothing_running(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 2 and {r["status"] for r in children} == {"KILLED"}, children  # 2 had started
    assert all(r["tags"]["error"].startswith("its joblib worker process died") for r in children)
    assert [r["status"] for r in runs if r not in children] == ["FAILED"]
    again = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    finished = [r for r in store_runs(tmp_path) if r["status"] == "FINISHED" and "mlflow.parentRunId" in r["tags"]]
    assert len({r["name"] for r in finished}) == 4, finished


@pytest.mark.e2e
@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_under_joblib_ends_every_job_killed_and_starts_no_more(tmp_path, slow_root, sig, to_group):
    """`kill PID` (or `timeout`) reaches only the sweep's process: it ended the sweep while its joblib workers trained
    on unwatched, their runs RUNNING for good. A terminal's Ctrl-C reached every worker, and the first to finish its
    job exited the sweep under the other. Now the launcher forwards the signal once to its workers (in process
    groups of their own), the running jobs end KILLED with their checkpoints, the others before they start, and the
    sweep stops in one line; skip_finished completes it."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny_overrides(slow_root),
            "data.batch_size=16", "train.epochs=4", "optimizer=sgd,adam", "train.seed=0,1"]
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(), start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Epoch 1/4" in line:
            wait_for_children(tmp_path, 2, proc)  # both workers' jobs started: the other may still be starting
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "died" not in out, out[-3000:]
    assert out.count(f"interrupted by {name} before it started") == 2, out[-3000:]  # the second seed's jobs
    assert f"Sweep stopped by {name}" in out
    runs = assert_nothing_running(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 2 and {r["tags"]["error"] for r in children} == {f"interrupted by {name}"}, children
    assert all(r["status"] == "KILLED" for r in runs)
    again = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sum(line.startswith("| ") and "FINISHED" in line for line in again.stdout.splitlines()) == 4
    c = client(tmp_path)
    resumed = [r for r in children if len(history(c, r["run_uuid"])) == 4]
    assert len(resumed) == 2, "the stopped runs continue (from their last checkpoint), not start over"


@pytest.mark.e2e
def test_a_stop_under_joblib_before_its_workers_run_starts_no_job(tmp_path, slow_root):
    """SIGTERM just after joblib starts its pool reached no worker (none existed yet): every job then trained to
    its end, and only then did the sweep stop. Now jobs that start after the signal end KILLED before they start
    (the stop mark in the sweep dir)."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny_overrides(slow_root),
            "data.batch_size=16", "train.epochs=4", "optimizer=sgd,adam", "train.seed=0,1"]
    proc = start_cli(*args, cwd=tmp_path)
    rc, out = interrupt_after(proc, "Launching jobs", signal.SIGTERM)
    assert rc == 143 and "Sweep stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    assert "Epoch 1/4" not in out, out[-3000:]
    runs = assert_nothing_running(tmp_path)
    assert "FINISHED" not in {r["status"] for r in runs}, runs


def _children(pid: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(p.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib"]], ids=["fused", "joblib"])
def test_a_sweep_killed_outright_leaves_no_worker_and_nothing_running(tmp_path, slow_root, launcher):
    """kill -9 of the sweep's process (the OOM killer, a hard limit) cannot be handled there. Its workers waited for
    work for good (~1 GB each, deaf to SIGTERM, since they ignore stop signals between jobs), their runs said
    'interrupted by SIGTERM', and the parent run stayed RUNNING. Now each worker stops its job KILLED saying why,
    ends the parent KILLED, and exits; skip_finished then completes the sweep."""
    args = ["-m", *launcher, "hydra.launcher.n_jobs=2", *tiny_overrides(slow_root), "data.batch_size=16",
            "train.epochs=4", "optimizer=sgd,adam", "train.seed=0,1",
            *([] if launcher else ["hydra.launcher.max_group=2"])]  # fused: two groups, a worker each
    proc = start_cli(*args, cwd=tmp_path)
    seen = wait_for(proc, "Epoch 1/4")
    wait_for_children(tmp_path, 2 if launcher else 4, proc)  # both workers' jobs (a group of two each, fused)
    tree, todo = [], [proc.pid]
    while todo:
        tree += (found := _children(todo.pop()))
        todo += found
    assert len(tree) >= 4, "".join(seen)[-2000:]  # two workers, each with a job's tracking process
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while any(map(_alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(map(_alive, tree)), [Path(f"/proc/{p}/cmdline").read_bytes()[:100] for p in tree if _alive(p)]
    runs = assert_nothing_running(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert children and {r["status"] for r in children} == {"KILLED"}, children
    assert {r["tags"]["error"] for r in children} == {stopping.LAUNCHER_GONE}, children
    (parent,) = [r for r in runs if r not in children]
    assert parent["status"] == "KILLED" and parent["tags"]["error"] == stopping.PARENT_GONE, parent
    again = run_cli(*args, "sweep.skip_finished=true", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sum(line.startswith("| ") and "FINISHED" in line for line in again.stdout.splitlines()) == 4


@pytest.mark.e2e
def test_a_sweep_to_a_server_that_is_down_is_one_line_and_starts_no_job(tmp_path, tiny_root):
    """Hydra only warns when a callback raises: the sweep went on without its parent run, and every job hit the
    same error (after minutes of MLflow's retries). Now one line, exit 1, within seconds, no job started."""
    started = time.monotonic()
    result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam",
                     "tracking.uri=http://127.0.0.1:9", cwd=tmp_path, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and time.monotonic() - started < 60, out[-2000:]
    assert [line for line in out.splitlines() if "nothing answers at tracking.uri=http://127.0.0.1:9" in line], out
    assert "Launching" not in out and "Traceback" not in out and "UserWarning" not in out, out[-2000:]


@pytest.mark.e2e
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, tiny_root):
    """Ctrl-C in the first second or two (Python importing torch, Hydra, MLflow) printed a 50-70 line
    KeyboardInterrupt traceback from wherever the import was."""
    proc = start_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam", cwd=tmp_path)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert out.strip() == "Stopped by SIGINT before any job started: nothing was recorded", out
    assert not (tmp_path / "mlruns").exists() or all(r["status"] != "RUNNING" for r in store_runs(tmp_path))
