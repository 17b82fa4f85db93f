"""Entry point: `python -m fmnist_exp [overrides]` or `fmnist-exp [overrides]`; add `-m` to sweep.

This is the only place that sees the whole config: it builds the data, model, optimizer, scheduler and tracker
and hands each piece to the training loop.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fmnist_exp import callbacks, config, data, models, tracking, train

log = logging.getLogger("fmnist_exp")
config.register()


def pick_device(name: str) -> torch.device:
    """auto = CUDA when there is a GPU, else CPU; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise config.ConfigError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def pick_threads(requested: int | None, hydra_cfg) -> int:
    """Torch threads for this job: as requested, else the cores shared evenly among parallel jobs."""
    if requested:
        return requested
    n_jobs = hydra_cfg.launcher.get("n_jobs") if hydra_cfg.mode == RunMode.MULTIRUN else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // n_jobs) if isinstance(n_jobs, int) and n_jobs > 0 else torch.get_num_threads()


def run_name(hydra_cfg) -> str:
    """The job's overrides that define the experiment, e.g. 'optimizer=adam data.batch_size=16' ('defaults' if none).

    Keys that say where or how to run rather than what (paths, tracking, resume) are left out, as they are
    from the job directory names (hydra.job.config.override_dirname.exclude_keys in conf/config.yaml).
    """
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded]
    return " ".join(overrides) or "defaults"


def load_data(cfg: DictConfig) -> data.FashionMNIST:
    """The data set on the run's device (before any MLflow run exists, so bad data leaves no run behind)."""
    device = pick_device(cfg.train.device)
    torch.set_num_threads(pick_threads(cfg.train.threads, HydraConfig.get()))
    if device.type == "cpu" and cfg.train.flush_denormal:
        torch.set_flush_denormal(True)  # returns False (and changes nothing) on CPUs without the flag
    return data.load(cfg.data.root, cfg.data.system_dir, cfg.data.download, cfg.data.valid_size,
                     cfg.data.split_seed, device, cache=cfg.data.cache)


def build(cfg: DictConfig, device: torch.device) -> tuple:
    """Model, optimizer, LR schedule and the shuffling generator from the config, seeded.

    Built before the job's MLflow run starts: a config that cannot be built leaves no run behind, and torch's own
    lazy imports (torch._dynamo, which the optimizer pulls in, ~1 s) finish before the tracker's thread imports
    MLflow; two imports at once would only take turns on the GIL and delay the first training step.
    """
    torch.manual_seed(cfg.train.seed)
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.schedule)(optimizer=optimizer)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    return model, optimizer, scheduler, generator


def train_job(cfg: DictConfig, parts: tuple, tracker: tracking.Tracker, job_dir: Path, dataset: data.FashionMNIST,
              resume_from: Path | None, stop: train.StopOnSignal) -> dict:
    """Train the built `parts` (or continue), test the best checkpoint and log it all; returns final metrics."""
    model, optimizer, scheduler, generator = parts
    device = dataset.train_x.device
    progress = {"on": True, "off": False}.get(cfg.train.progress, sys.stderr.isatty())
    settings = train.LoopSettings(
        epochs=cfg.train.epochs, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
        monitor=cfg.train.monitor, patience=cfg.train.early_stopping.patience,
        min_delta=cfg.train.early_stopping.min_delta, progress=progress)
    checkpoint, last = job_dir / "best_model.pt", job_dir / "last.pt"
    state = train.LoopState()
    if resume_from is not None:
        state = train.restore_full_checkpoint(resume_from, model, optimizer, scheduler, generator, checkpoint)
        log.info("Resuming after epoch %d of %d", state.epoch, cfg.train.epochs)

    summary = models.summary(model)
    (job_dir / "model_summary.txt").write_text(summary + "\n")
    if state.epoch == 0:
        tracker.log_text(summary + "\n", "model_summary.txt")
        tracker.log_dataset("fashion-mnist", dataset.digest, dataset.source, dataset.split_sizes())
    tracker.set_tag("fmnist.data_source", dataset.source)
    tracker.set_tag("fmnist.threads", str(torch.get_num_threads()))
    log.info("Data: %s (%s) on %s | model %s, %s params", dataset.source, dataset.split_sizes(), device,
             type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}")

    log.info("Training: %d steps per epoch, epochs %d..%d", -(-len(dataset.train_y) // settings.batch_size),
             state.epoch + 1, settings.epochs)
    final = train.fit(model, optimizer, scheduler, dataset, settings, generator, checkpoint, state=state,
                      last_path=last, stop=stop,
                      on_epoch=lambda metrics, st: tracker.log_epoch(st.epoch, metrics))
    tracker.log_metrics(final)
    tracker.log_artifact(checkpoint)
    log_run_plots(model, dataset, state, final, cfg, tracker, job_dir)
    return final


def log_run_plots(model, dataset: data.FashionMNIST, state: train.LoopState, final: dict, cfg: DictConfig,
                  tracker: tracking.Tracker, job_dir: Path) -> None:
    """Once at the end: learning curves, test confusion matrix, the 4x8 sample grid; hparams for TensorBoard."""
    if not tracker.enabled:
        return
    from fmnist_exp import plots
    y_pred = train.predict(model, dataset.test_x, cfg.data.eval_batch_size).cpu().numpy()
    y_true = dataset.test_y.cpu().numpy()
    folder = job_dir / "plots"
    folder.mkdir(exist_ok=True)
    title = run_name(HydraConfig.get())
    tracker.log_image(plots.render(plots.learning_curves(state.history, final["best_epoch"], title)),
                      folder / "learning_curves.png")
    tracker.log_image(plots.render(plots.confusion_matrix(y_true, y_pred)), folder / "confusion_matrix.png")
    grid = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(y_true), generator=grid)[:32].numpy()  # the same 32 images for every run
    images = data.pixels(dataset.test_x[pick]).cpu().numpy()
    tracker.log_image(plots.render(plots.sample_grid(images, y_true[pick], y_pred[pick])),
                      folder / "test_samples.png", tensorboard_tag="Samples/test")
    tracker.log_hparams(hparams(cfg, HydraConfig.get()), {k: final[k] for k in ("best_valid_acc", "test_acc")})


