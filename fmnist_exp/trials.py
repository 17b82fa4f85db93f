"""A search's trial as its job sees it: each epoch the job reports its monitored validation score to the study and
asks the pruner whether to stop (job.run_group takes a pruned job out of its group); when the job ends, it tells
the study how (`tell`), so that the sampler and the pruner know of it before the trials that join after it.

The search sweeper writes where its study is (storage, name, pruner) to search.json in the sweep dir before it
launches any trial (search.write_search_file); a job with sweep.trial set finds it there, in whichever process or
node it trains.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"  # in a search's sweep dir: {"storage", "study_name", "pruner"}


JOURNAL = "journal:///"  # journal:///path/optuna.log: Optuna's journal file storage (a filesystem is all it needs)


def open_storage(url: str):
    """Optuna's storage for a URL: a database URL (sqlite:///..., postgresql://...) as Optuna reads it, or
    journal:///<path> for its journal file storage (workers that share only a filesystem)."""
    import optuna
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix(JOURNAL)))
    return optuna.storages.RDBStorage(url)


class TrialLink:
    """One trial of the study, for the job that trains it: `report(epoch, value)` -> whether to prune it now."""

    def __init__(self, trial, number: int):
        self.trial, self.number = trial, number

    @classmethod
    def open(cls, trial_number: int | None, sweep_dir: Path | None) -> "TrialLink | None":
        """The link of trial `trial_number` of the search whose sweep dir this is; None outside a search. A study
        that cannot be reached is one warning: the job trains on, unpruned (the sweeper records its result)."""
        if trial_number is None or sweep_dir is None or not (sweep_dir / SEARCH_FILE).is_file():
            return None
        path = sweep_dir / SEARCH_FILE
        try:
            import optuna
            from hydra.utils import instantiate
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            spec = json.loads(path.read_text())
            pruner = instantiate(spec["pruner"]) if spec.get("pruner") else optuna.pruners.NopPruner()
            study = optuna.load_study(study_name=spec["study_name"], storage=open_storage(spec["storage"]),
                                      pruner=pruner)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
            return cls(optuna.trial.Trial(study, trial_id), trial_number)
        except Exception as e:
            log.warning("trial %s: its study could not be reached (%s); it trains unpruned", trial_number,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return None

    def replay(self, history: list[dict], monitor: str) -> None:
        """A trial that continues a stopped one's run (resumed from its checkpoint): the epochs trained before, as
        its intermediate values too (the pruner is asked only of the epochs it trains now)."""
        try:
            for h in history:
                if math.isfinite(h[monitor]):
                    self.trial.report(h[monitor], h["epoch"])
        except Exception as e:
            log.warning("trial %d: its earlier epochs not reported to its study (%s)", self.number,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)

    def end(self, outcome, overrides: list[str]) -> None:
        """The job ended: tell the study (a KILLED job is left RUNNING: its search asks it again)."""
        if outcome.status == "KILLED":
            return
        try:
            tell(self.trial.study, self.trial, overrides, outcome)
        except Exception as e:  # the sweeper tells it once the launch returns
            log.warning("trial %d: its end not told to its study (%s)", self.number,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)

    def report(self, epoch: int, value: float) -> bool:
        """Report this epoch's value (the study's intermediate value) and return the pruner's verdict."""
        if not math.isfinite(value):
            return False
        try:
            self.trial.report(value, epoch)
            return self.trial.should_prune()
        except Exception as e:  # the study's store hiccuped: this trial trains on
            log.warning("trial %d: epoch %d not reported to its study (%s)", self.number, epoch,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return False


def tell(study, trial, overrides: list[str], outcome) -> str:
    """Record a trial's job in the study: PRUNED (its value: the last epoch it reported), COMPLETE with its value,
    else FAIL with the job's one-line reason (the search goes on). `outcome`: the job's Outcome, None if it never
    recorded one. Returns the trial's state."""
    from optuna.trial import TrialState
    if outcome is not None and outcome.run_id:
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
    trial.set_user_attr("overrides", " ".join(overrides))
    if outcome is not None and outcome.status == "FINISHED" and outcome.pruned_at is not None:
        trial.set_user_attr("pruned_at_epoch", outcome.pruned_at)
        _tell(study, trial, state=TrialState.PRUNED)
        return "PRUNED"
    if outcome is not None and outcome.status in ("FINISHED", "SKIPPED") and outcome.value is not None \
            and math.isfinite(outcome.value):
        _tell(study, trial, outcome.value)
        return "COMPLETE"
    reason = (outcome.error if outcome is not None and outcome.error
              else f"its job ended {outcome.status if outcome else 'without an outcome'}")
    trial.set_user_attr("error", reason[:1000])
    _tell(study, trial, state=TrialState.FAIL)
    log.warning("Trial %d failed: %s; the search goes on", trial.number, reason)
    return "FAIL"


def _tell(study, trial, *args, **kwargs) -> None:
    """study.tell outside Study.optimize: the grid sampler, its grid done, calls Study.stop, which raises there;
    the trial is told all the same (Optuna stores its state after the sampler's hook, whatever the hook raised)."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
