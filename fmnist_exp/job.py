"""A job's lifecycle, written once: prepare -> train (each epoch) -> complete or fail, returning an `Outcome`
(the order, top to bottom: run_group).

Every launcher drives this: Hydra's own (a single run, or one job of a basic / joblib / submitit sweep) through
`__main__.task`, and the fused launcher for each job of a group. A job never exits the process; the caller turns
its outcome into an exit code. What belongs to the process rather than to one job (torch threads, the denormal
flag, the data set loaded once) is in `ProcessSettings`.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fmnist_exp import config, data, machine, models, step, stopping, store, tracking, train, trials

log = logging.getLogger("fmnist_exp")

OUTCOME_FILE = "outcome.json"  # in each job dir: how the sweep's end learns every job's status, tracked or not


@dataclass
class JobContext:
    """Where a job runs and what it is called: all a job needs from its launcher (Hydra or the fused one)."""
    job_dir: Path
    run_name: str  # the overrides that define the experiment, e.g. 'optimizer=adam data.batch_size=16'
    overrides: list[str] = field(default_factory=list)  # every task override (for the resume command)
    parent: dict | None = None  # the sweep's parent run {'uri', 'experiment_id', 'run_id'}
    multirun: bool = False
    parallel_jobs: int | None = None  # jobs sharing this machine's cores (joblib's n_jobs)
    group: str | None = None  # the fused group this job trained in (hydra/launcher=fused)
    sweep_dir: Path | None = None  # a sweep job's sweep dir

    @classmethod
    def from_hydra(cls, hydra_cfg) -> "JobContext":
        from hydra.types import RunMode
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        n_jobs = hydra_cfg.launcher.get("n_jobs") if multirun else None
        return cls(job_dir=Path(hydra_cfg.runtime.output_dir), run_name=run_name(hydra_cfg.overrides.task),
                   overrides=list(hydra_cfg.overrides.task), multirun=multirun,
                   parent=store.read_parent(Path(hydra_cfg.sweep.dir)) if multirun else None,
                   sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                   parallel_jobs=n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else None)

    def tracking_uri(self, cfg: DictConfig) -> str | None:
        """The store of this job's run: its sweep's (the parent run's), else the job's tracking.uri."""
        return self.parent["uri"] if self.parent else cfg.tracking.uri


run_name = config.run_name


@dataclass
class Outcome:
    """How a job ended. `value` is what a sweeper optimises: the best checkpoint's monitored validation score
    (train.monitor), never a test score."""
    status: str  # FINISHED | FAILED | KILLED (SKIPPED: FINISHED earlier, reused by sweep.skip_finished)
    value: float | None = None
    error: str | None = None
    signum: int | None = None  # the signal that stopped it (or arrived after it finished)
    run_id: str | None = None
    pruned_at: int | None = None  # a search's pruner stopped it after this epoch (it is FINISHED, tested)

    def write(self, job_dir: Path) -> None:
        (job_dir / OUTCOME_FILE).write_text(json.dumps(asdict(self)))


def read_outcome(job_dir: Path) -> Outcome | None:
    try:
        return Outcome(**json.loads((job_dir / OUTCOME_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_killed(job_dir: Path, error: str, signum: int | None = None) -> Outcome:
    """A job that ended without recording its outcome (its process lost, or stopped before it started) is recorded
    KILLED with `error`; one that recorded its own keeps it. Returns the job's outcome."""
    outcome = read_outcome(job_dir)
    if outcome is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        outcome = Outcome("KILLED", error=error, signum=signum)
        outcome.write(job_dir)
    return outcome


def read_outcomes(sweep_dir: Path) -> list[tuple[str, Outcome]]:
    """(job dir name, outcome) of every job of a sweep that got as far as recording one."""
    out = []
    for path in sorted(sweep_dir.glob(f"*/{OUTCOME_FILE}")):
        outcome = read_outcome(path.parent)
        if outcome is not None:
            out.append((path.parent.name, outcome))
    return out


class ProcessSettings:
    """Settings of the whole process, held here rather than by a job: torch threads, the CPU's denormal flag, each
    data set loaded once per device, and (in a launcher's worker) the stop signals between jobs and the watch on the
    launcher. Jobs of one process may ask for different settings (a sweep over train.threads under the basic
    launcher; groups of different settings in one worker): each job gets its own."""

    def __init__(self):
        self._parent: dict | None = None  # the sweep's parent run, as this process's last job had it
        self.signals = stopping.WorkerSignals(lambda: self._parent)
        self._datasets: dict[tuple, data.FashionMNIST] = {}
        self._default_threads: int | None = None  # torch's own choice, before any job set it
        self._flush: bool | None = None  # the denormal flag this process's threads have
        self._pool_started = False  # torch's worker threads may exist: they keep the flag they started with

    def configure(self, cfg: DictConfig, ctx: JobContext) -> None:
        self._parent = ctx.parent
        if self._default_threads is None:
            self._default_threads = torch.get_num_threads()
        threads = machine.pick_threads(cfg.train.threads, ctx.parallel_jobs, self._default_threads)
        flush = bool(cfg.train.flush_denormal)
        if self._pool_started and self._flush is not None and flush != self._flush:
            raise config.ConfigError(
                f"train.flush_denormal={str(flush).lower()} in a process whose torch threads already run with "
                f"{str(self._flush).lower()} (a CPU flag each thread keeps from its start): sweep it with "
                f"train.threads=1, or run each value as a sweep of its own")
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if flush != self._flush:  # on this thread, and on the worker threads torch starts after it
            torch.set_flush_denormal(flush)  # False (and no change) on CPUs without the flag; CUDA ignores it
            self._flush = flush
        self._pool_started = self._pool_started or threads > 1

    def watch_signals(self) -> None:
        """In a launcher's worker process: stops between jobs and the launcher's death handled (stopping.py)."""
        self.signals.install()

    def dataset(self, cfg: DictConfig, device: torch.device) -> data.FashionMNIST:
        d = cfg.data
        key = (d.root, d.system_dir, d.download, d.valid_size, d.split_seed, str(device), d.cache)
        if key not in self._datasets:
            self._datasets[key] = data.load(d.root, d.system_dir, d.download, d.valid_size, d.split_seed, device,
                                            cache=d.cache)
        return self._datasets[key]


PROCESS = ProcessSettings()




def build(cfg: DictConfig, device: torch.device, name: str = "", job_dir: Path | None = None) -> train.Member:
    """The job as the training loop sees it, from its config, seeded: its model, optimizer settings, LR schedule,
    data order and dropout stream. Bad values become one ConfigError line naming the key (config.py)."""
    torch.manual_seed(cfg.train.seed)
    model = config.check_buildable(cfg, lambda: instantiate(cfg.model), "model").to(device)
    o = cfg.optimizer
    hyper = {"kind": o.kind, "lr": o.lr, "weight_decay": o.weight_decay}  # o.kind: one of config.OPTIMIZERS
    hyper.update({"momentum": o.momentum, "nesterov": o.nesterov} if hyper["kind"] == "sgd" else
                 {"betas": tuple(o.betas), "eps": 1e-8})
    # the schedule runs on a one-parameter stand-in of the job's optimizer: torch's own maths, read once an epoch
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    scheduler = config.check_buildable(cfg, lambda: instantiate(cfg.schedule)(optimizer=stand_in), "schedule")
    job_dir = Path(job_dir or ".")
    return train.Member(
        name=name, model=model, hyper=hyper, scheduler=scheduler,
        generator=torch.Generator().manual_seed(cfg.train.seed),
        dropout=torch.Generator(device=device).manual_seed(cfg.train.seed), settings=loop_settings(cfg),
        checkpoint=job_dir / "best_model.pt", last=job_dir / "last.pt")


def shows_progress(cfg: DictConfig) -> bool:
    """Whether a progress bar is drawn (train.progress: on, off, or auto: when attached to a terminal)."""
    return {"on": True, "off": False}.get(str(cfg.train.progress), sys.stderr.isatty())


def loop_settings(cfg: DictConfig) -> train.LoopSettings:
    progress = shows_progress(cfg)
    return train.LoopSettings(
        epochs=cfg.train.epochs, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
        monitor=cfg.train.monitor, patience=cfg.train.early_stopping.patience,
        min_delta=cfg.train.early_stopping.min_delta, progress=progress, cuda_graph=cfg.train.cuda_graph)


class Job:
    """One experiment with its own MLflow run, TensorBoard events, checkpoints and outcome.

    Driven by run_group, in this order: `prepare()` (validate, build, skip or resume, start the run; may already
    return an Outcome), `ready()` before the first step, `log_epoch(metrics)` after every epoch, then
    `submit_results(final)` and `end_run(final)`, or `fail(status, error)`; `close()` always, which releases what
    the tracking process holds for the job. Its `outcome` is set once it has ended.
    """

    def __init__(self, cfg: DictConfig, ctx: JobContext, process: ProcessSettings = PROCESS,
                 tracking_process: tracking.TrackingProcess | None = None, said: set[str] | None = None):
        self.cfg, self.ctx, self.process, self.tracking_process = cfg, ctx, process, tracking_process
        self.said = set() if said is None else said  # start lines already logged (a group's jobs share one set)
        self.tracker: tracking.Tracker | None = None
        self.params: dict[str, str] = {}
        self.member: train.Member | None = None  # what the training loop trains
        self.dataset: data.FashionMNIST | None = None
        self.outcome: Outcome | None = None  # how it ended (end)
        self.trial: trials.TrialLink | None = None  # a search's trial: reports each epoch, may be pruned
        self.pruned_at: int | None = None

    # --- prepare ------------------------------------------------------------------------------------------------
    def prepare(self) -> Outcome | None:
        """Everything before the first step. Returns an Outcome when there is nothing to train (skipped)."""
        cfg, ctx = self.cfg, self.ctx
        store.silence_noisy_loggers()
        if not cfg.tracking.enabled:
            tracking.TRACKING_PROCESS.discard_unused()  # started ahead by __main__: not needed
        ctx.job_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracking.Tracker(ctx.tracking_uri(cfg), cfg.tracking.experiment, ctx.job_dir,
                                        enabled=cfg.tracking.enabled, process=self.tracking_process)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.params = store.flatten(resolved)
        config.validate(cfg, ctx.overrides)
        config_hash = store.config_hash(self.params, config.where_how_keys())
        tags = {"fmnist.job_dir": str(ctx.job_dir.resolve()), "fmnist.overrides": ctx.run_name,
                "fmnist.config_hash": config_hash}
        if cfg.sweep.trial is not None:  # a search's trial (hydra/sweeper=search)
            tags["fmnist.trial"] = str(cfg.sweep.trial)
        resume_id = cfg.train.resume
        if resume_id and not cfg.tracking.enabled:
            raise config.ConfigError("train.resume needs tracking.enabled=true: checkpoints are found via MLflow")
        requeued = requeued_outcome(ctx.job_dir)
        if requeued is not None:
            if requeued.status != "KILLED":  # it had ended before the signal stopped the rest of its group
                log.info("Requeued by SLURM: this job had already ended %s", requeued.status)
                return requeued
            resume_id = resume_id or requeued.run_id
            if os.environ.get("SLURM_RESTART_COUNT"):  # (submitit's local executor keeps no count)
                tags["fmnist.requeues"] = os.environ["SLURM_RESTART_COUNT"]
        if ctx.multirun and cfg.sweep.skip_finished and not resume_id and self.tracker.enabled:
            action, earlier = self._reuse_earlier_run(config_hash)
            if action == "skip":
                log.info("Skipped: this config already FINISHED as run %s", earlier.info.run_id)
                return Outcome("SKIPPED", value=earlier.data.metrics.get(selection_metric(cfg.train.monitor)),
                               run_id=earlier.info.run_id)
            if action == "resume":
                resume_id = earlier.info.run_id
        (ctx.job_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        device = machine.pick_device(cfg.train.device)
        self.process.configure(cfg, ctx)
        self.dataset = self.process.dataset(cfg, device)
        self.member = build(cfg, device, ctx.run_name, ctx.job_dir)
        if ctx.multirun:  # which job, among a sweep's lines (joblib's jobs and fused workers print at once)
            self.member.label = f"[{ctx.run_name}] "
        if resume_id:
            earlier = store.run_to_resume(self.tracker.uri, resume_id)
            resume_from = self._resume_checkpoint(earlier)
            if resume_from is not None:  # read before the run is touched: a bad checkpoint leaves it as it was
                train.restore_checkpoint(resume_from, self.member)
            self.tracker.reopen(resume_id, tags)
            log.info("%s MLflow run %s (%s)", "Requeued by SLURM: continuing" if requeued else "Continuing",
                     resume_id, earlier.info.run_name)
            if resume_from is not None:
                log.info("Resuming after epoch %d of %d", self.member.state.epoch, cfg.train.epochs)
        else:
            if requeued is not None and (ctx.job_dir / "last.pt").is_file():  # untracked: its job dir has it all
                train.restore_checkpoint(ctx.job_dir / "last.pt", self.member)
                log.info("Requeued by SLURM: resuming after epoch %d of %d from %s", self.member.state.epoch,
                         cfg.train.epochs, ctx.job_dir / "last.pt")
            self.tracker.start(ctx.run_name, self.params, tags,
                               parent_run_id=ctx.parent["run_id"] if ctx.parent else None)
            self.tracker.log_artifact(ctx.job_dir / "config.yaml")
        if ctx.group:
            self.tracker.set_tag("fmnist.group", ctx.group)
        if ctx.multirun:
            self.trial = trials.TrialLink.open(cfg.sweep.trial, ctx.sweep_dir)
            if self.trial is not None:
                self.trial.replay(self.member.state.history, cfg.train.monitor)
        self._log_start()
        return None  # the run is being created in the tracking process: `ready` waits for it

    def _log_start(self) -> None:
        model, dataset, tracker = self.member.model, self.dataset, self.tracker
        summary = models.summary(model)
        (self.ctx.job_dir / "model_summary.txt").write_text(summary + "\n")
        if self.member.state.epoch == 0:
            tracker.log_text(summary + "\n", "model_summary.txt")
            tracker.log_dataset("fashion-mnist", dataset.digest, dataset.source, dataset.split_sizes())
        tracker.set_tag("fmnist.data_source", dataset.source)
        tracker.set_tag("fmnist.threads", str(torch.get_num_threads()))
        lines = [f"Data: {dataset.source} ({dataset.split_sizes()}) on {dataset.train_x.device} | model "
                 f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params",
                 f"Training: {len(train.batch_sizes(len(dataset.train_y), self.member.settings.batch_size))} steps "
                 f"per epoch, epochs {self.member.state.epoch + 1}..{self.member.settings.epochs}"]
        for line in lines:  # once per group: its jobs share data, shapes and (unless resumed) epochs
            if line not in self.said:
                self.said.add(line)
                log.info("%s", line)

    def _resume_checkpoint(self, run) -> Path | None:
        """Check that `run` can be continued with this config; its last full checkpoint (None: it never finished
        an epoch, so it starts over in the same run)."""
        rid = run.info.run_id
        if run.info.status == "FINISHED":
            raise config.ConfigError(f"train.resume={rid}: that run already FINISHED; nothing to resume")
        ignore = config.where_how_keys()
        for key, old in sorted(run.data.params.items()):
            if key not in ignore and not key.startswith("sweep.") and self.params.get(key, old) != old:
                raise config.ConfigError(f"train.resume={rid}: that run has {key}={old}, this config "
                                         f"{self.params[key]}; resume with the run's own overrides ({key}={old})")
        old_dir = run.data.tags.get("fmnist.job_dir")
        if old_dir and (Path(old_dir) / "last.pt").is_file():
            return Path(old_dir) / "last.pt"
        return store.download_artifact(self.tracker.uri, rid, "checkpoints/last.pt", self.ctx.job_dir)

    def _reuse_earlier_run(self, config_hash: str):
        """sweep.skip_finished: ('skip', run) if this config ever FINISHED (even if a later run of it was stopped),
        else ('resume', its newest KILLED run), else (None, None)."""
        uri, parent = self.tracker.uri, self.ctx.parent
        runs = store.runs_with_config(uri, self.cfg.tracking.experiment, config_hash)  # newest first
        run = next((r for r in runs if r.info.status == "FINISHED"), None) or \
            next((r for r in runs if r.info.status == "KILLED"), None)
        running = next((r for r in runs if r.info.status == "RUNNING"), None)
        if running is not None and (run is None or run.info.status != "FINISHED"):
            log.warning("%sthis config's run %s is RUNNING (another sweep trains it, or its process was killed "
                        "before it could end it): this job trains it again", f"[{self.ctx.run_name}] ",
                        running.info.run_id)
        if run is None:
            return None, None
        if parent:
            store.set_tag(uri, run.info.run_id, store.sweep_tag(parent["run_id"]), "reused")
        return ("skip" if run.info.status == "FINISHED" else "resume"), run

    def ready(self) -> None:
        """Wait until the job's run exists and its tracking process's start-up work (imports, store) is done: it
        must not run beside training, where it would take a core from torch's threads (benchmarks/RESULTS.md)."""
        self.tracker.flush()

    # --- each epoch, the end ------------------------------------------------------------------------------------
    def log_epoch(self, metrics: dict) -> None:
        """The epoch just ended to the job's run. A failed earlier write is raised here, as this job's error (even if
        it has just finished: its run lacks this epoch), so a broken store stops training after one epoch."""
        try:
            self.tracker.log_epoch(self.member.state.epoch, metrics)
        except Exception as e:
            self.member.error = e
            raise

    def report(self, metrics: dict) -> bool:
        """A search's trial: report this epoch's monitored score to the study; True if its pruner stops the job
        now (it is then tested on its best checkpoint and ends FINISHED, tagged fmnist.pruned_at_epoch)."""
        if self.trial is None:
            return False
        epoch = self.member.state.epoch
        if not self.trial.report(epoch, metrics[self.cfg.train.monitor]) or not self.member.running:
            return False
        self.pruned_at = epoch
        self.tracker.set_tag("fmnist.pruned_at_epoch", str(epoch))
        log.info("%sPruned after epoch %d of %d (trial %d): its validation score trails the study's", self.member.label,
                 epoch, self.member.settings.epochs, self.trial.number)
        return True

    def submit_results(self, final: dict) -> None:
        """Log the final scores, the best checkpoint, plots and (single runs) the model, handed to the tracker's
        thread, which writes them while the caller goes on; `end_run` then waits and ends the run FINISHED."""
        tracker = self.tracker
        tracker.log_metrics(final)
        tracker.log_artifact(self.member.checkpoint)
        self._log_plots(final)
        if not self.ctx.multirun and tracker.enabled:  # a sweep logs only its winner (callbacks.py)
            example = data.example_input(self.dataset.test_x)
            graph, output = models.export_best(self.cfg.model, self.ctx.job_dir, example)  # beside the plots
            tracker.log_model(graph, example, output, str(torch.__version__))

    def end_run(self, final: dict) -> Outcome:
        """Wait for the job's writes, then end its run FINISHED."""
        tracker = self.tracker
        tracker.finish("FINISHED")
        if not self.ctx.multirun:  # a sweep says where its results are at its end (the table, the parent run)
            if tracker.enabled:
                uri = tracker.uri
                ui = (uri if uri.startswith("http") else "make ui" if uri == store.default_uri()
                      else f"mlflow ui --backend-store-uri {uri}")
                log.info("Results: %s (best_model.pt, plots/, TensorBoard events); MLflow run %s in experiment '%s' "
                         "of %s (%s)", self.ctx.job_dir, tracker.run_id, tracker.experiment, uri, ui)
            else:
                log.info("Results: %s (best_model.pt, config.yaml, the log; untracked: no plots)", self.ctx.job_dir)
        return Outcome("FINISHED", value=final[selection_metric(self.cfg.train.monitor)], run_id=tracker.run_id,
                       pruned_at=self.pruned_at)

    def _log_plots(self, final: dict) -> None:
        """Once at the end: learning curves, test confusion matrix, the 4x8 sample grid; hparams for TensorBoard."""
        tracker, dataset, model = self.tracker, self.dataset, self.member.model
        if not tracker.enabled:
            return
        # labels as uint8: the messages stay well inside the socket's buffer, so sending them never waits for the
        # tracking process (int64 labels made the confusion matrix's message 160 kB, which blocked ~0.3 s)
        y_pred = train.predict(model, dataset.test_x, self.cfg.data.eval_batch_size).cpu().numpy().astype(np.uint8)
        y_true = dataset.test_y.cpu().numpy().astype(np.uint8)
        folder = self.ctx.job_dir / "plots"
        folder.mkdir(exist_ok=True)
        tracker.log_figure("learning_curves", (self.member.state.history, final["best_epoch"], self.ctx.run_name),
                           folder / "learning_curves.png")
        tracker.log_figure("confusion_matrix", (y_true, y_pred), folder / "confusion_matrix.png")
        grid = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(y_true), generator=grid)[:32].numpy()  # the same 32 images for every run
        images = data.pixels(dataset.test_x[pick]).cpu().numpy()
        tracker.log_figure("sample_grid", (images, y_true[pick], y_pred[pick]), folder / "test_samples.png",
                           tensorboard_tag="Samples/test")
        scores = ("ckpt_valid_loss", "ckpt_valid_acc", "test_acc")
        tracker.log_hparams(hparams(self.cfg, self.ctx.run_name), {k: final[k] for k in scores})

    def fail(self, status: str, error: str, signum: int | None = None) -> Outcome:
        """Record a failed or interrupted job: its run ends FAILED/KILLED with the reason, never RUNNING."""
        label = f"[{self.ctx.run_name}] " if self.ctx.multirun else ""  # which job, among a sweep's lines
        log.error("%s%s", label, error)
        tracker = self.tracker
        run_id = tracker.run_id if tracker is not None else None
        if tracker is not None and tracker.enabled:
            try:
                try:
                    tracker.flush()  # the writes asked for so far (they may include creating the run)
                except tracking.TrackingError as e:
                    if str(e) != error:  # the job's own error is logged above
                        log.error("%s", e)
                if tracker.run_id is None and self.ctx.multirun:  # the sweep table lists this job with its reason
                    tracker.start(self.ctx.run_name, self.params, tags={"fmnist.job_dir": str(self.ctx.job_dir)},
                                  parent_run_id=self.ctx.parent["run_id"] if self.ctx.parent else None)
                last = self.ctx.job_dir / "last.pt"
                if last.is_file():
                    tracker.log_artifact(last, "checkpoints")
                tracker.finish(status, error)
            except tracking.TrackingError as e:
                if str(e) != error:
                    log.error("%s", e)
            run_id = tracker.run_id
        if status == "KILLED" and run_id and signum == signal.SIGUSR2 and os.environ.get("SUBMITIT_EXECUTOR"):
            log.warning("Checkpointed for SLURM's requeue: the requeued job continues run %s", run_id)
        elif status == "KILLED" and run_id and not self.ctx.multirun:  # a sweep's line is stop_sweep's
            log.error("Resume with: python -m fmnist_exp %s train.resume=%s", " ".join(self.ctx.overrides), run_id)
        return Outcome(status, error=error, signum=signum, run_id=run_id)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def selection_metric(monitor: str) -> str:
    """The score a job is ranked by: its best checkpoint's own value of the monitored validation metric."""
    return {"valid_loss": "ckpt_valid_loss", "valid_acc": "ckpt_valid_acc"}[monitor]


# TensorBoard's HPARAMS columns for the core settings: column -> config key
HPARAM_KEYS = {"lr": "optimizer.lr", "batch_size": "data.batch_size", "init": "model.init",
               "batch_norm": "model.batch_norm", "dropout": "model.dropout", "weight_decay": "optimizer.weight_decay",
               "seed": "train.seed"}


def hparams(cfg: DictConfig, name: str) -> dict:
    """What TensorBoard's HPARAMS tab compares: the core settings plus whatever else this job overrode, each once
    and as its config value (a number stays a number: the tab filters and sorts it as one)."""
    out = {group: config.choice_name(cfg, group) for group in ("model", "optimizer", "schedule")}
    out.update({column: OmegaConf.select(cfg, key) for column, key in HPARAM_KEYS.items()})
    # optimizer=adam, optimizer.kind=adamw: the optimizer column names it already
    covered = set(HPARAM_KEYS.values()) | set(out) | {"optimizer.kind"}
    for key, value in config.override_pairs(name).items():
        if key not in covered:  # a config group's option (regularization=batchnorm) has no value of its own
            out[key] = OmegaConf.select(cfg, key, default=value)
    return {k: _hparam(v) for k, v in out.items()}


def _hparam(value):
    """A value TensorBoard's hparams take: a bool, number or string (a list as it reads: [0.3, 0.3])."""
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def requeued() -> bool:
    """Whether this process is a SLURM job's second or later attempt (a requeue), in the first one's dirs."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= 1


def requeued_outcome(job_dir: Path) -> Outcome | None:
    """How this job's previous attempt ended, when SLURM requeued it (after SIGUSR2, see settle): None for a
    first attempt."""
    if not (requeued() or os.environ.get("SUBMITIT_EXECUTOR") == "local"):  # the local executor restarts a task
        return None  # in place, with no count: its job dir's outcome says whether SIGUSR2 ended an attempt
    earlier = read_outcome(job_dir)
    if earlier is None or earlier.signum != signal.SIGUSR2:
        return None
    return replace(earlier, signum=None)  # the signal was this attempt's end, not the job's


def settle(outcomes: list[Outcome], members: list[tuple[DictConfig, JobContext]],
           ends_sweep: bool = True) -> int | None:
    """What a process does once its jobs (`members`: each job's config and context) have ended: each outcome goes
    to its job dir (for the sweep's end, and for a requeued job), then, if a signal stopped them (each run KILLED
    with its checkpoint):

    - SIGUSR2 is SLURM's warning before a time limit or preemption. submitit's handler (installed before ours)
      decides: it requeues the job and exits this process (the requeued job continues each run from its last
      checkpoint: Job.prepare), or raises saying why not; then each run says so in its error.
    - In a cluster job (submitit) any signal ends only this job: the sweep that submitted it goes on to its table.
      In a launcher's worker process (the fused launcher's: `ends_sweep=False`; joblib's) the launcher ends the
      sweep once every worker has recorded its jobs.
    - Otherwise the user stopped the sweep (or the single run): the signal is returned, and the caller (the entry
      point, or the launcher) ends the sweep with stopping.stop_sweep.
    """
    job_dirs = [ctx.job_dir for _, ctx in members]
    for outcome, job_dir in zip(outcomes, job_dirs):
        outcome.write(job_dir)
    if stopping.launcher_gone():  # nobody waits for these outcomes: the jobs are recorded, the worker goes
        PROCESS.signals.abandon()
    cfg, ctx = members[0]  # the jobs of a process share their sweep
    uri = ctx.tracking_uri(cfg)
    signum = next((o.signum for o in outcomes if o.signum is not None), None)
    if signum is None:
        return None
    requeue = signal.getsignal(signal.SIGUSR2)
    if signum == signal.SIGUSR2 and callable(requeue):
        try:
            requeue(signum, None)  # submitit: checkpoint this call, `scontrol requeue`, sys.exit
        except Exception as e:  # submitit's UncompletedJobError: "Job not requeued because: ..."
            reason = str(e).split("because:", 1)[-1].strip().rstrip(".")
            for o, job_dir in zip(outcomes, job_dirs):
                if o.status == "KILLED":
                    o.error = (f"{o.error}; not requeued ({reason}: hydra.launcher.max_num_timeout is how many "
                               f"time limits a job may be requeued after)")
                    o.write(job_dir)
                    if o.run_id:  # only tracked jobs have one
                        store.set_tag(store.resolve_uri(uri), o.run_id, "error", o.error)
            log.error("Not requeued by SLURM (%s): resume from the runs' checkpoints with train.resume=RUN_ID",
                      reason)
    if os.environ.get("SUBMITIT_EXECUTOR") or not ends_sweep or multiprocessing.parent_process() is not None:
        return None  # a cluster job, or a launcher's worker process: the launcher's process ends the sweep
    return signum


KNOWN_FAILURES = (config.ConfigError, data.DataError, train.TrainingDiverged, train.CheckpointMismatch,
                  tracking.TrackingError, step.CaptureFailed)


def run(cfg: DictConfig, ctx: JobContext, stop: stopping.StopOnSignal, process: ProcessSettings = PROCESS) -> Outcome:
    """One job, start to end: a group of one."""
    return run_group([(cfg, ctx)], stop, process)[0]


Join = Callable[[int], list[tuple[DictConfig, JobContext]]]  # up to n more jobs that fit the group


def run_group(members: list[tuple[DictConfig, JobContext]], stop: stopping.StopOnSignal,
              process: ProcessSettings = PROCESS,
              epochs_done: Callable[[int], None] | None = None, join: Join | None = None) -> list[Outcome]:
    """Jobs that share a training step (fusion.fusion_key), trained together as one stacked model; one Outcome per
    job, in order. A job's failure is its own; a signal stops them all, each KILLED with its own last checkpoint.
    `epochs_done(n)`, if given, counts the job-epochs done for a progress bar drawn elsewhere (the fused launcher's
    workers): then no batch bar is drawn here.

    A job's lifecycle, in order:
    1. prepare every job (Job.prepare: validate, build, skip or resume, start its run), then wait for every run
       (Job.ready); a job stopped before it starts, skipped, or failing here ends at once;
    2. each epoch: the group trains (train.Group.epoch), each job logs its epoch (Job.log_epoch) and, in a
       search, reports it to the study (Job.report); the jobs that left the stack (finished, stopped early,
       diverged) and those the search's pruner stopped (Group.remove, then tested) end while the rest train on
       (end_trained); then, in a search, new trials take the free places (`join(free)` gives up to `free` more
       jobs that fit the group (fusion.fusion_key): each is prepared as in 1. and joins the stack at its epoch 1);
    3. a signal or an error that stops the group ends each job still in it, KILLED or FAILED (end_failed);
    4. close: every job has its outcome and has released its tracker; a signal that came after the last step is
       noted on each outcome.
    """
    first, first_ctx = members[0]
    spare = machine.cores() // (first_ctx.parallel_jobs or 1) - 1  # this process's cores left beside its training
    n = tracking.processes_for(len(members), spare, first.tracking.processes) if first.tracking.enabled else 1
    if n > 1:
        log.info("Tracking: the writes of %d jobs spread over %d tracking processes", len(members), n)
    said: set[str] = set()
    # 1. prepare
    jobs = start(members, process, said, stop, n)
    # 2. train: jobs resumed from different epochs train as their own groups (each group's members start together)
    by_start: dict[int, list[Job]] = {}
    for job in jobs:
        if job.outcome is None:
            by_start.setdefault(job.member.state.epoch, []).append(job)
    if join is not None and not by_start:  # a search's group whose every trial ended before training: new ones
        by_start[0] = []
    for group_jobs in by_start.values():
        job_of = {job.member: job for job in group_jobs}
        size = max(len(group_jobs), len(members))  # the places a search keeps filled
        filled, asking = [], join is not None  # members per epoch, and whether the search still had trials then
        try:
            progress = bool(group_jobs) and group_jobs[0].member.settings.progress and epochs_done is None
            group = train.Group(list(job_of), group_jobs[0].dataset if group_jobs else None, stop, progress)
            while True:
                if asking and len(group.members) < size and stop.signum is None:
                    wanted = join(size - len(group.members))
                    asking = len(wanted) == size - len(group.members)  # fewer: the search has asked them all
                    joined = start(wanted, process, said, stop, n, first=len(jobs))
                    jobs += joined
                    fresh = [job for job in joined if job.outcome is None]
                    group_jobs += fresh
                    job_of.update({job.member: job for job in fresh})
                    if fresh and group.data is None:
                        group.data = fresh[0].dataset
                    group.add([job.member for job in fresh])
                if not group.members:
                    break
                filled.append((len(group.members), asking))
                epoch = group.epoch()
                for m, metrics in epoch.metrics.items():
                    job_of[m].log_epoch(metrics)
                pruned = [m for m, metrics in epoch.metrics.items() if job_of[m].report(metrics)]  # a search's
                group.remove(pruned)  # pruned trials leave the stack: the rest train on without them
                for m in pruned:
                    train.finish(m, group.data)  # tested on its best checkpoint, as a job stopped early
                if epochs_done is not None:
                    epochs_done(epoch.job_epochs + sum(m.settings.epochs - m.state.epoch for m in pruned))
                end_trained([job_of[m] for m in epoch.left + pruned], stop)  # their runs end now, not the group's
        except Exception as e:  # 3. the whole group stopped: a signal (KILLED) or a bug
            for job in group_jobs:
                if job.member.running:
                    job.member.error = e
            end_trained([job for job in group_jobs if job.outcome is None], stop)
        if join is not None and filled:
            log_occupancy(filled, size)
    # 4. close
    outcomes = [job.outcome for job in jobs]
    if stop.signum is not None:  # the signal came after the last step (testing, plots): the runs are complete
        for o in outcomes:
            if o.signum is None:
                o.signum = stop.signum
        done = [job.ctx.run_name for job, o in zip(jobs, outcomes) if o.status == "FINISHED"]
        if done:
            log.error("interrupted by %s after %s finished", signal.Signals(stop.signum).name,
                      "; ".join(done) if first_ctx.multirun else "this run")
    return outcomes


def log_occupancy(filled: list[tuple[int, bool]], size: int) -> None:
    """How full a search's group stayed: its members per epoch, while the search still had trials to give (the
    last trials' epochs leave places empty: nothing is left to join) and over all its epochs."""
    early = [k for k, asking in filled if asking]
    log.info("Group occupancy: %.1f of %d places per epoch while trials were left to join (%d epochs), %.1f over "
             "all %d epochs", sum(early) / len(early) if early else float("nan"), size, len(early),
             sum(k for k, _ in filled) / len(filled), len(filled))


def start(members: list[tuple[DictConfig, JobContext]], process: ProcessSettings, said: set[str],
          stop: stopping.StopOnSignal, processes: int, first: int = 0) -> list[Job]:
    """A group's jobs (or those joining it: a search's new trials, numbered from `first`), each prepared (its run
    started, the jobs spread over `processes` tracking processes), then all waited for; one that is stopped,
    skipped or fails here ends at once."""
    jobs = [Job(cfg, ctx, process, tracking.pick_process(first + i, processes), said)
            for i, (cfg, ctx) in enumerate(members)]
    for job in jobs:
        try:
            stopped = stop.signum or stopping.sweep_stopped(job.ctx.sweep_dir)
            if stopped is not None:
                raise stopping.Interrupted(stopped, started=False)
            skipped = job.prepare()
            if skipped is not None:
                end(job, stop, lambda: skipped)
        except Exception as e:
            end_failed(job, e, stop)
    # all prepared first, then waited for: the jobs' runs are created (and their tracking processes start) at once
    for job in jobs:
        if job.outcome is None:
            try:
                job.ready()
            except Exception as e:
                end_failed(job, e, stop)
    return jobs


def end_trained(jobs: list[Job], stop: stopping.StopOnSignal) -> None:
    """Jobs out of training end: every job's results first (written by its tracker while the caller goes on), then
    every job's end, FINISHED or failed with its error: one job's writes overlap the next job's plotting, so a
    group's end costs little more than drawing the plots."""
    for job in jobs:
        m = job.member
        if m.error is None:
            try:
                stop.recording = True
                job.submit_results(m.final)
            except Exception as e:
                m.error = e
            finally:
                stop.recording = False
    for job in jobs:
        if job.member.error is not None:
            end_failed(job, job.member.error, stop)
        else:
            end(job, stop, lambda: job.end_run(job.member.final))


def end_failed(job: Job, e: BaseException, stop: stopping.StopOnSignal) -> None:
    """End a job that `e` stopped: KILLED by a signal (the one the sweep was stopped with), FAILED by anything else
    (an unexpected error with its traceback in the log)."""
    if isinstance(e, stopping.Interrupted) and stopping.launcher_gone():
        end(job, stop, lambda: job.fail("KILLED", stopping.LAUNCHER_GONE, e.signum))
    elif isinstance(e, stopping.Interrupted):
        # what the user stopped the sweep with: submitit's controller forwards a Ctrl-C to its task as SIGTERM
        told = stopping.sweep_stopped(job.ctx.sweep_dir)
        if told is not None and told != e.signum:
            e = stopping.Interrupted(told, e.started)
        end(job, stop, lambda: job.fail("KILLED", str(e), e.signum))
    elif isinstance(e, KNOWN_FAILURES):
        end(job, stop, lambda: job.fail("FAILED", str(e), stop.signum))
    else:  # an unexpected bug: keep its traceback in the log, record it, fail the run
        log.error("job %s failed", job.ctx.run_name, exc_info=e)
        end(job, stop, lambda: job.fail("FAILED", f"{type(e).__name__}: {e}", stop.signum))


def end(job: Job, stop: stopping.StopOnSignal, make) -> None:
    """Record how `job` ended (`make()` returns its Outcome; a second stop signal meanwhile is ignored), then release
    its tracker. Recording that fails is said and is the job's outcome: no job is left without one."""
    stop.recording = True
    try:
        job.outcome = make()
    except Exception as e:  # recording the end failed too: say so, never leave the job without an outcome
        log.exception("could not record the end of job %s", job.ctx.run_name)
        job.outcome = Outcome("FAILED", error=f"{type(e).__name__}: {e}")
    finally:
        stop.recording = False
        job.close()
    if job.trial is not None:  # a search's trial: the study hears of its end now, before trials that join after it
        job.trial.end(job.outcome, job.ctx.overrides)
