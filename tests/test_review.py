"""Sweep review end to end: a real sweep (one job failing), then the table, files, plots, MLflow and TensorBoard
records, the report command, the logged winner model and the MLflow UI in headless Chromium."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import cli_env, free_port, mlflow_server, run_cli, table_rows, tiny_overrides
from fmnist_exp import report, store


pytestmark = pytest.mark.xdist_group("review")  # under pytest-xdist (make test) one worker runs the module: one sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """optimizer.lr=0.01,0.00001,-1 on tiny data: two jobs finish (one barely learns), one fails its config check."""
    from conftest import make_tiny_set
    cwd = tmp_path_factory.mktemp("review")
    root = cwd / "data"
    make_tiny_set(root)
    result = run_cli("-m", *tiny_overrides(root), "train.epochs=3", "optimizer.lr=0.01,0.00001,-1", cwd=cwd)
    uri = f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fmnist")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    sweep_dir = next((cwd / "multirun").glob("*/*"))
    return dict(cwd=cwd, root=root, result=result, uri=uri, client=client, exp=exp, parent=parent,
                children=children, sweep_dir=sweep_dir)


@pytest.mark.e2e
def test_table_at_the_end_of_the_sweep(sweep):
    result = sweep["result"]
    assert result.returncode == 1  # one job failed
    header, *rows = table_rows(result.stdout)
    assert header[:3] == ["best", "lr", "status"]  # only the key that varies, readable
    assert {"epochs_run", "best_epoch", "ckpt_valid_loss", "ckpt_valid_acc", "test_loss", "test_acc",
            "train_time", "error"} <= set(header)
    assert [r[1] for r in rows] == ["0.01", "1e-05", "-1.0"]  # ranked by validation loss, as the user wrote them
    col = header.index("ckpt_valid_loss")
    losses = [float(r[col]) for r in rows if r[col]]
    assert losses == sorted(losses) and len(losses) == 2
    assert "Ranked by ckpt_valid_loss (lowest first" in result.stdout
    assert rows[0][0] == "★" and all(r[0] == "" for r in rows[1:])
    times = [r[header.index("train_time")] for r in rows if r[header.index("train_time")]]
    assert len(times) == 2 and all(re.fullmatch(r"\d+\.\d", t) for t in times), times  # seconds, one decimal
    failed = rows[-1]
    assert failed[header.index("status")] == "FAILED" and "optimizer.lr=-1.0 is invalid" in failed[header.index("error")]
    assert rows[0][header.index("epochs_run")] == "3"


@pytest.mark.e2e
def test_table_files_and_parent_artifacts(sweep):
    md, csv = sweep["sweep_dir"] / "sweep_table.md", sweep["sweep_dir"] / "sweep_table.csv"
    assert md.read_text().strip() in sweep["result"].stdout
    frame = pd.read_csv(csv)
    assert len(frame) == 3 and list(frame["status"]) == ["FINISHED", "FINISHED", "FAILED"]
    client, parent = sweep["client"], sweep["parent"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_table.md", "sweep_table.csv", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/sweep_valid_acc.png", "plots/sweep_test_acc.png"}
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


@pytest.mark.e2e
def test_child_plots_dataset_and_experiment_kind(sweep):
    client = sweep["client"]
    assert sweep["exp"].tags["mlflow.experimentKind"] == "custom_model_development"
    finished = [r for r in sweep["children"] if r.info.status == "FINISHED"]
    assert len(finished) == 2
    for r in finished:
        pngs = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert pngs == {"plots/learning_curves.png", "plots/confusion_matrix.png", "plots/test_samples.png"}
        for p in pngs:
            assert open(client.download_artifacts(r.info.run_id, p, str(sweep["cwd"])), "rb").read(4) == b"\x89PNG"
        (ds,) = r.inputs.dataset_inputs
        assert ds.dataset.name == "fashion-mnist" and '"valid": 100' in ds.dataset.profile


@pytest.mark.e2e
def test_tensorboard_hparams_and_sample_grid(sweep):
    for r in (r for r in sweep["children"] if r.info.status == "FINISHED"):
        job_dir = Path(r.data.tags["fmnist.job_dir"])
        assert [p for p in job_dir.iterdir() if p.is_dir() and p.name.startswith("Loss")] == []  # one run per job
        (layout,) = EventAccumulator(str(job_dir)).Reload().Tensors("custom_scalars__config__")
        chart = layout.tensor_proto.string_val[0]  # the serialized layout: one chart of both loss tags
        assert b"train and valid" in chart and b"Loss/train" in chart and b"Loss/valid" in chart
        events = EventAccumulator(r.data.tags["fmnist.job_dir"], size_guidance={"images": 0}).Reload()
        assert "Samples/test" in events.Tags()["images"]
        (grid,) = events.Images("Samples/test")  # the PNG written to plots/, as TensorBoard shows it
        assert Image.open(io.BytesIO(grid.encoded_image_string)).size == (grid.width, grid.height) == (1200, 950)
        assert grid.encoded_image_string == (job_dir / "plots" / "test_samples.png").read_bytes()
        hparams = events.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in hparams
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
        values = start.session_start_info.hparams  # each setting once, a number as a number (was also
        assert "optimizer.lr" not in values  # the override as text: two HPARAMS columns, one sorting as strings)
        assert values["lr"].WhichOneof("kind") == "number_value"
        assert values["lr"].number_value == pytest.approx(float(r.data.params["optimizer.lr"]))
        assert {"hparam/test_acc", "hparam/ckpt_valid_loss", "hparam/ckpt_valid_acc"} <= set(events.Tags()["scalars"])


@pytest.mark.e2e
def test_report_command(sweep):
    cwd, parent = sweep["cwd"], sweep["parent"]
    for target in ([str(sweep["sweep_dir"])], [parent.info.run_id], []):
        result = subprocess.run([sys.executable, "-m", "fmnist_exp.report", *target], cwd=cwd, capture_output=True,
                                text=True, env=cli_env())
        assert result.returncode == 0, result.stderr
        assert table_rows(result.stdout) == table_rows((sweep["sweep_dir"] / "sweep_table.md").read_text())
    grouped = subprocess.run([sys.executable, "-m", "fmnist_exp.report", "--by", "status"], cwd=cwd,
                             capture_output=True, text=True, env=cli_env())
    assert grouped.returncode == 1 and "not a key that varies" in grouped.stderr
    by_lr = subprocess.run([sys.executable, "-m", "fmnist_exp.report", "--by", "lr"], cwd=cwd,
                           capture_output=True, text=True, env=cli_env())  # lr -1 failed: said, not hidden
    assert by_lr.returncode == 0 and len(table_rows(by_lr.stdout)) == 1 + 2, by_lr.stdout
    assert "1 of 3 jobs did not finish and are left out of the means" in by_lr.stdout


def run_report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist_exp.report", *args], cwd=cwd, capture_output=True,
                          text=True, env=cli_env(), timeout=120)


@pytest.mark.e2e
def test_the_report_finds_a_sweeps_store_and_says_in_one_line_what_it_cannot_read(sweep, tmp_path):
    """From another folder, a sweep dir was read against ./mlruns (a new empty store made there, '(no jobs
    recorded)', then a traceback); a server that is down took 4 minutes of retries and a traceback; a plain path
    gave a traceback; a job's run id showed an empty table."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_dir = run_report(str(sweep["sweep_dir"]), cwd=elsewhere)  # the store the sweep dir records
    assert by_dir.returncode == 0, by_dir.stderr
    assert table_rows(by_dir.stdout) == table_rows((sweep["sweep_dir"] / "sweep_table.md").read_text())
    child = next(r for r in sweep["children"] if r.info.status == "FINISHED")
    by_job = run_report(child.info.run_id, "--tracking-uri", sweep["uri"], cwd=elsewhere)  # a job's run: its sweep
    assert by_job.returncode == 0 and table_rows(by_job.stdout) == table_rows(by_dir.stdout), by_job.stderr
    assert "is one job" in by_job.stderr
    db = sweep["uri"].removeprefix("sqlite:///")
    cases = {(): "error: no MLflow store at",  # nothing here: said, and no store made
             ("--tracking-uri", db): f"is a path, not a store URI: pass sqlite:///{db}",
             ("--tracking-uri", f"http://127.0.0.1:{free_port()}"): "(nothing answers there); start the server",
             # a run id asked of a server that is down: it said the id was neither a sweep dir nor a run
             (child.info.run_id, "--tracking-uri", f"http://127.0.0.1:{free_port()}"): "(nothing answers there)"}
    for args, message in cases.items():
        result = run_report(*args, cwd=elsewhere)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert list(elsewhere.iterdir()) == []
    single = run_cli(*tiny_overrides(sweep["root"]), "train.epochs=1", cwd=elsewhere)
    assert single.returncode == 0, single.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fmnist").experiment_id])
    result = run_report(run.info.run_id, cwd=elsewhere)
    assert result.returncode == 1 and "is a single run" in result.stderr and "not a sweep" in result.stderr


