"""Experiment tracking: the MLflow store (runs, params, lookups by config hash) and each job's `Tracker`.

A run logs through `Tracker` (start / log_epoch / log_metrics / log_artifact / finish), which hands every write
to the tracking process (tracking_process.py). A sweep's parent run is made once, before its jobs start (see
callbacks.py), and each job's child run points at it.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# A machine without the git program (a bare container): GitPython's import would fail, and with it every run;
# quiet, MLflow just records no commit. Set before MLflow imports GitPython, here and in the tracking process.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


class TrackingError(RuntimeError):
    """The tracking store cannot be used, or a run asked for is not in it."""


PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes or hosts find their parent
METRICS_EVERY_S = 2.0  # per-epoch metrics reach MLflow at most this often: each write costs ~15 ms of CPU
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
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
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


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)


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
    """The run `run_id`, or a TrackingError that says where it was looked for."""
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


class TrackingProcess:
    """A tracking process (tracking_process.py) of this process, started on first use, shared by the Trackers
    given it (TRACKING_PROCESS by default; PROCESSES holds the others a big group spreads its jobs over)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.trackers: dict[int, Tracker] = {}
        self.next_id = 0
        self.next_token = 0
        self.done: dict[int, str | None] = {}  # token -> error of a finished sync/finish
        self.used = False  # a Tracker has sent it work (else it may be discarded at once)
        self.gone: str | None = None  # why the process could not start (its last word), once known

    def start(self) -> None:
        """Start the process now if it is not running (__main__ does, before importing torch, so that its own
        imports overlap the training process's start-up)."""
        if self.proc is None or self.proc.poll() is not None:
            import socket
            from multiprocessing.connection import Connection
            ours, theirs = socket.socketpair()
            self.proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp.tracking_process", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=_child_env())
            theirs.close()
            self.conn = Connection(ours.detach())
            self.used, self.gone = False, None
            atexit.register(self.stop)

    def discard_unused(self) -> None:
        """Stop a process started ahead that no job needs (tracking.enabled=false, jobs in other processes)."""
        if self.proc is not None and not self.used:
            self.proc.kill()
            self.stop()

    def register(self, tracker: Tracker) -> int:
        self.start()
        self.used = True
        self.next_id += 1
        self.trackers[self.next_id] = tracker
        return self.next_id

    def send(self, tid: int, op: str, *args) -> None:
        if self.gone is not None:
            raise TrackingError(self.gone)
        try:
            self.conn.send((tid, op, args))
        except OSError as e:
            raise self._gone(f"the tracking process ended unexpectedly ({e}); rerun, or pass "
                             "tracking.enabled=false") from e

    def drain(self, token: int | None = None) -> None:
        """Take in the replies that have arrived (without waiting), or until the reply to `token`."""
        while token not in self.done if token is not None else self.conn.poll():
            try:
                kind, tid, *rest = self.conn.recv()
            except (EOFError, OSError) as e:
                raise self._gone("the tracking process ended unexpectedly; rerun, or pass "
                                 "tracking.enabled=false") from e
            tracker = self.trackers.get(tid)
            if kind == "gone":
                self.gone = rest[0]
                raise TrackingError(self.gone)
            if kind == "done":
                self.done[rest[0]] = rest[1]
            elif tracker is None:
                continue
            elif kind == "run":
                tracker.run_id = rest[0]
            elif kind == "error" and tracker._error is None:
                tracker._error = TrackingError(rest[0])

    def _gone(self, message: str) -> TrackingError:
        """The error for a tracking process that has gone: its last word if it left one (it could not start: a
        missing module), else `message`."""
        try:
            while self.gone is None and self.conn.poll():
                kind, _, *rest = self.conn.recv()
                if kind == "gone":
                    self.gone = rest[0]
        except (EOFError, OSError):
            pass
        return TrackingError(self.gone or message)

    def call(self, tid: int, op: str, *args) -> str | None:
        """Send op(token, *args) and wait for its reply: None, or the error message of a failed write."""
        self.next_token += 1
        token = self.next_token
        self.send(tid, op, token, *args)
        self.drain(token)
        return self.done.pop(token)

    def release(self, tid: int) -> None:
        self.trackers.pop(tid, None)

    def stop(self) -> None:
        """At exit: close the connection and wait for the process to end (it has nothing left to write by then;
        a run still open is ended KILLED by it)."""
        if self.proc is not None:
            if not self.used:
                self.proc.kill()
            self.conn.close()
            self.proc.wait(timeout=120)
            self.proc, self.conn = None, None


