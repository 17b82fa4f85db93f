"""The Tracker writes through the tracking process: in order, all of it by `finish`, and a failed write is never lost."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_exp import store, tracking

EPOCH = {"train_loss": 0.5, "valid_loss": 0.4, "valid_acc": 0.8, "lr": 1e-3, "epoch_time": 0.1}


@pytest.fixture
def tracker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    t = tracking.Tracker(uri, "exp", tmp_path / "job")
    yield t
    t.close()


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


def test_a_model_exported_by_the_training_process_is_the_model_mlflow_pytorch_logs(tmp_path):
    """store.log_model writes mlflow.pytorch.save_model's pt2 files around a graph exported elsewhere: the same
    MLmodel, files and requirements as mlflow.pytorch.log_model, and both load and predict alike."""
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    import numpy as np
    import torch
    import yaml
    from mlflow.models import infer_signature

    from fmnist_exp import models
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = models.MLP(batch_norm=True).eval()
    example = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    _, ours = store.create_run(uri, "exp", "ours")
    output = models.export(model, example, tmp_path / "model.pt2")
    store.log_model(uri, ours, tmp_path / "model.pt2", example, output, str(torch.__version__))
    _, theirs = store.create_run(uri, "exp", "mlflow.pytorch")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=theirs):
        mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, output), input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                 serialization_format="pt2")
    dirs = {run: Path(mlflow.artifacts.download_artifacts(f"runs:/{run}/model", dst_path=str(tmp_path / run)))
            for run in (ours, theirs)}
    files = {run: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for run, d in dirs.items()}
    assert files[ours] == files[theirs] and "data/model.pt2" in files[ours]
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml", "input_example.json",
                 "serving_input_example.json"):
        assert (dirs[ours] / name).read_text() == (dirs[theirs] / name).read_text(), name
    mlmodel = {run: yaml.safe_load((d / "MLmodel").read_text()) for run, d in dirs.items()}
    for key in ("flavors", "signature", "saved_input_example_info", "mlflow_version"):
        assert mlmodel[ours][key] == mlmodel[theirs][key], key
    client = MlflowClient(uri)
    assert len(client.get_run(ours).outputs.model_outputs) == 1
    logged = {run: client.get_logged_model(client.get_run(run).outputs.model_outputs[0].model_id)
              for run in (ours, theirs)}
    assert logged[ours].experiment_id == logged[theirs].experiment_id == client.get_run(ours).info.experiment_id
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)  # another batch size: dynamic
    predictions = [mlflow.pyfunc.load_model(f"runs:/{run}/model").predict(x) for run in (ours, theirs)]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predictions[0], expected, atol=1e-6)
    np.testing.assert_allclose(predictions[1], expected, atol=1e-6)


@pytest.mark.parametrize("jobs,spare,requested,expected", [
    (256, 15, None, 8),  # a GPU worker's big group on a 16-core host: its plots drawn 8 at a time
    (16, 7, None, 2), (16, 0, None, 1),  # 2 workers on 2 cores leave no spare core: one process each
    (1, 15, None, 1), (5, 0, 3, 3),  # a single run; tracking.processes as asked
])
def test_how_many_tracking_processes_a_group_spreads_over(jobs, spare, requested, expected):
    assert tracking.processes_for(jobs, spare, requested) == expected


def test_jobs_spread_over_tracking_processes_each_write_in_order_in_its_own(tmp_path, monkeypatch):
    """A group's trackers round-robin over several tracking processes: each job's run is complete and in order,
    and the processes are really several."""
    monkeypatch.setattr(tracking, "PROCESSES", [tracking.TRACKING_PROCESS])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    try:
        trackers = [tracking.Tracker(uri, "exp", tmp_path / f"job{i}", process=tracking.pick_process(i, 3))
                    for i in range(5)]
        assert len({t._proc.proc.pid for t in trackers}) == 3
        for i, t in enumerate(trackers):
            t.start(f"run {i}", {"i": str(i)}, {})
        for epoch in (1, 2):
            for t in trackers:
                t.log_epoch(epoch, EPOCH)
        for t in trackers:
            t.finish("FINISHED")
            t.close()
    finally:
        for p in tracking.PROCESSES[1:]:  # the extra processes, whatever happened
            p.stop()
    c = MlflowClient(uri)
    for i, t in enumerate(trackers):
        assert c.get_run(t.run_id).info.status == "FINISHED" and c.get_run(t.run_id).data.params == {"i": str(i)}
        assert [m.step for m in c.get_metric_history(t.run_id, "valid_loss")] == [1, 2]
        assert [e.step for e in EventAccumulator(str(tmp_path / f"job{i}")).Reload().Scalars("Loss/valid")] == [1, 2]


OPEN_STORE = """
import sys, time
from pathlib import Path
from fmnist_exp import store
uri, here = sys.argv[1], Path(sys.argv[2])
(here / f"ready{sys.argv[3]}").touch()
while not (here / "go").exists():
    time.sleep(0.005)
print(store.experiment_id(uri, "exp"))
"""


@pytest.mark.e2e
def test_processes_that_open_a_new_store_at_once_all_get_it(tmp_path):
    """Several processes (a group's tracking processes, two runs started together) open a new SQLite store at the
    same moment: each gets the same experiment. Without the store's lock file, MLflow's table creation in one
    process meets another's half-done migration ("duplicate column", "out-of-date database schema")."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [err.strip().splitlines()[-1:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1


def test_a_server_check_uses_the_proxies_of_now_not_those_of_the_first_download(tmp_path, monkeypatch):
    """urlopen's global opener keeps the proxies it saw first: a download tried under a dead proxy (the bad-input
    tests' NO_NETWORK) made every later check of a server on 127.0.0.1 in that process say that nothing answers."""
    import http.server
    import threading
    import urllib.error
    import urllib.request
    monkeypatch.setattr(urllib.request, "_opener", None)
    with monkeypatch.context() as m:
        m.setenv("http_proxy", "http://127.0.0.1:9")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen("http://fashion-mnist.invalid/train-images-idx3-ubyte.gz", timeout=5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store.check_server(f"http://127.0.0.1:{server.server_port}")  # answers 501: something is there
    finally:
        server.shutdown()
        server.server_close()
        store._ANSWERED.clear()
