"""A Hydra sweeper that searches with Optuna 5 (hydra/sweeper=search): it asks the study for n_jobs trials at a
time and hands them to the launcher as one batch (the fused launcher trains them together); a launcher that can
(the fused one) asks for more as trials leave its groups (`launcher.trials`, a search.Joining), until n_trials
have been asked. Each trial's job tells the study how it ended; the sweeper tells those that could not. The
space, the study and the records are fmnist_exp.search's."""
from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fmnist_exp import search

log = logging.getLogger(__name__)
_ABSENT = object()


class SearchSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, pruner: DictConfig, direction: Optional[str], storage: Optional[str],
                 study_name: Optional[str], n_trials: int, n_jobs: int, params: Optional[DictConfig]) -> None:
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.pruner = OmegaConf.to_container(pruner, resolve=True)  # built where each trial trains (trials.py)
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, params
        self.config: Optional[DictConfig] = None
        self.loader = self.launcher = None
        self._composed: dict[tuple, DictConfig] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.loader = hydra_context.config_loader  # before a launcher wraps it
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._search(arguments)
        except search.SearchError as e:  # before anything trained: the sweep's parent recorded nothing
            log.error("%s", e)
            search.discard_parent(Path(str(self.config.hydra.sweep.dir)))
            sys.exit(1)

    # --- the space, checked before anything trains -------------------------------------------------------------
    def _space(self, arguments: list[str]) -> search.Space:
        if self.n_trials is None or self.n_trials < 1:
            raise search.SearchError(f"hydra.sweeper.n_trials={self.n_trials}: it must be at least 1 (the trials "
                                     "the study should have); pass e.g. hydra.sweeper.n_trials=20")
        if self.n_jobs is None or self.n_jobs < 1:
            raise search.SearchError(f"hydra.sweeper.n_jobs={self.n_jobs}: it must be at least 1 (trials trained "
                                     "at once); pass e.g. hydra.sweeper.n_jobs=8")
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        groups = set(self.loader.list_groups(""))
        space = search.parse_space(params + list(arguments), groups)
        if not space.distributions:
            raise search.SearchError("nothing to search: give a space, e.g. 'optimizer.lr=tag(log,interval(1e-4,"
                                     "0.1))' optimizer=sgd,adam, or +experiment=search_mlp")
        if "train.monitor" in space.distributions:
            raise search.SearchError("train.monitor is what a search optimises: fix it (train.monitor=valid_acc), "
                                     "do not search it")
        search.check_keys(space, self._has_key(space))
        return space

    def _has_key(self, space: search.Space):
        """has_key(choices)(key): whether `key` is in the config composed with the space's fixed overrides and these
        config-group choices (one composition per set of choices)."""
        def has_key(choices: dict[str, str]):
            overrides = tuple(space.fixed) + tuple(f"{g}={o}" for g, o in sorted(choices.items()))
            if overrides not in self._composed:
                try:
                    self._composed[overrides] = self.loader.load_sweep_config(self.config, list(overrides))
                except Exception as e:  # Hydra's own words: "Could not find 'optimizer/adamm'" and the options
                    raise search.SearchError(f"the search space's {' '.join(overrides[len(space.fixed):])} does "
                                             f"not compose: {str(e).splitlines()[0]}") from None
            cfg = self._composed[overrides]
            return lambda key: OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
        return has_key

    def _direction(self) -> str:
        monitor = self.config.train.monitor
        wanted = search.DIRECTIONS.get(monitor, "minimize")
        if self.direction is not None and str(self.direction).lower() != wanted:
            raise search.SearchError(f"hydra.sweeper.direction={self.direction}, but a trial's value is its best "
                                     f"checkpoint's {monitor} (train.monitor), which is {wanted}d: leave direction "
                                     f"out, or set train.monitor=" + ("valid_acc" if wanted == "minimize" else
                                                                      "valid_loss"))
        return wanted

    def _sampler(self, space: search.Space):
        sampler = instantiate(self.sampler)
        if isinstance(sampler, functools.partial):  # the grid sampler: its points are the space's
            grid = search.grid_space(space)
            sampler = sampler(grid)
            size = 1
            for values in grid.values():
                size *= len(values)
            if self.n_trials > size:
                log.info("The grid has %d points: n_trials %d -> %d", size, self.n_trials, size)
                self.n_trials = size
        return sampler

    # --- the search --------------------------------------------------------------------------------------------
    def _search(self, arguments: list[str]) -> None:
        started, launched = time.perf_counter(), 0.0
        search.quiet_optuna()
        cfg = self.config
        space = self._space(arguments)
        direction = self._direction()
        sampler = self._sampler(space)
        url = search.absolute_storage(self.storage or search.default_storage(cfg.tracking.uri, cfg.tracking.enabled))
        storage = search.open_storage(url)
        name = self.study_name or search.default_study_name(cfg.tracking.experiment, space, direction)
        pruner = instantiate(self.pruner)
        study = search.open_study(storage, name, sampler, direction, space, pruner)
        lost = search.recover(study)
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        parent = search.read_parent(sweep_dir)
        search.record_start(parent, study, url, type(sampler).__name__, type(pruner).__name__, self.n_trials,
                            self.n_jobs, space)
        search.write_search_file(sweep_dir, url, name, self.pruner)
        done = search.counted(study)
        log.info("Study '%s' in %s: %s, %s, %d trials, %d at a time, %s %s", name, search.redact(url),
                 type(sampler).__name__, type(pruner).__name__, self.n_trials, self.n_jobs, direction,
                 search.selection_metric(cfg.train.monitor))
        log.info("Space: %s", space.describe())
        if done or lost or search.waiting(study):
            log.info("Continuing the study: %d trial(s) finished before%s", done,
                     f"; trials {', '.join(map(str, lost))} were left running and are asked again" if lost else "")
        if done >= self.n_trials:
            log.info("The study has its %d trials already: raise hydra.sweeper.n_trials to search on", done)
        logged: set[int] = set()
        search.record_progress(parent, study, logged)
        job_idx, leftover = 0, []  # leftover: trials asked for a running group they did not fit
        while done < self.n_trials:
            room = self.n_trials - done - len(leftover)
            asked = [study.ask() for _ in range(max(0, min(self.n_jobs - len(leftover), room)))]
            trials = [t for t, _ in leftover] + asked
            batch = [o for _, o in leftover] + [self._overrides(t, space) for t in asked]
            # more trials join the launcher's running groups as their jobs leave (pruned or done), up to n_trials
            joining = search.Joining(study, room - len(asked), lambda t: self._overrides(t, space))
            self.launcher.trials = joining
            try:
                t0 = time.perf_counter()
                returns = self.launcher.launch(batch, initial_job_idx=job_idx)
                launched += time.perf_counter() - t0
            except BaseException:  # a stop (exit 128+N) or a launcher's error: unfinished trials are asked again
                joined = list(joining.joined.values())
                search.end_batch(study, trials + [j[0] for j in joined] + [t for t, _ in joining.leftover],
                                 batch + [j[1] for j in joined] + [o for _, o in joining.leftover], sweep_dir,
                                 [job_idx + i for i in range(len(batch))] + [j[2] for j in joined]
                                 + [None] * len(joining.leftover))
                raise
            finally:
                self.launcher.trials = None
            ended = list(zip(trials, batch, returns)) + [(t, o, ret) for t, o, _, ret in joining.joined.values()]
            for trial, overrides, ret in ended:
                outcome = search.outcome_of(ret, sweep_dir) if ret is not None else None
                history = search.monitored_history(parent, outcome, cfg.train.monitor)
                search.tell(study, trial, overrides, outcome, history)
            job_idx += len(returns) + len(joining.joined)
            leftover = joining.leftover
            done = search.counted(study)
            search.record_progress(parent, study, logged)
            self._log_best(study, done)
        search.record_end(parent, study, sweep_dir)
        total = time.perf_counter() - started
        log.info("Search: %.1f s, of which %.1f s the launcher's (training) and %.1f s the search's own (space, "
                 "sampler, study, records)", total, launched, total - launched)

    def _overrides(self, trial, space: search.Space) -> list[str]:
        overrides = search.suggest(trial, space, self._has_key(space)) + [f"sweep.trial={trial.number}"]
        # a stopped trial asked again: it continues from its last checkpoint (found in MLflow by its config)
        if search.RESUMES in trial.user_attrs and not any(o.startswith("sweep.skip_finished=") for o in overrides):
            overrides.append("sweep.skip_finished=true")
        return overrides

    def _log_best(self, study, done: int) -> None:
        points = search.best_so_far(study)
        if points:
            log.info("%d of %d trials done; best so far %.4f (trial %d)", done, self.n_trials, points[-1][2],
                     study.best_trial.number)