@pytest.mark.e2e
def test_report_by_an_option_the_sweep_chose(tmp_path, tiny_root):
    """A config group's option (regularization=batchnorm) is no column of the table: --by refused it; and
    replicates of a grid could not be averaged per grid point (one key only)."""
    result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "regularization=none,batchnorm",
                     "train.seed=0,1", "optimizer=sgd,adam", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    by_option = run_report("--by", "regularization", cwd=tmp_path)
    assert by_option.returncode == 0, by_option.stderr
    header, *rows = table_rows(by_option.stdout)
    assert header[:2] == ["regularization", "runs"] and sorted(r[0] for r in rows) == ["batchnorm", "none"]
    assert all(r[1] == "4" for r in rows)
    by_two = run_report("--by", "regularization,optimizer", cwd=tmp_path)
    header, *rows = table_rows(by_two.stdout)
    assert header[:3] == ["regularization", "optimizer", "runs"] and len(rows) == 4 and all(r[2] == "2" for r in rows)


@pytest.mark.e2e
def test_report_groups_replicates(tmp_path, tiny_root):
    result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam", "train.seed=0,1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    out = subprocess.run([sys.executable, "-m", "fmnist_exp.report", "--by", "optimizer"], cwd=tmp_path,
                         capture_output=True, text=True, env=cli_env()).stdout
    header, *rows = table_rows(out)
    assert header[:2] == ["optimizer", "runs"] and sorted(r[0] for r in rows) == ["Adam", "SGD"]
    assert all(r[1] == "2" and "±" in r[header.index("test_acc")] for r in rows)
    means = [float(r[header.index("ckpt_valid_loss")].split(" ± ")[0]) for r in rows]
    assert means == sorted(means) and "Ranked by mean ckpt_valid_loss" in out  # groups ranked on validation data
    by_key = subprocess.run([sys.executable, "-m", "fmnist_exp.report", "--by", "train.seed"], cwd=tmp_path,
                            capture_output=True, text=True, env=cli_env())  # the config key, or its column: seed
    assert by_key.returncode == 0, by_key.stderr
    header, *rows = table_rows(by_key.stdout)
    assert header[:2] == ["seed", "runs"] and sorted(r[0] for r in rows) == ["0", "1"]


