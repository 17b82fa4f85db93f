"""A job's lifecycle driven in-process, as a launcher drives it: outcome, what it releases, what the process owns."""
from __future__ import annotations

import threading

import pytest
from mlflow import MlflowClient

from conftest import compose_cfg, tiny_overrides
from fmnist_exp import job, stopping, tracking


def run_job(tmp_path, tiny_root, name: str, *overrides: str, process=None):
    cfg = compose_cfg(*tiny_overrides(tiny_root), "train.epochs=2",
                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides)
    ctx = job.JobContext(job_dir=tmp_path / name, run_name=name, overrides=list(overrides))
    return job.run(cfg, ctx, stopping.StopOnSignal(), process or job.ProcessSettings())


@pytest.mark.parametrize("monitor,metric", [("valid_loss", "ckpt_valid_loss"), ("valid_acc", "ckpt_valid_acc")])
def test_outcome_value_is_the_monitored_validation_score(tmp_path, tiny_root, monitor, metric):
    """What a job returns to Hydra (and an optimising sweeper) is chosen on validation data, not the test set."""
    outcome = run_job(tmp_path, tiny_root, "a", f"train.monitor={monitor}")
    assert outcome.status == "FINISHED" and outcome.error is None
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.run_id)
    assert outcome.value == run.data.metrics[metric]
    assert outcome.value != run.data.metrics["test_loss"] and outcome.value != run.data.metrics["test_acc"] \
        or monitor == "valid_acc"  # tiny data: valid and test accuracy can both be 1.0


def test_a_failed_job_returns_its_outcome_instead_of_exiting(tmp_path, tiny_root):
    outcome = run_job(tmp_path, tiny_root, "bad", "optimizer=sgd", "optimizer.lr=1e12")
    assert outcome.status == "FAILED" and outcome.error.startswith("training diverged")
    assert outcome.value is None and outcome.run_id is not None


def test_finished_jobs_release_their_trackers(tmp_path, tiny_root):
    process = job.ProcessSettings()  # one process, several jobs (the basic launcher)
    before = dict(tracking.TRACKING_PROCESS.trackers)  # other tests' trackers, if any ran in this process
    for i in range(3):
        assert run_job(tmp_path, tiny_root, f"job{i}", f"train.seed={i}", process=process).status == "FINISHED"
        assert tracking.TRACKING_PROCESS.trackers == before  # nothing of the job is held in the tracking process
        assert [t.name for t in threading.enumerate() if t.name.startswith("fmnist")] == []
    assert len(process._datasets) == 1  # the data set was loaded once for the three jobs
    assert tracking.TRACKING_PROCESS.proc.poll() is None  # one tracking process served the three jobs


def test_outcomes_are_recorded_for_the_sweep_end(tmp_path):
    job.Outcome("FINISHED", value=0.3, run_id="r1").write((tmp_path / "0_a").mkdir() or tmp_path / "0_a")
    job.Outcome("FAILED", error="boom").write((tmp_path / "1_b").mkdir() or tmp_path / "1_b")
    assert [(n, o.status, o.error) for n, o in job.read_outcomes(tmp_path)] == [("0_a", "FINISHED", None),
                                                                                ("1_b", "FAILED", "boom")]
