"""Jobs and sweeps that start at the same instant: none may fail or mix with another because it started beside it.

Eight processes, each a job of a sweep as a cluster runs them (its own training process and tracking process),
wait at a barrier and are released together, five times, against SQLite and against a real `mlflow server` on
127.0.0.1. Each repetition is a new sweep in a new experiment, so every write that can collide does: creating
eight child runs under one parent, and logging one new data set eight times at once (MLflow checks, then inserts).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import cli_env, compose_cfg, make_tiny_set, run_cli, table_rows, tiny_overrides, wait_for_children
from fmnist_exp import callbacks, store, tracking

JOBS, REPS = 8, 5


def released_together(barrier, root: Path, uri: str, parents: list[dict], job_dir: Path, index: int, results):
    from conftest import compose_cfg
    from fmnist_exp import job, stopping
    # start this process's tracking process and let it finish its imports first, so that what the barrier
    # releases at one instant is the jobs' own writes
    warm = tracking.Tracker(uri, "warm", job_dir / "warm")
    tracking.TRACKING_PROCESS.call(warm._id, "sync")
    warm.close()
    process = job.ProcessSettings()
    for rep, parent in enumerate(parents):
        cfg = compose_cfg(*tiny_overrides(root), "train.epochs=2", f"train.seed={index}", f"tracking.uri={uri}",
                          f"tracking.experiment={parent['experiment']}")
        ctx = job.JobContext(job_dir=job_dir / f"rep{rep}", run_name=f"job{index}", parent=parent, multirun=True)
        barrier.wait(timeout=600)
        outcome = job.run(cfg, ctx, stopping.StopOnSignal(), process)
        results.put((rep, index, outcome.status, outcome.error))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_eight_jobs_released_at_once_all_finish(tmp_path, backend, request):
    uri = request.getfixturevalue("server_uri") if backend == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "data"
    make_tiny_set(root)
    parents = []
    for rep in range(REPS):  # as a sweep does: experiment and parent run made once, before its jobs start
        experiment = f"race{rep}"
        exp_id, run_id = store.create_run(uri, experiment, f"sweep {rep}")
        parents.append({"uri": uri, "experiment_id": exp_id, "run_id": run_id, "experiment": experiment})
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(JOBS), ctx.Queue()
    procs = [ctx.Process(target=released_together, args=(barrier, root, uri, parents, tmp_path / f"job{i}", i,
                                                           results)) for i in range(JOBS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=900) for _ in range(JOBS * REPS)]
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * JOBS
    assert sorted(o[2] for o in outcomes) == ["FINISHED"] * (JOBS * REPS), [o for o in outcomes if o[3]]
    c = MlflowClient(tracking_uri=uri)
    for parent in parents:
        runs = c.search_runs([parent["experiment_id"]], max_results=100)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent["run_id"]]
        assert len(children) == JOBS and {r.info.status for r in children} == {"FINISHED"}
        for r in children:  # complete histories, and the one data set as each run's input
            assert [m.step for m in sorted(c.get_metric_history(r.info.run_id, "valid_loss"),
                                           key=lambda m: m.step)] == [1, 2]
            assert {"test_acc", "ckpt_valid_loss"} <= set(r.data.metrics)
            assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["fashion-mnist"]
        assert len({r.inputs.dataset_inputs[0].dataset.digest for r in children}) == 1


def sweep_children(cwd: Path, sweep_dir: Path) -> dict[str, str]:
    """The sweep's parent run (from the dir's mlflow_parent.json): its children, swept override -> status (run names
    are all the job's overrides: the tiny data's come first)."""
    parent = json.loads((sweep_dir / "mlflow_parent.json").read_text())
    c = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    assert c.get_run(parent["run_id"]).data.tags["fmnist.sweep_dir"] == str(sweep_dir.resolve())
    runs = c.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    return {r.info.run_name.split()[-1]: r.info.status for r in runs}


@pytest.mark.e2e
def test_a_sweep_dir_that_a_running_sweep_holds_is_left_to_it(tmp_path, tiny_root):
    """Two sweeps started in the same second get the same default dir (multirun/<date>/<time>): the second gives it
    way and writes everything, its jobs' dirs included, to <dir>_2."""
    from filelock import FileLock
    held = tmp_path / "multirun" / "same"
    held.mkdir(parents=True)
    with FileLock(held / callbacks.LOCK_FILE):  # as the sweep that started first holds it
        result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam",
                         "hydra.sweep.dir=multirun/same", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "multirun/same is another sweep's, so this one writes to multirun/same_2" in result.stdout + result.stderr
    assert [p.name for p in held.iterdir()] == [callbacks.LOCK_FILE]  # nothing of this sweep in the held dir
    moved = tmp_path / "multirun" / "same_2"
    assert sweep_children(tmp_path, moved) == {"optimizer=sgd": "FINISHED", "optimizer=adam": "FINISHED"}
    job_dirs = sorted(p for p in moved.iterdir() if p.is_dir() and (p / "outcome.json").is_file())
    assert [p.name.split(",")[1] for p in job_dirs] == ["optimizer=sgd", "optimizer=adam"]
    assert all("dir: multirun/same_2\n" in (p / ".hydra" / "hydra.yaml").read_text() for p in job_dirs)


