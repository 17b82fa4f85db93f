"""The Tracker writes through the tracking process: in order, all of it by `finish`, and a failed write is never lost."""
from __future__ import annotations

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_exp import tracking

EPOCH = {"train_loss": 0.5, "valid_loss": 0.4, "valid_acc": 0.8, "lr": 1e-3, "epoch_time": 0.1}


@pytest.fixture
def tracker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    return tracking.Tracker(uri, "exp", tmp_path / "job")


def test_writes_arrive_in_order_and_finish_waits_for_them(tracker, tmp_path):
    tracker.start("a run", {"optimizer.lr": "0.001"}, {"fmnist.job_dir": str(tmp_path)})
    for epoch in (1, 2, 3):
        tracker.log_epoch(epoch, {**EPOCH, "valid_acc": 0.7 + epoch / 100})
    tracker.log_metrics({"test_acc": 0.81})
    tracker.finish("FINISHED")
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"optimizer.lr": "0.001"}
    history = MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "valid_acc")
    assert [(m.step, round(m.value, 2)) for m in history] == [(1, 0.71), (2, 0.72), (3, 0.73)]
    assert run.data.metrics["test_acc"] == 0.81
    tb = EventAccumulator(str(tmp_path / "job")).Reload()
    assert [e.step for e in tb.Scalars("Accuracy/valid")] == [1, 2, 3]


def test_a_failed_write_stops_the_next_epoch_and_the_run_ends_failed(tracker, tmp_path):
    tracker.start("a run", {}, {})
    tracker.log_artifact(tmp_path / "no such file")
    from fmnist_exp.tracking import TRACKING_PROCESS
    TRACKING_PROCESS.call(tracker._id, "sync")  # the tracking process has reached the failing upload
    with pytest.raises(tracking.TrackingError) as e:
        tracker.log_epoch(1, EPOCH)
    assert "\n" not in str(e.value) and "tracking.enabled=false" in str(e.value)
    tracker.finish("FAILED", str(e.value))
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "no such file" in run.data.tags["error"]


def test_finish_ends_the_run_even_when_a_last_write_failed(tracker, tmp_path):
    tracker.start("a run", {}, {})
    tracker.log_epoch(1, EPOCH)
    tracker.log_artifact(tmp_path / "no such file")
    with pytest.raises(tracking.TrackingError):
        tracker.finish("FINISHED")
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.status != "RUNNING"
    assert [m.step for m in MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "valid_acc")] == [1]


def test_disabled_tracker_writes_nothing(tmp_path):
    t = tracking.Tracker(None, "exp", tmp_path / "job", enabled=False)
    t.start("a run", {}, {})
    t.log_epoch(1, EPOCH)
    t.finish("FINISHED")
    assert t.run_id is None and not (tmp_path / "job").exists()