def hparams(cfg: DictConfig, hydra_cfg) -> dict:
    """What TensorBoard's HPARAMS tab compares: the core settings plus whatever this job overrode."""
    out = {"model": cfg.model._target_.rsplit(".", 1)[-1], "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
           "lr": cfg.optimizer.lr, "batch_size": cfg.data.batch_size, "init": cfg.model.init,
           "batch_norm": cfg.model.batch_norm, "dropout": str(list(cfg.model.dropout)),
           "weight_decay": cfg.optimizer.weight_decay, "schedule": cfg.schedule._target_.rsplit(".", 1)[-1],
           "seed": cfg.train.seed}
    for override in run_name(hydra_cfg).split():
        key, _, value = override.lstrip("+~").partition("=")
        out.setdefault(key, value)
    return out


def resume_checkpoint(uri: str, run, job_dir: Path, params: dict[str, str], ignore: set[str]) -> Path | None:
    """Check that `run` can be continued with this config; its last full checkpoint (None: it never finished
    an epoch, so it starts over in the same run)."""
    rid = run.info.run_id
    if run.info.status == "FINISHED":
        raise config.ConfigError(f"train.resume={rid}: that run already FINISHED; nothing to resume")
    for key, old in sorted(run.data.params.items()):
        if key not in ignore and not key.startswith("sweep.") and params.get(key, old) != old:
            raise config.ConfigError(f"train.resume={rid}: that run has {key}={old}, this config {params[key]}; "
                                     f"resume with the run's own overrides ({key}={old})")
    old_dir = run.data.tags.get("fmnist.job_dir")
    if old_dir and (Path(old_dir) / "last.pt").is_file():
        return Path(old_dir) / "last.pt"
    return tracking.download_artifact(uri, rid, "checkpoints/last.pt", job_dir)


