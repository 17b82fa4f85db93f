"""The command a user types, checked through what it leaves: exit code, output, MLflow store, files. Run as a
user runs it (a subprocess, `e2e`) where the process is the point, through Hydra in this process (`app`) elsewhere."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import cli_env, run_cli, store_runs, tiny_overrides
from fmnist_exp import data, models, train

EPOCH_METRICS = {"train_loss", "valid_loss", "valid_acc", "lr", "epoch_time"}
FINAL_METRICS = {"test_loss", "test_acc", "best_epoch"}
TB_TAGS = {"Loss/train", "Loss/valid", "Accuracy/valid", "LR"}


def mlflow_client(cwd):
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_single_run_is_one_top_level_run(app, tmp_path, tiny_root):
    result = app(*tiny_overrides(tiny_root), "train.epochs=2", "optimizer=sgd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Epoch 2/2 | train loss" in result.stdout
    (run,) = store_runs(tmp_path)
    assert run["status"] == "FINISHED" and "mlflow.parentRunId" not in run["tags"]
    assert run["name"] == "data.valid_size=100 train.epochs=2 optimizer=sgd"  # paths left out
    r = mlflow_client(tmp_path).get_run(run["run_uuid"])
    assert r.data.params["optimizer.kind"] == "sgd" and r.data.params["data.batch_size"] == "100"
    assert EPOCH_METRICS | FINAL_METRICS <= set(r.data.metrics)
    history = mlflow_client(tmp_path).get_metric_history(r.info.run_id, "valid_loss")
    assert [m.step for m in history] == [1, 2]
    assert r.data.tags["fmnist.job_dir"].startswith(str(tmp_path / "outputs"))
    assert (Path(r.data.tags["fmnist.job_dir"]) / "fmnist_exp.log").is_file()  # hydra.job.name, not __main__
    assert len(r.outputs.model_outputs) == 1  # the MLflow model of a single run
    assert "pickle" not in (result.stdout + result.stderr).lower()  # the model is logged as pt2, no warning
    # the last line says where the results are; README's way to load the best model from there
    last = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert f"Results: {r.data.tags['fmnist.job_dir']} (best_model.pt" in last and r.info.run_id in last, last
    job_dir = r.data.tags["fmnist.job_dir"]
    model = models.load_best(OmegaConf.load(f"{job_dir}/config.yaml").model, job_dir)
    assert model.fc1.in_features == 784 and not model.training


@pytest.mark.e2e
def test_console_script_composes_the_same_config(tmp_path):
    script = Path(sys.executable).with_name("fmnist-exp")
    result = subprocess.run([str(script), "--cfg", "job", "optimizer=sgd"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optimizer"]["kind"] == "sgd" and cfg["train"]["epochs"] == 17


@pytest.mark.e2e
def test_help_is_the_apps_own(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("fmnist-exp: train Fashion-MNIST models") and "powered by Hydra" not in out
    assert "fmnist-exp -m optimizer=sgd,adam data.batch_size=16,100" in out and "python -m fmnist_exp.report" in out
    groups = dict(line.split(": ", 1) for line in out.split("== Configuration groups ==")[1].split("== Config ==")[0]
                  .splitlines() if ": " in line)
    assert groups["model"] == "cnn, mlp" and groups["optimizer"] == "adam, adamw, sgd"
    assert groups["schedule"] == "constant, cosine, plateau, step" and "schema" not in "".join(groups.values())
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in out and "-sc install=bash" in out


@pytest.mark.e2e
def test_schemas_are_not_options_but_still_check(tmp_path):
    result = run_cli("--cfg", "job", "optimizer=adam_schema", cwd=tmp_path)
    assert result.returncode == 1 and "Could not find 'optimizer/adam_schema'" in result.stderr
    result = run_cli("--cfg", "job", "optimizer=sgd", "optimizer.momentum=fast", cwd=tmp_path)
    assert result.returncode == 1 and "optimizer.momentum" in result.stderr  # the typed schema refuses it


@pytest.mark.e2e
def test_bash_completion_offers_the_real_options(tmp_path):
    """What `eval "$(fmnist-exp -sc install=bash)"` gives a user: <TAB> after `optimizer=` and `optimizer.m`."""
    bin_dir = Path(sys.executable).parent
    script = """eval "$(fmnist-exp -sc install=bash)"
