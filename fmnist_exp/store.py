"""The MLflow store, written once: where it is (URIs), experiments, what a run records, and every query and run end
(status, error tag) the app makes. Only this module and tracking_process.py (the process that writes a job's run)
import mlflow, inside functions: a process that never reads the store never pays for importing it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

# A machine without the git program (a bare container): GitPython's import would fail, and with it every run;
# quiet, MLflow just records no commit. Set before MLflow imports GitPython, here and in the tracking process.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


class TrackingError(RuntimeError):
    """The tracking store cannot be used, or a run asked for is not in it."""


def __getattr__(name: str):
    """`store.MlflowException`, what a failed request to the store raises, imported only when an `except` clause
    meets an exception: importing mlflow costs a process that never reads the store about a second."""
    if name == "MlflowException":
        from mlflow.exceptions import MlflowException
        return MlflowException
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes or hosts find their parent
# A saved view of the MLflow UI's runs list that compares whole sweeps: each parent run's winner scores, job counts
# and command (a new runs list shows no metric columns). Open it at
# <ui>/#/experiments/<id>/runs?viewStateShareKey=sweeps
SWEEPS_VIEW = "sweeps"
# Only sweeps' parent runs (single runs have no winner), and only columns a parent fills: at a laptop's width the
# winner columns were off-screen behind a Dataset column and two per-job columns that are empty on a parent.
SWEEPS_VIEW_STATE = json.dumps({
    "selectedColumns": [*(f"metrics.`{m}`" for m in ("winner_test_acc", "winner_valid_loss", "winner_valid_acc",
                                                     "jobs", "jobs_failed")), "params.`sweep.command`"],
    "searchFilter": "tags.`fmnist.sweep_dir` != ''",
    "orderByKey": "attributes.start_time", "orderByAsc": False})
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",  # MLflow 3 UI: not a GenAI experiment
                   f"mlflow.sharedViewState.{SWEEPS_VIEW}": SWEEPS_VIEW_STATE}


DEFAULT_STORE = Path("mlruns") / "mlflow.db"  # under the working dir: where runs go without tracking.uri


def default_uri() -> str:
    """The store runs use without tracking.uri: SQLite in ./mlruns/mlflow.db."""
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: the given one, or SQLite in ./mlruns/mlflow.db (MLflow 3.17 refuses the file store, and a
    directory or file: URI is refused here in one line, before the data set loads). A
    relative SQLite path (sqlite:///runs/x.db, as `mlflow ui` takes it) is made absolute: MLflow cannot make an
    artifact location from it, and a sweep's jobs may run elsewhere."""
    # a directory: MLflow would say so only after the data set loaded, cut at 300 characters ("databricks" is a URI)
    if uri and urllib.parse.urlparse(uri).scheme in ("", "file") and uri not in ("databricks", "databricks-uc"):
        where = Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri)
        raise TrackingError(f"tracking.uri={uri} is a directory (MLflow's file store), which MLflow 3 no longer "
                            f"writes: pass tracking.uri=sqlite:///{where / 'mlflow.db'} (SQLite in that directory) "
                            "or the http:// address of an MLflow server")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path.cwd() / uri.removeprefix('sqlite:///')}"
    if uri and uri.startswith(("http://", "https://")):
        check_server(uri)
    if uri:
        return uri
    mlruns = Path.cwd() / DEFAULT_STORE.parent
    try:
        mlruns.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(f"cannot create the MLflow store directory {mlruns} ({e.strerror}); "
                            "make it writable or pass tracking.uri=... (or tracking.enabled=false)")
    return default_uri()