@pytest.mark.e2e
def test_report_by_a_key_of_a_sweep_where_no_job_finished(tmp_path, tiny_root):
    result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd", "optimizer.lr=1e12,1e13",
                     cwd=tmp_path)  # both diverge
    assert result.returncode == 1 and "2 of 2 jobs failed" in result.stderr
    out = subprocess.run([sys.executable, "-m", "fmnist_exp.report", "--by", "optimizer.lr"], cwd=tmp_path,
                         capture_output=True, text=True, env=cli_env())
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: --by lr: no job of this sweep FINISHED, so there are no scores to average; "
        "run it without --by to see why each job stopped"]


@pytest.mark.e2e
def test_parent_run_describes_the_sweep(sweep):
    """What the runs list sorts and filters sweeps by: what was swept, how it was run, what every job shared, the
    winner's scores (the winner picked on validation data), job counts, the data set."""
    parent = sweep["client"].get_run(sweep["parent"].info.run_id)
    params, metrics = parent.data.params, parent.data.metrics
    assert params["sweep.optimizer.lr"] == "0.01,0.00001,-1"
    assert params["sweep.command"].startswith("python -m fmnist_exp -m data.root=")
    assert params["sweep.command"].endswith("train.epochs=3 optimizer.lr=0.01,0.00001,-1")
    assert params["train.epochs"] == "3" and params["optimizer.kind"] == "adam"  # shared
    assert "optimizer.lr" not in params  # varies: not a shared value
    # every sweep.* param is a swept key (or the command): the jobs' shared sweep.skip_finished=False is not one
    assert {k for k in params if k.startswith("sweep.")} == {"sweep.optimizer.lr", "sweep.command"}
    finished = [r for r in sweep["children"] if r.info.status == "FINISHED"]
    best = min(finished, key=lambda r: r.data.metrics["ckpt_valid_loss"])
    assert metrics["jobs"] == 3 and metrics["jobs_failed"] == 1
    assert metrics["winner_valid_loss"] == best.data.metrics["ckpt_valid_loss"]
    assert metrics["winner_valid_acc"] == best.data.metrics["ckpt_valid_acc"]
    assert metrics["winner_test_acc"] == best.data.metrics["test_acc"]
    assert parent.data.tags["fmnist.winner_run_id"] == best.info.run_id
    error = parent.data.tags["error"]  # why, where the UI shows the parent FAILED
    assert parent.info.status == "FAILED" and error.startswith("1 of 3 jobs did not finish (see sweep_table.md): ")
    assert error.endswith(" optimizer.lr=-1: FAILED")
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "fashion-mnist" and json.loads(dataset.dataset.profile)["train"] > 0
    view = sweep["client"].get_experiment(sweep["exp"].experiment_id).tags["mlflow.sharedViewState.sweeps"]
    assert "metrics.`winner_test_acc`" in json.loads(view)["selectedColumns"]
    url = f"/#/experiments/{sweep['exp'].experiment_id}/runs?viewStateShareKey=sweeps"
    assert f"All sweeps side by side: http://127.0.0.1:5000{url} (after make ui)" in sweep["result"].stdout


