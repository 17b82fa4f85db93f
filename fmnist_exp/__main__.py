"""Entry point: `python -m fmnist_exp [overrides]` or `fmnist-exp [overrides]`; add `-m` to sweep.

This is the only place that sees the whole config: it builds the data, model, optimizer, scheduler and tracker
and hands each piece to the training loop.
"""
from __future__ import annotations

import logging
import os
import sys
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


def train_job(cfg: DictConfig, tracker: tracking.Tracker, job_dir: Path) -> dict:
    """Build everything from cfg, train, test the best checkpoint and log it all; returns the final metrics."""
    device = pick_device(cfg.train.device)
    torch.set_num_threads(pick_threads(cfg.train.threads, HydraConfig.get()))
    dataset = data.load(cfg.data.root, cfg.data.system_dir, cfg.data.download, cfg.data.valid_size,
                        cfg.data.split_seed, device, cache=cfg.data.cache)
    torch.manual_seed(cfg.train.seed)
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.schedule)(optimizer=optimizer)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    progress = {"on": True, "off": False}.get(cfg.train.progress, sys.stderr.isatty())
    settings = train.LoopSettings(
        epochs=cfg.train.epochs, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
        monitor=cfg.train.monitor, patience=cfg.train.early_stopping.patience,
        min_delta=cfg.train.early_stopping.min_delta, progress=progress)

    summary = models.summary(model)
    (job_dir / "model_summary.txt").write_text(summary + "\n")
    tracker.log_text(summary + "\n", "model_summary.txt")
    tracker.set_tag("fmnist.data_source", dataset.source)
    log.info("Data: %s (%s) on %s | model %s, %s params", dataset.source, dataset.split_sizes(), device,
             type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}")

    checkpoint = job_dir / "best_model.pt"
    final = train.fit(model, optimizer, scheduler, dataset, settings, generator, checkpoint,
                      on_epoch=lambda metrics, state: tracker.log_epoch(state.epoch, metrics))
    tracker.log_metrics(final)
    tracker.log_artifact(checkpoint)
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def task(cfg: DictConfig) -> float | None:
    """One job: a single run, or one child of a sweep. Failures end its MLflow run FAILED, never RUNNING."""
    tracking.silence_noisy_loggers()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    parent = callbacks.read_parent(Path(hc.sweep.dir)) if multirun else None
    tracker = tracking.Tracker(parent["uri"] if parent else cfg.tracking.uri, cfg.tracking.experiment, job_dir,
                               enabled=cfg.tracking.enabled)
    error, status = None, "FINISHED"
    try:
        config.validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        tracker.start(run_name(hc), tracking.flatten(resolved),
                      tags={"fmnist.job_dir": str(job_dir.resolve()), "fmnist.overrides": run_name(hc)},
                      parent_run_id=parent["run_id"] if parent else None)
        tracker.log_artifact(job_dir / "config.yaml")
        final = train_job(cfg, tracker, job_dir)
        return final["test_acc"]
    except (config.ConfigError, data.DataError, train.TrainingDiverged) as e:
        error, status = str(e), "FAILED"
    except Exception as e:  # an unexpected bug: keep its traceback in the job log, record it, fail the run
        log.exception("job failed")
        error, status = f"{type(e).__name__}: {e}", "FAILED"
    except KeyboardInterrupt:
        error, status = "interrupted", "KILLED"
        raise
    finally:
        if tracker.run_id is None and status != "FINISHED" and multirun and cfg.tracking.enabled:
            # the sweep table should show this job too, with its reason
            tracker.start(run_name(hc), {}, tags={"fmnist.job_dir": str(job_dir.resolve())},
                          parent_run_id=parent["run_id"] if parent else None)
        tracker.finish(status, error)
        if error:
            log.error("%s", error)
    if not multirun:
        sys.exit(1)
    return None


def main() -> None:
    """Console script `fmnist-exp`."""
    task()


if __name__ == "__main__":
    main()
