"""The tracking process: every MLflow and TensorBoard write of a training process, done in a child process.

A training process starts one (`python -m fmnist_exp.tracking_process FD`) the first time a job tracks (a big
group, where cores are spare, several: tracking.processes_for), and its `Tracker`s (tracking.py) send it their
writes over a socket, in order. Importing MLflow, opening the store and rendering plots then run on another core
instead of taking turns with the training loop for the GIL (epoch 1 of the default run: 2.5 s -> ~0.5 s,
benchmarks/RESULTS.md). It never imports torch (prefetch). One `RunWriter` per job.

Messages in: (tracker id, op, args). Replies: ("run", id, run_id) once a run exists, ("error", id, message)
when a write fails (later writes of that job are skipped until the job has seen it: ("resume", id)), and
("done", id, token, error) for `sync` and `finish`; ("gone", None, message) as its last word when it cannot
start (a missing module). The process ignores SIGINT/SIGTERM (the training process decides how runs end); when
the training process goes away without ending a run, it ends it KILLED.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fmnist_exp import store, tracking

NOT_ENDED = "the training process ended without ending this run (killed, or out of memory); rerun it"


class RunWriter:
    """One job's MLflow run and TensorBoard event files."""

    def __init__(self, uri: str, experiment: str, log_dir: str):
        self.uri, self.experiment, self.log_dir = uri, experiment, Path(log_dir)
        self.run_id: str | None = None
        self.writer = None  # TensorBoard's SummaryWriter
        self.unsent: list = []  # per-epoch MLflow metrics not yet written
        self.last_sent = 0.0
        self.ended = False
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = store.client(self.uri)
        return self._client

    def open_store(self) -> None:
        """Connect to the store (and make a new one's tables) while the training process still loads its data;
        a store that fails here fails again, with its message, when the run is made."""
        try:
            self.client.get_experiment_by_name(self.experiment)
        except Exception:
            pass

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str], parent_run_id: str | None) -> None:
        try:
            _, self.run_id = store.create_run(self.uri, self.experiment, run_name, tags, parent_run_id)
            store.log_params(self.uri, self.run_id, params)
        except store.TrackingError:
            raise
        except Exception as e:
            raise store.store_error(self.uri, e) from e
        self._open_writer()

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Continue an earlier (KILLED/FAILED) run: RUNNING again, new tags, metrics continue at later steps."""
        self.run_id = run_id
        c = self.client
        c.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        if "error" in c.get_run(run_id).data.tags:
            c.delete_tag(run_id, "error")
        self._open_writer()

    def _open_writer(self) -> None:
        from tensorboardX import SummaryWriter
        # tensorboardX names event files by the second and host only (torch adds the process): add_hparams' own
        # writer, opened in the same directory at the end of a short job, would write over this one's file
        self.writer = SummaryWriter(logdir=str(self.log_dir), filename_suffix=f".{os.getpid()}")
        # train and valid loss on one chart (CUSTOM SCALARS tab) from the job's own two tags: add_scalars would
        # make two extra TensorBoard runs per job
        self.writer.add_custom_scalars({"Loss": {"train and valid": ["Multiline", ["Loss/train", "Loss/valid"]]}})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.add_metrics(metrics, epoch)
        if time.monotonic() - self.last_sent >= tracking.METRICS_EVERY_S:  # short epochs: several per write
            self.send_metrics()
        w = self.writer
        w.add_scalar("Loss/train", metrics["train_loss"], epoch)
        w.add_scalar("Loss/valid", metrics["valid_loss"], epoch)
        w.add_scalar("Accuracy/valid", metrics["valid_acc"], epoch)
        w.add_scalar("LR", metrics["lr"], epoch)
        w.flush()

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.unsent += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def send_metrics(self) -> None:
        batch, self.unsent = self.unsent, []
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])
        self.last_sent = time.monotonic()

    def send_metrics_if_any(self) -> None:
        if self.run_id is not None and self.unsent:
            self.send_metrics()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.add_metrics(metrics, step)
        self.send_metrics()

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        self.client.log_text(self.run_id, text, filename)

    def log_figure(self, kind: str, args: tuple, path: str, tensorboard_tag: str | None) -> None:
        """Draw plots.<kind>(*args), save it as a PNG at `path`, log it under the run's plots/ (and in
        TensorBoard's IMAGES tab when tagged, the same PNG bytes)."""
        from tensorboardX.proto.summary_pb2 import Summary

        from fmnist_exp import plots
        image = plots.image(kind, *args)
        encoded = plots.png(image)
        Path(path).write_bytes(encoded)
        if tensorboard_tag:  # SummaryWriter.add_image would encode the image again (tensorboardX is pinned)
            height, width = image.shape[:2]
            png = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded)
            self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tensorboard_tag, image=png)]))
        self.client.log_artifact(self.run_id, path, "plots")

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, name=".")  # this job's run

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, int]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        ds = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                     profile=json.dumps(profile))
        inputs = [DatasetInput(ds, [InputTag("mlflow.data.context", "training")])]
        for attempt in range(5):
            try:
                return self.client.log_inputs(self.run_id, inputs)
            except Exception as e:
                # two jobs logging the same new dataset at once: MLflow's check-then-insert loses the race for
                # one of them (UNIQUE constraint); by the retry the row exists and is reused
                if "UNIQUE constraint" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_model(self, graph: str, example, output, torch_version: str) -> None:
        store.log_model(self.uri, self.run_id, Path(graph), example, output, torch_version)

    def finish(self, status: str, error: str | None) -> None:
        """Send what is left, close TensorBoard, end the run with `status` (and its reason)."""
        try:
            self.send_metrics_if_any()
        finally:
            self.close()
            if self.run_id is not None:
                store.end_run(self.uri, self.run_id, status, error[:5000] if error else None)
                self.ended = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def prefetch() -> None:
    """Import what a job's writes need (~2.5 s of CPU) at once: the process is started as early as possible
    (__main__), so this runs while the training process composes its config, imports torch and loads the data on
    the other core. No torch here (1.5 s to import, ~400 MB): TensorBoard's files are written with tensorboardX,
    and the model arrives exported (store.log_model)."""
    sys.modules["torch"] = None  # tensorboardX imports torch when it can, only to recognise torch tensors
    import git  # noqa: F401  (GitPython: MLflow tags a logged model with the commit)
    import mlflow.pyfunc  # noqa: F401  (a logged model's flavor)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.entities import Metric  # noqa: F401
    from mlflow.models import Model  # noqa: F401
    from tensorboardX import SummaryWriter  # noqa: F401

    from fmnist_exp import plots  # noqa: F401  (matplotlib)