@pytest.mark.e2e
def test_winner_is_a_servable_mlflow_model(sweep):
    import mlflow.artifacts
    import mlflow.pyfunc
    mlflow.set_tracking_uri(sweep["uri"])
    parent = sweep["client"].get_run(sweep["parent"].info.run_id)
    best = min((r for r in sweep["children"] if r.info.status == "FINISHED"),
               key=lambda r: r.data.metrics["ckpt_valid_loss"])  # chosen on validation data
    assert parent.data.tags["fmnist.winner"].endswith(f"({best.info.run_id})")
    assert parent.data.tags["fmnist.winner_run_id"] == best.info.run_id
    assert parent.data.tags["fmnist.winner_ranked_by"] == "ckpt_valid_loss"
    model = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model")
    assert model.metadata.signature is not None
    out = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert np.asarray(out).shape == (3, 10)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{parent.info.run_id}/model"))
    assert [p.name for p in (local / "data").iterdir()] == ["model.pt2"]  # a torch.export graph, not a pickle
    output = sweep["result"].stdout + sweep["result"].stderr
    assert "pickle" not in output.lower() and "WARNING" not in output


@pytest.mark.e2e
def test_winner_serves_through_mlflow_models_predict(sweep, tmp_path):
    """The README's serving command, as a user runs it, on the winner the sweep logged."""
    (tmp_path / "input.json").write_text(json.dumps({"inputs": np.zeros((4, 1, 28, 28)).tolist()}))
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    result = subprocess.run([str(mlflow_cli), "models", "predict", "-m",
                             f"runs:/{sweep['parent'].info.run_id}/model", "-i", "input.json", "-t", "json",
                             "--env-manager", "local"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=cli_env({"MLFLOW_TRACKING_URI": sweep["uri"]}))
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    assert np.asarray(predictions).shape == (4, 10)


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.slow
def test_mlflow_ui_shows_the_sweep(sweep, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: make test installs it (apt-get install -y chromium)")
    single = sweep["client"].create_run(sweep["exp"].experiment_id, run_name="a-single-run")  # no winner: not shown
    sweep["client"].set_terminated(single.info.run_id)
    with mlflow_server(sweep["uri"]) as url:
        page = f"{url}/#/experiments/{sweep['exp'].experiment_id}/runs?viewStateShareKey=sweeps"  # printed by the sweep
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              "--window-size=1600,1000",  # a laptop's: the runs table renders the columns in view
                              "--virtual-time-budget=20000", "--disable-background-networking",
                              "--disable-component-update", "--disable-default-apps", "--disable-sync",
                              "--no-first-run", "--disable-extensions", "--metrics-recording-only",
                              f"--user-data-dir={tmp_path / 'chrome'}", page],
                             capture_output=True, text=True, timeout=180).stdout
    sweep["client"].delete_run(single.info.run_id)
    assert sweep["parent"].info.run_name in dom and "a-single-run" not in dom
    parent = sweep["client"].get_run(sweep["parent"].info.run_id)
    for metric in ("winner_test_acc", "winner_valid_loss", "winner_valid_acc", "jobs_failed"):
        assert f'col-id="metrics.`{metric}`"' in dom and f">{metric}<" in dom  # the column and its header
    value = parent.data.metrics["winner_test_acc"]
    assert f">{int(value) if value.is_integer() else value}<" in dom  # the parent's row shows it, as JS prints it