def _child_env() -> dict[str, str]:
    """The tracking process imports this same fmnist_exp (an editable checkout, or a wheel)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root,
            "OMP_NUM_THREADS": "1"}  # it never trains: one thread for the plots


TRACKING_PROCESS = TrackingProcess()
PROCESSES = [TRACKING_PROCESS]  # this process's tracking processes (a big group spreads its jobs over several)
JOBS_PER_PROCESS = 8  # a job's end (plots, writes) costs its tracking process ~0.2 s: 8 jobs ~1.6 s
MAX_PROCESSES = 8


def processes_for(jobs: int, spare_cores: int, requested: int | None = None) -> int:
    """How many tracking processes the trackers of `jobs` jobs trained together spread over: as requested, else
    one per JOBS_PER_PROCESS jobs as far as spare cores allow (a GPU worker's 256 jobs on a 16-core host: 8, their
    end-of-run drawing 8 at a time; 2 workers on 2 cores: 1), at most MAX_PROCESSES."""
    if requested and requested > 0:
        return requested
    return max(1, min(MAX_PROCESSES, spare_cores, -(-jobs // JOBS_PER_PROCESS)))


def pick_process(k: int, n: int) -> TrackingProcess:
    """The tracking process of the k-th job of a group spread over n (started when first used): round robin, so
    each holds every n-th job and a job's writes stay in order in one process."""
    while len(PROCESSES) < n:
        PROCESSES.append(TrackingProcess())
    return PROCESSES[k % n]


class Tracker:
    """One job's MLflow run plus TensorBoard event files in `log_dir`; every call is a no-op when disabled.

    The writes happen in the tracking process (tracking_process.py), in the order they were asked for, so training
    never waits for MLflow or TensorBoard (importing them, creating the run, logging, plotting, logging the model).
    Per-epoch metrics go to TensorBoard every epoch and to MLflow at most every METRICS_EVERY_S. `check`
    raises a write that failed (the loop calls it every epoch), `flush` waits for all writes, and `finish`
    flushes before it ends the run.
    """

    def __init__(self, uri: str | None, experiment: str, log_dir: Path, enabled: bool = True,
                 process: TrackingProcess | None = None):
        self.enabled = enabled
        self._proc = process or TRACKING_PROCESS
        self.uri = resolve_uri(uri) if enabled else None
        self.experiment = experiment
        self.log_dir = Path(log_dir)
        self.run_id: str | None = None  # set when the tracking process has made (or reopened) the run
        self._error: TrackingError | None = None  # the first failed write, until check/flush raises it
        self._id: int | None = None
        if enabled:
            self._id = self._proc.register(self)
            self._proc.send(self._id, "new", self.uri, experiment, str(self.log_dir))

    def _submit(self, op: str, *args) -> None:
        if self.enabled:
            if self._id is None:
                raise TrackingError("this tracker was closed")
            self._proc.send(self._id, op, *args)

    def check(self) -> None:
        """Raise (as TrackingError, once) a write that failed; later writes go through again."""
        if self.enabled and self._id is not None:
            self._proc.drain()
        error, self._error = self._error, None
        if error is not None:
            self._submit("resume")
            raise error

    def flush(self) -> None:
        """Wait until every write asked for so far is done; raise the first that failed."""
        if self.enabled and self._id is not None:
            self._submit("send_metrics_if_any")
            self._proc.call(self._id, "sync")
        self.check()

    # --- what a job logs -------------------------------------------------------------------------------------
    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str],
              parent_run_id: str | None = None) -> None:
        """Create the MLflow run (logging params and tags) and open the TensorBoard writer."""
        self._submit("start", run_name, params, tags, parent_run_id)

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Continue an earlier (KILLED/FAILED) run: RUNNING again, new tags, metrics continue at later steps."""
        self._submit("reopen", run_id, tags)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch metrics at step=epoch to MLflow; losses, accuracy and lr to TensorBoard. Raises a failed
        earlier write here, so a broken store stops training after one epoch, not at the end."""
        self.check()
        self._submit("log_epoch", epoch, dict(metrics))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._submit("log_metrics", dict(metrics), step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file that no longer changes (the tracking process reads it later)."""
        self._submit("log_artifact", str(path), artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        self._submit("log_text", text, filename)

    def log_figure(self, kind: str, args: tuple, path: Path, tensorboard_tag: str | None = None) -> None:
        """`plots.<kind>(*args)` drawn by the tracking process, saved as a PNG at `path`, logged under the run's
        plots/, optionally shown in TensorBoard's IMAGES tab."""
        self._submit("log_figure", kind, args, str(path), tensorboard_tag)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """TensorBoard's HPARAMS tab: this job's settings against its scores, beside every job of the sweep."""
        self._submit("log_hparams", hparams, metrics)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, int]) -> None:
        """The data set as an MLflow dataset input: the runs table's Dataset column."""
        self._submit("log_dataset", name, digest, source, profile)

    def log_model(self, graph: Path, example, output, torch_version: str) -> None:
        """The graph `models.export` saved as an MLflow model on this run (see log_model)."""
        self._submit("log_model", str(graph), example, output, torch_version)

    def set_tag(self, key: str, value: str) -> None:
        self._submit("set_tag", key, value)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Wait for every write, close TensorBoard, then end the MLflow run with `status` (FINISHED, FAILED,
        KILLED). A failed write is raised after the run has ended (never left RUNNING)."""
        if not self.enabled or self._id is None:
            return
        reply = self._proc.call(self._id, "finish", status, error)
        failure, self._error = self._error or (TrackingError(reply) if reply else None), None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Release what this tracker holds in the tracking process; finish() first to keep the writes. Safe to
        call more than once."""
        if self._id is not None:
            try:
                self._proc.send(self._id, "close")
            except TrackingError:
                pass
            self._proc.release(self._id)
            self._id = None


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