def serve(conn: Connection) -> None:
    """Run writes until the training process closes the connection; then end any run it left RUNNING."""
    writers: dict[int, RunWriter] = {}
    failed: set[int] = set()  # jobs whose failed write the training process has not seen yet
    while True:
        try:
            tid, op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "new":
            writers[tid] = RunWriter(*args)
            writers[tid].open_store()
            continue
        w = writers.get(tid)
        if op == "resume":
            failed.discard(tid)
        elif op == "sync":  # (token,): every earlier write of this job is done
            conn.send(("done", tid, args[0], None))
        elif op == "finish":  # (token, status, error)
            token, status, error = args
            reply = None
            try:
                w.finish(status, error)
            except Exception as e:
                reply = store.store_error(w.uri, e).args[0]
            failed.discard(tid)
            conn.send(("done", tid, token, reply))
        elif op == "close":
            if w is not None:
                w.close()
                if w.ended or w.run_id is None:
                    writers.pop(tid)
        elif tid not in failed:  # after a failure, skip this job's writes until it has been told
            had_run = w.run_id
            try:
                getattr(w, op)(*args)
            except Exception as e:
                failed.add(tid)
                message = e.args[0] if isinstance(e, store.TrackingError) else store.store_error(w.uri, e).args[0]
                conn.send(("error", tid, message))
            if w.run_id != had_run:
                conn.send(("run", tid, w.run_id))
    for w in writers.values():  # the training process is gone: no run stays RUNNING
        if w.run_id is not None and not w.ended:
            try:
                w.finish("KILLED", NOT_ENDED)
            except Exception:
                pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and scancel reach the whole process group: the
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # training process handles them and ends its runs through us
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SLURM's time-limit warning, sent to every process of the job
    store.silence_noisy_loggers()
    conn = Connection(int(sys.argv[1]))
    try:
        prefetch()
    except ImportError as e:  # a dependency missing here: say which, rather than leave a broken pipe
        conn.send(("gone", None, f"the tracking process cannot import {e.name or e}: install this project's "
                                 "dependencies (pip install -e .), or pass tracking.enabled=false"))
        conn.close()
        os._exit(1)
    try:
        serve(conn)
    finally:
        conn.close()
    os._exit(0)  # nothing left to write: skip the interpreter's teardown (torch's takes ~0.5 s)


if __name__ == "__main__":
    main()