@pytest.mark.parametrize("monitor,order", [("valid_loss", ["a", "c", "b"]), ("valid_acc", ["c", "a", "b"])])
def test_jobs_are_ranked_on_validation_data_never_on_test_scores(tmp_path, monitor, order):
    """b has the best test accuracy but the worst validation scores: it must not win."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent = store.create_run(uri, "fmnist", "sweep")
    c = MlflowClient(tracking_uri=uri)
    for name, valid_loss, valid_acc, test_acc in [("a", 0.30, 0.90, 0.85), ("b", 0.40, 0.88, 0.93),
                                                  ("c", 0.35, 0.91, 0.88)]:
        _, run_id = store.create_run(uri, "fmnist", name, {"fmnist.overrides": name}, parent)
        c.log_param(run_id, "optimizer.lr", {"a": "0.1", "b": "0.2", "c": "0.3"}[name])
        c.log_param(run_id, "train.monitor", monitor)
        for key, value in [("ckpt_valid_loss", valid_loss), ("ckpt_valid_acc", valid_acc), ("test_acc", test_acc)]:
            c.log_metric(run_id, key, value)
        store.end_run(uri, run_id, "FINISHED")
    table = report.sweep_table(uri, exp_id, parent)
    assert list(table["name"]) == order and list(table["best"]) == ["★", "", ""]
    assert table.attrs["ranked_by"][0] == {"valid_loss": "ckpt_valid_loss", "valid_acc": "ckpt_valid_acc"}[monitor]


@pytest.mark.parametrize("key,values", [("optimizer.kind", ["sgd", "adam"]),
                                        ("optimizer._target_", ["torch.optim.SGD", "torch.optim.Adam"])])
def test_the_table_names_the_optimizer_as_it_did_when_its_key_was_a_target(tmp_path, key, values):
    """optimizer.kind (sgd) has the column and the value optimizer._target_ (torch.optim.SGD) had: optimizer, SGD,
    in the same place; sweeps recorded with either read the same."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent = store.create_run(uri, "fmnist", "sweep")
    c = MlflowClient(tracking_uri=uri)
    for name, value, betas, lr in [("a", values[0], "[0.9, 0.999]", "0.1"), ("b", values[1], "[0.8, 0.99]", "0.001")]:
        _, run_id = store.create_run(uri, "fmnist", name, {"fmnist.overrides": name}, parent)
        for k, v in [(key, value), ("optimizer.betas", betas), ("optimizer.lr", lr), ("data.batch_size", "100")]:
            c.log_param(run_id, k, v)
        c.log_metric(run_id, "ckpt_valid_loss", 0.5)
        store.end_run(uri, run_id, "FINISHED")
    table = report.sweep_table(uri, exp_id, parent)
    assert list(table.columns[2:5]) == ["optimizer", "betas", "lr"]
    assert sorted(table["optimizer"]) == ["Adam", "SGD"]
    assert sorted(report.grouped(table, "optimizer")["optimizer"]) == ["Adam", "SGD"]  # --by optimizer