@pytest.mark.e2e
def test_two_sweeps_started_together_each_report_only_their_own_jobs(tmp_path, tiny_root):
    """Two sweeps into one dir at once (or one after the other): each its own dir, parent run, jobs and table."""
    sweeps = {"optimizers": ["optimizer=sgd,adam"], "rates": ["optimizer.lr=0.01,0.02"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "fmnist_exp", "-m", *tiny_overrides(tiny_root),
                                     "train.epochs=1", "hydra.sweep.dir=multirun/same", *args],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=cli_env()) for name, args in sweeps.items()}
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    assert {name: p.returncode for name, p in procs.items()} == {"optimizers": 0, "rates": 0}, outputs
    dirs = sorted((tmp_path / "multirun").iterdir())
    assert [d.name for d in dirs] == ["same", "same_2"]
    expected = {"optimizers": {"optimizer=sgd", "optimizer=adam"},
                "rates": {"optimizer.lr=0.01", "optimizer.lr=0.02"}}
    found = {}
    for d in dirs:
        children = sweep_children(tmp_path, d)
        assert set(children.values()) == {"FINISHED"}
        found[next(name for name, runs in expected.items() if set(children) == runs)] = d
    assert set(found) == {"optimizers", "rates"}  # each dir holds exactly one sweep's jobs
    # each printed table and sweep_table.md lists its own two jobs
    tables = {name: table_rows(out)[1:] for name, out in outputs.items()}  # the rows below the header
    assert len(tables["optimizers"]) == 2 and {"SGD", "Adam"} <= set().union(*tables["optimizers"])
    assert len(tables["rates"]) == 2 and {"0.01", "0.02"} <= set().union(*tables["rates"])
    assert table_rows((found["rates"] / "sweep_table.md").read_text())[1:] == tables["rates"]


@pytest.mark.e2e
def test_a_single_run_leaves_a_dir_in_use_or_used_to_its_run(tmp_path, tiny_root):
    """Two single runs started in the same second (`python -m fmnist_exp ... &` twice) shared outputs/<date>/<time>:
    one best_model.pt, config.yaml and TensorBoard dir for both. A run now writes only where no other run is or was."""
    from filelock import FileLock
    def run(optimizer):
        result = run_cli(*tiny_overrides(tiny_root), "train.epochs=1", f"optimizer={optimizer}",
                         "hydra.run.dir=out/same", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout + result.stderr
    (tmp_path / "out" / "same").mkdir(parents=True)
    with FileLock(tmp_path / "out" / "same" / callbacks.LOCK_FILE):  # a run that started first holds it
        assert "Run dir: out/same is another run's, so this one writes to out/same_2" in run("sgd")
    assert "Run dir" not in run("adam")  # free again, and nothing was written there
    assert "Run dir: out/same is another run's, so this one writes to out/same_3" in run("adamw")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = {r.info.run_name.split()[-1]: r for r in c.search_runs(["1"])}
    dirs = {"optimizer=sgd": "same_2", "optimizer=adam": "same", "optimizer=adamw": "same_3"}
    assert {k: Path(r.data.tags["fmnist.job_dir"]).name for k, r in runs.items()} == dirs
    for name, d in dirs.items():  # each dir holds its own run's files
        assert (tmp_path / "out" / d / "best_model.pt").is_file()
        assert f"- {name}" in (tmp_path / "out" / d / ".hydra" / "overrides.yaml").read_text()


def test_where_files_cannot_be_locked_runs_sweeps_and_the_store_go_on_as_before(tmp_path, monkeypatch):
    """A filesystem without flock (some cluster filesystems; filelock 3 then raises NotImplementedError): nothing
    is claimed or moved, and the store opens unlocked."""
    import filelock

    def no_flock(self, *args, **kwargs):
        raise NotImplementedError("FileSystem does not appear to support flock; use SoftFileLock instead")
    monkeypatch.setattr(filelock.FileLock, "acquire", no_flock)
    cfg = compose_cfg(f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}", hydra=True)
    assert callbacks.claim_dir(cfg, "sweep") is None and callbacks.claim_dir(cfg, "run") is None
    assert (cfg.hydra.sweep.dir, cfg.hydra.run.dir) == (str(tmp_path / "sweep"), str(tmp_path / "run"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store.experiment_id(uri, "exp") == store.client(uri).get_experiment_by_name("exp").experiment_id


@pytest.mark.e2e
def test_a_skip_finished_rerun_beside_the_running_sweep_says_it_trains_again(tmp_path):
    """`sweep.skip_finished=true` while the first sweep still trains: nothing FINISHED yet, so every job trained
    again, twice the work with no word why. It still trains (the first may have been killed), and says so."""
    import signal
    make_tiny_set(tmp_path / "slowdata", n_train=16000, n_test=500)
    args = ["-m", *tiny_overrides(tmp_path / "slowdata"), "data.batch_size=16", "train.epochs=30",
            "optimizer=sgd,adam", "train.threads=1"]
    start = lambda *more: subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args, *more], cwd=tmp_path,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    first = start()
    second = None
    try:
        for line in first.stdout:
            if "Epoch 1/30" in line:
                break
        wait_for_children(tmp_path, 2, first)  # both jobs RUNNING (in two workers, one may still be starting)
        second = start("sweep.skip_finished=true")
        seen = []
        for line in second.stdout:
            seen.append(line)
            if "Epoch 1/30" in line:
                break
        out = "".join(seen)
        assert out.count("is RUNNING (another sweep trains it, or its process was killed before it could end it): "
                         "this job trains it again") == 2, out[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=300)