def reuse_earlier_run(cfg: DictConfig, tracker: tracking.Tracker, config_hash: str, parent: dict | None):
    """sweep.skip_finished: ('skip', run) if this exact config FINISHED before, ('resume', run) if it was KILLED."""
    for run in tracking.runs_with_config(tracker.uri, cfg.tracking.experiment, config_hash):
        if run.info.status in ("FINISHED", "KILLED"):
            if parent:
                tracking.client(tracker.uri).set_tag(run.info.run_id, tracking.sweep_tag(parent["run_id"]), "reused")
            return ("skip" if run.info.status == "FINISHED" else "resume"), run
    return None, None


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float | None:
    """One job: a single run, or one child of a sweep. Failures end its MLflow run FAILED, a signal KILLED
    (with a full checkpoint to resume from), never RUNNING."""
    tracking.silence_noisy_loggers()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    parent = callbacks.read_parent(Path(hc.sweep.dir)) if multirun else None
    error, status, exit_code = None, "FINISHED", 1
    tracker, params = None, {}
    with train.StopOnSignal() as stop:
        try:
            tracker = tracking.Tracker(parent["uri"] if parent else cfg.tracking.uri, cfg.tracking.experiment,
                                       job_dir, enabled=cfg.tracking.enabled)
            resolved = OmegaConf.to_container(cfg, resolve=True)
            params = tracking.flatten(resolved)
            config.validate(cfg)
            ignore = set(hc.job.config.override_dirname.exclude_keys)
            config_hash = tracking.config_hash(params, ignore)
            tags = {"fmnist.job_dir": str(job_dir.resolve()), "fmnist.overrides": run_name(hc),
                    "fmnist.config_hash": config_hash}
            resume_id = cfg.train.resume
            if resume_id and not cfg.tracking.enabled:
                raise config.ConfigError("train.resume needs tracking.enabled=true: checkpoints are found via MLflow")
            if multirun and cfg.sweep.skip_finished and not resume_id and tracker.enabled:
                action, earlier = reuse_earlier_run(cfg, tracker, config_hash, parent)
                if action == "skip":
                    log.info("Skipped: this config already FINISHED as run %s", earlier.info.run_id)
                    return earlier.data.metrics.get("test_acc")
                if action == "resume":
                    resume_id = earlier.info.run_id
            (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            dataset = load_data(cfg)
            parts = build(cfg, dataset.train_x.device)
            resume_from = None
            if resume_id:
                earlier = tracking.get_run(tracker.uri, resume_id)
                resume_from = resume_checkpoint(tracker.uri, earlier, job_dir, params, ignore)
                tracker.reopen(resume_id, tags)
                log.info("Continuing MLflow run %s (%s)", resume_id, earlier.info.run_name)
            else:
                tracker.start(run_name(hc), params, tags, parent_run_id=parent["run_id"] if parent else None)
                tracker.log_artifact(job_dir / "config.yaml")
            final = train_job(cfg, parts, tracker, job_dir, dataset, resume_from, stop)
            if not multirun and tracker.enabled:  # a sweep logs only its winner (callbacks.py): this is slow
                tracker.flush()
                tracking.log_model(tracker.uri, tracker.run_id, models.load_best(cfg.model, job_dir),
                                   data.example_input(dataset.test_x))
            tracker.finish("FINISHED")
            if stop.signum is None:
                return final["test_acc"]
            # the signal came after the last training step (testing, plots): this run is complete and FINISHED,
            # but the user asked to stop, so the sweep stops here too
            exit_code = 128 + stop.signum
            log.error("interrupted by %s after this run finished", signal.Signals(stop.signum).name)
        except train.Interrupted as e:
            error, status, exit_code = str(e), "KILLED", 128 + e.signum
        except (config.ConfigError, data.DataError, train.TrainingDiverged, train.CheckpointMismatch,
                tracking.TrackingError) as e:
            error, status = str(e), "FAILED"
        except Exception as e:  # an unexpected bug: keep its traceback in the job log, record it, fail the run
            log.exception("job failed")
            error, status = f"{type(e).__name__}: {e}", "FAILED"
        finally:
            if status != "FINISHED":
                end_failed_job(tracker, hc, parent, job_dir, status, error, multirun, params)
    if status == "KILLED" or exit_code > 128:
        if status == "KILLED" and tracker is not None and tracker.run_id:
            log.error("Resume with: python -m fmnist_exp %s train.resume=%s", " ".join(hc.overrides.task),
                      tracker.run_id)
        if parent:  # the user stopped the sweep: close its parent too
            tracking.end_run(parent["uri"], parent["run_id"], "KILLED")
        sys.exit(exit_code)
    if not multirun:
        sys.exit(exit_code)
    return None


def end_failed_job(tracker, hc, parent, job_dir: Path, status: str, error: str, multirun: bool,
                   params: dict[str, str]) -> None:
    """Record a failed or interrupted job: its run ends FAILED/KILLED with the reason, never RUNNING."""
    log.error("%s", error)
    if tracker is None or not tracker.enabled:
        return
    try:
        try:
            tracker.flush()  # the writes asked for so far (they may include creating the run)
        except tracking.TrackingError as e:
            log.error("%s", e)
        if tracker.run_id is None and multirun:
            # the sweep table should show this job too, with its reason
            tracker.start(run_name(hc), params, tags={"fmnist.job_dir": str(job_dir.resolve())},
                          parent_run_id=parent["run_id"] if parent else None)
        if (job_dir / "last.pt").is_file():
            tracker.log_artifact(job_dir / "last.pt", "checkpoints")
        tracker.finish(status, error)
    except tracking.TrackingError as e:
        log.error("%s", e)


def fast_exit_is_safe() -> bool:
    """Only a plain process may skip the interpreter's teardown: no profiler or coverage (they write at exit), no
    other non-daemon thread, no child process (joblib's workers are shut down by that teardown)."""
    import multiprocessing
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return False
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not others and not multiprocessing.active_children()


def main() -> None:
    """`python -m fmnist_exp` and the console script `fmnist-exp`."""
    code: int | str | None = 0
    try:
        task()
    except SystemExit as e:
        code = e.code
    if not fast_exit_is_safe():
        sys.exit(code)
    # Everything is written by now (runs ended, TensorBoard closed, MLflow flushed). Run the atexit handlers, then
    # skip the interpreter's teardown: with the CUDA build of torch it takes ~0.5 s and touches ~150 MB more memory
    # than the run itself ever used (benchmarks/RESULTS.md).
    atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


if __name__ == "__main__":
    main()
