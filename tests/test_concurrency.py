"""Jobs that start at the same instant: no job may fail because another started beside it.

Eight processes, each a job of a sweep as a cluster runs them (its own training process and tracking process),
wait at a barrier and are released together, five times, against SQLite and against a real `mlflow server` on
127.0.0.1. Each repetition is a new sweep in a new experiment, so every write that can collide does: creating
eight child runs under one parent, and logging one new data set eight times at once (MLflow checks, then inserts).
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import make_tiny_set, tiny_overrides
from fmnist_exp import tracking

JOBS, REPS = 8, 5


def released_together(barrier, root: Path, uri: str, parents: list[dict], job_dir: Path, index: int, results):
    from conftest import compose_cfg
    from fmnist_exp import job, train
    # start this process's tracking process and let it finish its imports first, so that what the barrier
    # releases at one instant is the jobs' own writes
    warm = tracking.Tracker(uri, "warm", job_dir / "warm")
    tracking.TRACKING_PROCESS.call(warm._id, "sync")
    warm.close()
    process = job.Process()
    for rep, parent in enumerate(parents):
        cfg = compose_cfg(*tiny_overrides(root), "train.epochs=2", f"train.seed={index}", f"tracking.uri={uri}",
                          f"tracking.experiment={parent['experiment']}")
        ctx = job.JobContext(job_dir=job_dir / f"rep{rep}", run_name=f"job{index}", parent=parent, multirun=True)
        barrier.wait(timeout=600)
        outcome = job.run(cfg, ctx, train.StopOnSignal(), process)
        results.put((rep, index, outcome.status, outcome.error))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_eight_jobs_released_at_once_all_finish(tmp_path, store, request):
    uri = request.getfixturevalue("server_uri") if store == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "data"
    make_tiny_set(root)
    parents = []
    for rep in range(REPS):  # as a sweep does: experiment and parent run made once, before its jobs start
        experiment = f"race{rep}"
        exp_id, run_id = tracking.create_run(uri, experiment, f"sweep {rep}")
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