_ANSWERED: set[str] = set()


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow server that does not answer fails here in one line: MLflow's own client retries each request for
    minutes (a mistyped port hung a run ~8 min, silent, before its error)."""
    import urllib.error
    import urllib.request
    if uri in _ANSWERED:
        return
    try:  # an opener of its own: urlopen's global one keeps the proxies of its first call (a download's, maybe)
        with urllib.request.build_opener().open(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # something answers (a server without /health, or behind a proxy): MLflow will say what it is
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"nothing answers at tracking.uri={uri} ({reason}): start the MLflow server "
                            "(mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db --port PORT), fix the URI, "
                            "or pass tracking.enabled=false") from None
    _ANSWERED.add(uri)


def first_line(e: BaseException, limit: int = 300) -> str:
    """What an exception says, as one line for a one-line error (its type when it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def store_error(uri: str, e: Exception) -> TrackingError:
    """One line for a store that refuses us (unwritable SQLite file, unreachable server, ...)."""
    reason = first_line(e)
    return TrackingError(f"cannot write to the MLflow store {uri} ({reason}); make it writable or reachable, "
                         "or pass tracking.uri=... (or tracking.enabled=false)")


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store under mlruns/; a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    mlruns = Path(uri.removeprefix("sqlite:///")).parent
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (mlruns / "artifacts" / safe).as_uri()


_OPENED: set[str] = set()  # SQLite stores this process has opened (and so found created)


def client(uri: str):
    """A client of the store at `uri`. The first one a process makes for a SQLite store holds the store's lock
    file: MLflow creates a new database's tables and migrates them when it opens it, and a second process that
    opens it meanwhile sees a half-migrated schema ("out-of-date database schema") and fails."""
    from mlflow import MlflowClient
    if uri in _OPENED or not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock
    lock = FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=120)
    try:
        lock.acquire()
    except (OSError, NotImplementedError):  # no directory, unwritable (MLflow's own error follows), held 2 min
        # (Timeout), or no flock on this filesystem (filelock 3 raises NotImplementedError; 4 falls back itself)
        return MlflowClient(tracking_uri=uri)
    try:
        c = MlflowClient(tracking_uri=uri)
    finally:
        lock.release()
    _OPENED.add(uri)
    return c


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment `name`; safe when two processes race to create it."""
    from mlflow.exceptions import MlflowException
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(uri, name), tags=EXPERIMENT_TAGS)
        except MlflowException:
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


def add_sweeps_view(uri: str, experiment_id: str) -> None:
    """Experiments made by older versions lack the sweeps view; it is set again before every sweep."""
    client(uri).set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SWEEPS_VIEW}", SWEEPS_VIEW_STATE)


def sweeps_view_url(uri: str, experiment_id: str) -> str:
    """Where the sweeps view opens: in `make ui` for a local store, else on the tracking server."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"  # make ui
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={SWEEPS_VIEW}"