def test_sweep_params_follow_hydras_precedence(monkeypatch):
    """The sweeper's params (+experiment=notebook) as written, the command line winning, as Hydra's sweeper does."""
    from omegaconf import OmegaConf

    from fmnist_exp import callbacks
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"optimizer": "sgd,adam", "data.batch_size": "100,16",
                                                             "ablation": "plain,he,he_bn,he_bn_dropout"}},
                                      "overrides": {"task": ["+experiment=notebook", "optimizer=sgd",
                                                             "data.batch_size=16,32", "train.seed=range(0,3)"]}}})
    monkeypatch.setattr(sys, "argv", ["/x/fmnist-exp", "+experiment=notebook", "optimizer=sgd",
                                      "data.batch_size=16,32", "train.seed=range(0,3)"])
    assert callbacks.sweep_params(cfg) == {
        "sweep.data.batch_size": "16,32", "sweep.ablation": "plain,he,he_bn,he_bn_dropout",
        "sweep.train.seed": "range(0,3)",
        "sweep.command": "fmnist-exp +experiment=notebook optimizer=sgd data.batch_size=16,32 'train.seed=range(0,3)'"}


def test_a_parent_left_running_is_ended_at_exit(tmp_path):
    """What the exit hook of a sweep does when its launcher raised before the sweep's end (cancelled cluster jobs):
    KILLED saying why, once a job has recorded something; deleted when none had (nothing ran)."""
    from fmnist_exp import callbacks, job
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0_optimizer=sgd").mkdir(parents=True)
    exp, parent = store.create_run(uri, "fmnist", "sweep")
    callbacks.end_if_running(uri, parent, exp, sweep_dir)
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.lifecycle_stage == "deleted"
    job.Outcome("KILLED", error="cancelled").write(sweep_dir / "0_optimizer=sgd")
    _, parent = store.create_run(uri, "fmnist", "sweep")
    callbacks.end_if_running(uri, parent, exp, sweep_dir)
    run = MlflowClient(tracking_uri=uri).get_run(parent)
    assert run.info.status == "KILLED" and "sweep.skip_finished=true" in run.data.tags["error"]
    assert run.info.lifecycle_stage == "active"
    _, done = store.create_run(uri, "fmnist", "finished sweep")
    store.end_run(uri, done, "FINISHED")
    callbacks.end_if_running(uri, done, exp, sweep_dir)
    assert MlflowClient(tracking_uri=uri).get_run(done).info.status == "FINISHED"  # a sweep that ended is untouched


def test_a_store_that_fails_at_the_sweeps_end_is_an_error_not_a_warning(tmp_path, caplog):
    """Hydra turns a callback's exception into a warning: a store that failed while the table was made let a sweep
    with a FAILED job exit 0. Now one line says what was not recorded, and the sweep exits 1."""
    from hydra._internal.callbacks import Callbacks
    from omegaconf import OmegaConf

    from fmnist_exp import job
    sweep_dir = tmp_path / "sweep"
    for name, status in [("0_optimizer=sgd", "FINISHED"), ("1_optimizer=adam", "FAILED")]:
        (sweep_dir / name).mkdir(parents=True)
        job.Outcome(status, error="diverged" if status == "FAILED" else None).write(sweep_dir / name)
    gone = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"  # its folder does not exist: every request fails
    (sweep_dir / store.PARENT_FILE).write_text(json.dumps({"uri": gone, "experiment_id": "1", "run_id": "r"}))
    cfg = OmegaConf.create({"hydra": {"callbacks": {"sweep": {"_target_": "fmnist_exp.callbacks.SweepCallback"}},
                                      "sweep": {"dir": str(sweep_dir)}}})
    with pytest.raises(SystemExit) as e, caplog.at_level("ERROR"):
        Callbacks(cfg).on_multirun_end(config=cfg)
    assert e.value.code == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(f"The sweep's table and winner were not recorded: the MLflow store {gone} failed (")
    assert f"python -m fmnist_exp.report {sweep_dir} prints the table" in line