complete_words() { COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1));
                   hydra_bash_completion; echo "${COMPREPLY[*]}"; }
complete_words fmnist-exp optimizer=
complete_words fmnist-exp optimizer=sgd optimizer.mo
complete_words fmnist-exp sched
"""
    env = cli_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["optimizer=adam", "optimizer=adamw", "optimizer=sgd"]
    assert lines[1].split() == ["optimizer.momentum="]
    assert "schedule=" in lines[2].split()


def test_bad_value_is_one_line_and_leaves_no_run(app, tmp_path, tiny_root):
    result = app(*tiny_overrides(tiny_root), "data.batch_size=0", cwd=tmp_path)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "data.batch_size=0 is invalid" in errors[0] and "Traceback" not in output
    assert store_runs(tmp_path) == [] if (tmp_path / "mlruns" / "mlflow.db").exists() else True


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_failed_job_stays_in_the_sweep_and_fails_the_sweep(app, tmp_path, tiny_root):
    result = app("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer.lr=0.01,-1", cwd=tmp_path)
    assert result.returncode == 1
    assert "1 of 2 jobs failed: data.valid_size=100 train.epochs=1 optimizer.lr=-1: optimizer.lr=-1.0 is invalid" in result.stderr
    runs = store_runs(tmp_path)
    assert sorted(r["status"] for r in runs) == ["FAILED", "FAILED", "FINISHED"]  # parent, bad job, good job
    failed_row = next(line for line in result.stdout.splitlines() if line.startswith("|") and "FAILED" in line)
    assert "| -1.0 " in failed_row and "optimizer.lr=-1.0 is invalid" in failed_row  # the lr column varies


@pytest.mark.e2e
@pytest.mark.slow
def test_design_card_sweep(tmp_path, real_data):
    """python -m fmnist_exp -m optimizer=sgd,adam data.batch_size=16,100 (1 epoch each) on the real data."""
    result = run_cli("-m", "optimizer=sgd,adam", "data.batch_size=16,100", "train.epochs=1", "train.progress=off",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = store_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 4
    (parent,) = parents
    assert parent["status"] == "FINISHED" and parent["name"].startswith("multirun/")
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parent["run_uuid"]}
    assert {c["status"] for c in children} == {"FINISHED"}
    assert {c["name"] for c in children} == {f"optimizer={o} data.batch_size={b} train.epochs=1"
                                             for o in ("sgd", "adam") for b in (16, 100)}

    client = mlflow_client(tmp_path)
    device = torch.device("cpu")
    dataset = data.load(tmp_path / "data", real_data, False, 10000, 0, device)
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("|") and "FINISHED" in line]
    assert len(table_lines) == 4  # the end-of-sweep table: one row per job
    for child in children:
        r = client.get_run(child["run_uuid"])
        assert EPOCH_METRICS | FINAL_METRICS <= set(r.data.metrics)
        for name in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(r.info.run_id, name)] == [1]
        assert r.data.metrics["valid_acc"] > 0.7
        # TensorBoard: the notebook's tags, in the job's Hydra output dir
        job_dir = r.data.tags["fmnist.job_dir"]
        tb = EventAccumulator(job_dir).Reload()
        assert TB_TAGS <= set(tb.Tags()["scalars"])
        # the checkpoint artifact is a plain state_dict that reproduces the logged test accuracy
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"best_model.pt", "config.yaml", "model_summary.txt"} <= artifacts
        cfg = yaml.safe_load(open(client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_path))))
        model = instantiate(cfg["model"])
        model.load_state_dict(torch.load(client.download_artifacts(r.info.run_id, "best_model.pt", str(tmp_path)),
                                         weights_only=True))
        _, test_acc = train.evaluate(model, dataset.test_x, dataset.test_y, cfg["data"]["eval_batch_size"])
        assert test_acc == pytest.approx(r.data.metrics["test_acc"], abs=1e-9)
        cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
        optimizer = {"sgd": "SGD", "adam": "Adam"}[r.data.params["optimizer.kind"]]  # as the table shows it
        row = next(cells(l) for l in table_lines
                   if optimizer in cells(l) and r.data.params["data.batch_size"] in cells(l))
        assert f"{r.data.metrics['test_acc']:.4f}" in row


@pytest.mark.e2e
def test_subprocesses_run_the_checkout_under_test(tmp_path):
    from conftest import ROOT, cli_env
    out = subprocess.run([sys.executable, "-c", "import fmnist_exp; print(fmnist_exp.__file__)"], cwd=tmp_path,
                         capture_output=True, text=True, env=cli_env()).stdout.strip()
    assert Path(out).resolve() == (ROOT / "fmnist_exp" / "__init__.py").resolve()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_built_wheel_runs_from_anywhere(tmp_path, tiny_root):
    """pip wheel . -> a clean venv (dependencies from this one, but not its editable install) -> a 1-epoch job
    run from an unrelated directory finds its configs."""
    import site
    from conftest import ROOT
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fmnist_exp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    # this venv's packages as a plain path: its .pth files (the editable install of the checkout) stay inactive
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import fmnist_exp; print(fmnist_exp.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env).stdout
    assert where.startswith(str(venv_site)), where
    result = subprocess.run([str(venv / "bin" / "fmnist-exp"), *tiny_overrides(tiny_root), "train.epochs=1",
                             "tracking.enabled=false"], cwd=elsewhere, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "Epoch 1/1" in result.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_cnn_recipe_reaches_092(tmp_path, real_data):
    """The CNN's own run, +experiment=cnn, 17 epochs on the real data: test accuracy >= 0.92 (0.925 measured)."""
    result = run_cli("+experiment=cnn", "train.progress=off", "tracking.enabled=false", cwd=tmp_path, timeout=3000)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = next(l for l in result.stdout.splitlines() if "Test (best checkpoint" in l)
    assert float(line.rsplit("accuracy", 1)[1]) >= 0.92, line


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_a_relative_sqlite_store_works(app, tmp_path, tiny_root):
    """tracking.uri=sqlite:///runs/x.db (relative, as `mlflow ui --backend-store-uri` takes it) failed with
    'relative path can't be expressed as a file URI' and a hint to make the store writable, leaving an empty db."""
    (tmp_path / "runs").mkdir()
    result = app(*tiny_overrides(tiny_root), "train.epochs=1", "tracking.uri=sqlite:///runs/x.db", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    (run,) = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'x.db'}").search_runs(["1"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"file://{tmp_path / 'runs'}")
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'x.db'}" in result.stderr + result.stdout
    assert not (tmp_path / "mlruns").exists()


def test_setup_says_when_the_disk_cannot_hold_the_venv(tmp_path):
    """`make setup` on a disk without room for PyTorch's ~6.3 GB says so in one line before pip starts, and
    leaves no half-made venv; with room, the check passes."""
    repo = Path(__file__).resolve().parent.parent
    venv = tmp_path / ".venv"
    full = subprocess.run(["make", "--no-print-directory", "-C", str(repo), f"VENV={venv}", "NEED_MB=100000000",
                           f"{venv}/.installed"], capture_output=True, text=True)
    assert full.returncode != 0
    assert f"the venv needs about 100000000 MB free (PyTorch's CUDA build) and {venv}'s disk has" in full.stdout
    assert "free some space and rerun" in full.stdout and not venv.exists()
    room = subprocess.run(["make", "--no-print-directory", "-C", str(repo), f"VENV={venv}", "NEED_MB=1", "disk"],
                          capture_output=True, text=True)
    assert room.returncode == 0 and room.stdout == "", room.stdout + room.stderr