def git_commit() -> str | None:
    """The commit of the checkout the code runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def config_hash(params: dict[str, str], ignore: set[str]) -> str:
    """A stable id of what a run computes: its flattened config without the where/how keys."""
    kept = sorted((k, v) for k, v in params.items() if k not in ignore and not k.startswith("sweep."))
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: the resolved config as MLflow params."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(tree)}


def create_run(uri: str, experiment: str, name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> tuple[str, str]:
    """Create a RUNNING run (a sweep parent, or a child when `parent_run_id` is given); returns (exp id, run id)."""
    exp_id = experiment_id(uri, experiment)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client(uri).create_run(exp_id, run_name=name, tags=tags)
    return exp_id, run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Params on a run, in batches of MLflow's limit, values cut to its length limit."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
    items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client(uri).log_batch(run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def log_metric_steps(uri: str, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """Metrics with steps (a search's best_so_far by trial number), in batches of MLflow's limit."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(step)) for k, points in series.items() for step, v in points]
    for i in range(0, len(metrics), 1000):
        client(uri).log_batch(run_id, metrics=metrics[i:i + 1000])


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_dataset_of(uri: str, run_id: str, runs: list) -> None:
    """The data set that the first of `runs` to record one trained on, as `run_id`'s dataset input (the runs
    table's Dataset column): a sweep's parent shows what its jobs trained on."""
    from mlflow.entities import DatasetInput
    inputs = next((r.inputs.dataset_inputs for r in runs if r.inputs and r.inputs.dataset_inputs), [])
    if inputs:
        client(uri).log_inputs(run_id, [DatasetInput(i.dataset, i.tags) for i in inputs])


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    client(uri).set_tag(run_id, key, value)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tags on a run, one write each, in order."""
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


def end_run(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """End a run with `status` (FINISHED, FAILED, KILLED); `error` first, as its error tag: why, in the UI."""
    if error:
        client(uri).set_tag(run_id, "error", error)
    client(uri).set_terminated(run_id, status=status)


def end_killed(uri: str, run_id: str, error: str, only_if_running: bool = False) -> bool:
    """End a run KILLED saying why (its error tag, then the status); with `only_if_running`, only a run still
    RUNNING (one that has ended keeps its end). Returns whether it ended the run."""
    if only_if_running and client(uri).get_run(run_id).info.status != "RUNNING":
        return False
    end_run(uri, run_id, "KILLED", error)
    return True


def discard_run(uri: str, run_id: str) -> None:
    """End a run that recorded nothing KILLED, then delete it (MLflow's soft delete: out of the UI, the report and
    the sweeps view)."""
    end_run(uri, run_id, "KILLED")
    client(uri).delete_run(run_id)


def sweep_tag(parent_run_id: str) -> str:
    """Tag set on an earlier run that a resumed sweep reused (skipped as FINISHED, or continued)."""
    return f"fmnist.sweep.{parent_run_id}"


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    """The runs of a sweep, oldest first: its children and the earlier runs it reused."""
    c = client(uri)
    own = c.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                        order_by=["attributes.start_time ASC"], max_results=10000)
    reused = c.search_runs([experiment_id], filter_string=f"tags.`{sweep_tag(parent_run_id)}` = 'reused'",
                           order_by=["attributes.start_time ASC"], max_results=10000)
    seen = {r.info.run_id for r in own}
    return own + [r for r in reused if r.info.run_id not in seen]


def get_run(uri: str, run_id: str):
    """The run `run_id` (MLflow's error if the store has none)."""
    return client(uri).get_run(run_id)


def find_run(uri: str, run_id: str):
    """The run `run_id`, or None if the store has no such run; a store that fails raises."""
    from mlflow.exceptions import MlflowException
    try:
        return client(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def run_to_resume(uri: str, run_id: str):
    """The run train.resume names, or a TrackingError that says where it was looked for."""
    from mlflow.exceptions import MlflowException
    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        raise TrackingError(f"train.resume={run_id}: no such MLflow run in {uri}; copy the Run ID of a KILLED or "
                            "FAILED run from mlflow ui (or the sweep table)")


def read_parent(sweep_dir: Path) -> dict[str, str] | None:
    """The parent run a sweep's jobs log under: {'uri', 'experiment_id', 'run_id'}, or None if not tracked."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def newest_sweep(uri: str, experiment: str) -> tuple[str, str] | None:
    """(experiment id, parent run id) of the newest sweep in `experiment`, or None if it has none."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`fmnist.sweep_dir` != ''",
                            order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    return (exp.experiment_id, parents[0].info.run_id) if parents else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value of a run's metric, by step."""
    return [(m.step, m.value) for m in sorted(client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def runs_with_config(uri: str, experiment: str, config_hash: str) -> list:
    """Earlier runs of this exact config (tag fmnist.config_hash), newest first."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`fmnist.config_hash` = '{config_hash}'",
                         order_by=["attributes.start_time DESC"], max_results=100)


def download_artifact(uri: str, run_id: str, path: str, dst: Path) -> Path | None:
    """Fetch one artifact of a run into dst, or None if the run has no such artifact. A store that fails to list
    or send it raises: read as 'no checkpoint', a resumed job would start over from epoch 1 in the same run."""
    c = client(uri)
    folder = str(Path(path).parent) if "/" in path else None
    try:
        if path not in {a.path for a in c.list_artifacts(run_id, folder)}:
            return None
        return Path(c.download_artifacts(run_id, path, str(dst)))
    except Exception as e:  # MLflow raises several types (MlflowException, OSError, requests' errors)
        raise TrackingError(f"cannot fetch {path} of MLflow run {run_id} from {uri} ({first_line(e)}); fix the store "
                            "and rerun the same command") from None


def silence_noisy_loggers() -> None:
    """MLflow's alembic migrations log at INFO on a new store; keep the run's console to the training lines."""
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def log_model(uri: str, run_id: str, graph: Path, example, output, torch_version: str) -> None:
    """Log a model that `models.export` saved at `graph` as an MLflow model named 'model' on `run_id` (once per run
    or sweep), with a signature and an input example, so `mlflow models predict -m runs:/<run_id>/model` serves it.

    The model is MLflow's pytorch flavor in its `pt2` format (a `torch.export` graph with its weights), which loads
    without unpickling code: a pickled model runs arbitrary code when loaded (MLflow warns on every save and may
    refuse such loads). `mlflow.pytorch.log_model` would export the model itself, which needs torch in the process
    that logs: 1.5 s to import and 1.4 s for the first export in the tracking process, which never trains, against
    0.4 s in the training process, which has torch loaded (benchmarks/RESULTS.md). So the training process exports
    and this writes the same files as `mlflow.pytorch.save_model(..., serialization_format="pt2")` around that graph
    (mlflow is pinned; tests/test_tracking.py compares the two). `output` is the model's output for `example`."""
    import mlflow
    from mlflow.models import Model, infer_signature
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):  # the model belongs to the run's experiment
        Model.log(None, name="model", flavor=_ExportedPytorchFlavor, flavor_name="mlflow.pytorch",
                  serialization_format="pt2", run_id=run_id, graph=Path(graph), example=example,
                  signature=infer_signature(example, output), torch_version=torch_version,
                  validate_serving_input=False)  # it would load the graph, importing torch here; tests load it


class _ExportedPytorchFlavor:
    """`Model.log`'s flavor argument for a graph exported by the training process: mlflow.pytorch.save_model's pt2
    branch (MLflow 3.17) without the export."""

    @staticmethod
    def save_model(path: str, mlflow_model, graph: Path, example, signature, torch_version: str, **_) -> None:
        import shutil

        import yaml
        from mlflow import pyfunc
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import _save_example
        from mlflow.utils.environment import _generate_mlflow_version_pinning, _mlflow_conda_env, _PythonEnv
        from mlflow.utils.file_utils import get_total_file_size
        root = Path(path)
        (root / "data").mkdir(parents=True)
        shutil.copyfile(graph, root / "data" / "model.pt2")  # the name mlflow.pytorch's loader looks for
        _save_example(mlflow_model, example, path)
        mlflow_model.signature = signature
        mlflow_model.add_flavor("pytorch", model_data="data", pytorch_version=torch_version, code=None)
        pyfunc.add_to_model(mlflow_model, loader_module="mlflow.pytorch", data="data",
                            pickle_module_name="mlflow.pytorch.pickle_module", code=None, conda_env="conda.yaml",
                            python_env="python_env.yaml", model_config={"device": None})
        mlflow_model.model_size_bytes = get_total_file_size(path)
        mlflow_model.save(str(root / MLMODEL_FILE_NAME))
        # pinned to this environment's versions (MLflow's check of them against the installed packages costs
        # ~0.6 s and cannot fail here)
        requirements = [_generate_mlflow_version_pinning(), f"torch=={torch_version.split('+')[0]}"]
        conda_env = _mlflow_conda_env(additional_pip_deps=requirements, install_mlflow=False)
        (root / "conda.yaml").write_text(yaml.safe_dump(conda_env, default_flow_style=False))
        (root / "requirements.txt").write_text("\n".join(requirements))
        _PythonEnv.current().to_yaml(str(root / "python_env.yaml"))