def test_a_store_that_fails_as_the_parent_run_is_made_leaves_no_parent(tmp_path, tiny_root, monkeypatch, caplog):
    """The parent made, then a write to it refused: the parent stayed RUNNING for good, with no exit hook to end it,
    and the jobs ran without it. Now one line, exit 1, and no parent run left."""
    from hydra._internal.callbacks import Callbacks
    from mlflow.exceptions import MlflowException

    from conftest import compose_cfg
    from fmnist_exp import callbacks
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(*tiny_overrides(tiny_root), f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      hydra=True)
    monkeypatch.setattr(callbacks.store, "log_params",
                        lambda *a: (_ for _ in ()).throw(MlflowException("database is locked")))
    with pytest.raises(SystemExit) as e, caplog.at_level("ERROR"):
        Callbacks(cfg).on_multirun_start(config=cfg)
    assert e.value.code == 1
    assert any("cannot write to the MLflow store" in r.getMessage() and "database is locked" in r.getMessage()
               for r in caplog.records)
    assert [r.info.lifecycle_stage for r in MlflowClient(tracking_uri=uri).search_runs(
        ["1"], run_view_type=3)] == ["deleted"]


@pytest.mark.e2e  # the empty sweep's parent is deleted at the process's exit
def test_a_typo_in_a_swept_value_records_no_sweep(tmp_path, tiny_root):
    """`-m optimizer=sgd,adamm`: Hydra refuses the sweep when it composes the jobs, after the parent run was made;
    that parent stayed KILLED saying to rerun with skip_finished (which cannot help), and the report's newest sweep
    was this empty one. Now Hydra's error, and no sweep in the store: the report shows the last real sweep."""
    good = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adam", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    bad = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer=sgd,adamm", cwd=tmp_path)
    assert bad.returncode == 1 and "Could not find 'optimizer/adamm'" in bad.stderr, bad.stderr[-2000:]
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    active = c.search_runs(["1"])
    assert len(active) == 3 and all(r.info.status == "FINISHED" for r in active), active  # the good sweep only
    report = run_report(cwd=tmp_path)
    assert report.returncode == 0 and report.stdout.count("FINISHED") == 2, report.stdout


@pytest.mark.e2e
def test_the_report_names_the_jobs_a_stopped_sweep_never_started(tmp_path):
    """Ctrl-C to a sweep whose later groups had not started: those jobs have no run, so the report showed only the
    started ones (and dropped the batch_size column, which no longer varied), and nothing said 2 of 4 were missing."""
    import signal
    from conftest import make_tiny_set
    make_tiny_set(tmp_path / "slowdata", n_train=16000, n_test=500)
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", "-m", "hydra.launcher.n_jobs=1",
                             *tiny_overrides(tmp_path / "slowdata"), "train.epochs=3", "optimizer=sgd,adam",
                             "data.batch_size=16,100"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env())
    for line in proc.stdout:
        if "Epoch 1/3" in line:  # the first group (batch 16, the costlier) trains; batch 100's waits
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    out = run_report(cwd=tmp_path).stdout
    line = next(l for l in out.splitlines() if "have no run" in l)
    assert line.startswith("2 of 4 jobs have no run (stopped before they started, or lost): "), line
    assert "optimizer=sgd data.batch_size=100" in line and "optimizer=adam data.batch_size=100" in line, line
    assert "sweep.skip_finished=true" in line
