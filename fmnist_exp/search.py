"""A search: Optuna 5 proposes each trial's overrides, our launchers train the trials (fused, as grid jobs), and the
study lives beside the MLflow store. All that hydra_plugins/fmnist_search may import of fmnist_exp.

The space is Hydra's override grammar, read as hydra-optuna-sweeper reads it (`parse_space`): `choice(...)` or a
comma list is categorical, `range(a,b[,step])` an int or float grid (b included, as that plugin has it),
`interval(a,b)` a float, `int(interval(a,b))` an int, `tag(log, interval(a,b))` log-uniform; a plain value fixes a
key. A key of one config group's option (`optimizer.momentum`, SGD's alone) is suggested only to trials whose
choice has it (`Space.conditional`). Each trial is a job whose value is its best checkpoint's monitored validation
score (train.monitor), never a test score.

A study is named after its space (`default_study_name`), so rerunning the same command continues it
(`open_study`): finished trials count toward n_trials, and trials a stopped or killed search left unfinished are
re-run from their last checkpoint (`recover`, `end_batch`: FAIL in Optuna, asked again with sweep.skip_finished).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fmnist_exp import store

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"  # beside the MLflow store's mlflow.db
DIRECTIONS = {"valid_loss": "minimize", "valid_acc": "maximize"}  # train.monitor -> how Optuna optimises it
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc", "grid")  # conf: hydra/sweeper/sampler=<name>
KILLED = "fmnist.killed"  # trial user attr: a stopped or lost trial, FAIL in Optuna and asked again
RESUMES = "fmnist.resumes"  # an enqueued trial's attr: the number of the killed trial it continues
SPACE_ATTR, FIXED_ATTR = "fmnist.space", "fmnist.fixed"  # study user attrs: what the study searches


class SearchError(Exception):
    """Bad input to a search: one line that says what to do, before anything trains."""


# --- the space ----------------------------------------------------------------------------------------------------
@dataclass
class Space:
    """What a search varies (`distributions`, Optuna's), what it fixes (`fixed`: overrides as typed, passed to every
    trial) and which keys are config groups (`groups`: their choice is suggested first; `conditional` keys exist in
    some of a group's options only)."""
    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    conditional: dict[str, str] = field(default_factory=dict)  # key -> the group whose choice decides it
    prefixes: dict[str, str] = field(default_factory=dict)  # key -> + or ++ as typed (+model.extra=...)

    def to_json(self) -> str:
        from optuna.distributions import distribution_to_json
        return json.dumps({k: json.loads(distribution_to_json(d)) for k, d in sorted(self.distributions.items())},
                          sort_keys=True)

    def describe(self) -> str:
        return ", ".join(f"{k}: {describe(d)}" for k, d in self.distributions.items())


def describe(d) -> str:
    """A distribution as one reads it: [1e-4, 0.1] log, {sgd, adam}, 1..10 step 1."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    if isinstance(d, CategoricalDistribution):
        return "{" + ", ".join(map(str, d.choices)) + "}"
    kind = "int " if isinstance(d, IntDistribution) else ""
    step = f" step {d.step}" if getattr(d, "step", None) not in (None, 1) or (kind and d.step != 1) else ""
    return f"{kind}[{d.low:g}, {d.high:g}]{' log' if d.log else ''}{step}"


def parse_space(arguments: list[str], groups: set[str] = frozenset()) -> Space:
    """The space of `arguments` (hydra.sweeper.params as `key=value` strings, then the command line's overrides: a
    later key wins, so the command line can fix or re-range what a config's params search). `groups`: the config
    groups (optimizer, schedule, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    parser = OverridesParser.create()
    entries: dict[str, Any] = {}
    prefixes: dict[str, str] = {}
    for argument in arguments:
        try:
            override = parser.parse_overrides([argument])[0]
        except HydraException as e:
            raise SearchError(f"the search space's '{argument}' does not parse ({str(e).splitlines()[0]}); write "
                              "it as key=interval(1e-4,0.1), key=tag(log,interval(1e-4,0.1)), key=int(interval(1,8)), "
                              "key=range(1,8), key=choice(a,b) or key=a,b") from None
        key = override.key_or_group
        entries.pop(key, None)  # the later one wins, in its own place
        entries[key] = distribution(override) if override.is_sweep_override() else override.input_line
        element = override.get_key_element()
        prefixes[key] = element[:len(element) - len(key)] if element.endswith(key) else ""
    space = Space()
    for key, entry in entries.items():
        if isinstance(entry, str):
            space.fixed.append(entry)
        else:
            space.distributions[key] = entry
            space.prefixes[key] = prefixes[key]
            if key in groups:
                space.groups.add(key)
    return space


def distribution(override):
    """Optuna's distribution for one sweep override, as hydra-optuna-sweeper makes it; a SearchError for what
    Optuna cannot search."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    value, line = override.value(), override.input_line
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if len(set(map(str, choices))) < len(choices):
            raise SearchError(f"'{line}': a choice is listed twice; list each once")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if any(isinstance(v, float) for v in (start, stop, step)):
            if not start <= stop:
                raise SearchError(f"'{line}': its start {start} is above its stop {stop}; write range(low,high,step)")
            return FloatDistribution(float(start), float(stop), step=float(step) if step else None)
        if not start <= stop or step <= 0:
            raise SearchError(f"'{line}' is empty; write range(low,high) with low <= high and a positive step")
        return IntDistribution(int(start), int(stop), step=int(step))
    if isinstance(value, IntervalSweep):
        low, high, log_scale = value.start, value.end, "log" in value.tags
        if not low < high:
            raise SearchError(f"'{line}': its low bound {low} is not below its high bound {high}; write "
                              "interval(low,high)")
        if log_scale and low <= 0:
            raise SearchError(f"'{line}': a log interval needs bounds above 0 (its low bound is {low}); write e.g. "
                              f"tag(log,interval(1e-5,{high}))")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    raise SearchError(f"'{line}' is a sweep Optuna cannot search (glob?); use choice, range or interval")


def check_keys(space: Space, has_key: Callable[[dict[str, str]], Callable[[str], bool]]) -> None:
    """Find which searched keys exist only under some options of a searched config group (SGD's momentum), and
    refuse a key that exists under none. `has_key(choices)`: whether a key exists in the config composed with those
    group choices (config group -> option)."""
    from optuna.distributions import CategoricalDistribution
    for group in space.groups:  # every option composes (a typo in one is said now, not when a trial draws it)
        for option in space.distributions[group].choices:
            has_key({group: str(option)})
    values = [k for k in space.distributions if k not in space.groups and not space.prefixes.get(k)]
    base = has_key({})
    for key in values:
        if base(key):
            continue
        group = key.split(".")[0]
        options = space.distributions.get(group)
        if group in space.groups and isinstance(options, CategoricalDistribution):
            if any(has_key({group: str(option)})(key) for option in options.choices):
                space.conditional[key] = group
                continue
            raise SearchError(f"the search space's {key} is a key of no {group} option it searches "
                              f"({', '.join(map(str, options.choices))}): check its spelling")
        raise SearchError(f"the search space's {key} is not a key of this config: check its spelling, or add it "
                          f"with +{key}=... if it is new")


def suggest(trial, space: Space, has_key: Callable[[dict[str, str]], Callable[[str], bool]]) -> list[str]:
    """Ask `trial` for a value of each searched key (config groups first; a conditional key only where the trial's
    choice has it) and return the trial's overrides: the suggestions, then the fixed overrides."""
    params: dict[str, Any] = {}
    for key in space.distributions:
        if key in space.groups:
            params[key] = trial._suggest(key, space.distributions[key])
    exists = has_key({k: str(v) for k, v in params.items()}) if space.conditional else None
    for key, dist in space.distributions.items():
        if key in space.groups or (key in space.conditional and not exists(key)):
            continue
        params[key] = trial._suggest(key, dist)
    return [f"{space.prefixes.get(k, '')}{k}={format_value(v)}" for k, v in params.items()] + list(space.fixed)


def format_value(value) -> str:
    """A suggested value as an override's value: floats to 6 significant digits (run names and job dirs stay
    readable; 5e-7 of a learning rate changes nothing), the rest as Hydra reads them."""
    if isinstance(value, float) and math.isfinite(value):
        return repr(float(f"{value:.6g}"))
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def grid_space(space: Space) -> dict[str, list]:
    """The grid sampler's points: every searched key must be discrete (a choice, or a range)."""
    from optuna.distributions import CategoricalDistribution
    grid = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif getattr(d, "step", None):
            n = int(round((d.high - d.low) / d.step)) + 1
            grid[key] = [d.low + i * d.step for i in range(n)]
        else:
            raise SearchError(f"the grid sampler needs discrete values and {key} is {describe(d)}: make it "
                              "choice(...) or range(low,high,step), or pick another sampler")
    return grid


# --- the study ----------------------------------------------------------------------------------------------------
def default_storage(tracking_uri: str | None, enabled: bool) -> str:
    """Where a study lives unless hydra.sweeper.storage says: beside the MLflow store when that is SQLite
    (mlruns/optuna.db by default), else ./mlruns/optuna.db."""
    if enabled:
        uri = store.resolve_uri(tracking_uri)
        if uri.startswith("sqlite:///"):
            return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / STORAGE_FILE}"
    folder = Path.cwd() / store.DEFAULT_STORE.parent
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STORAGE_FILE}"


def redact(url: str) -> str:
    """A storage URL as it may be printed and recorded: without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def default_study_name(experiment: str, space: Space, direction: str) -> str:
    """The same command (same space, same fixed overrides, same direction) names the same study: rerunning it
    continues the search. n_trials, the sampler and where/how keys (sweep.skip_finished, tracking.*, paths:
    config.where_how_keys) may change between runs."""
    from fmnist_exp import config
    where_how = config.where_how_keys()
    fixed = sorted(o for o in space.fixed if o.split("=", 1)[0].lstrip("+~") not in where_how)
    digest = hashlib.sha256(json.dumps([space.to_json(), fixed, direction]).encode()).hexdigest()[:8]
    return f"{experiment}-search-{digest}"


def quiet_optuna() -> None:
    """Optuna's own INFO lines (one per trial, the study's creation) and its experimental-feature warnings: the
    search logs its own."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def absolute_storage(url: str) -> str:
    """A SQLite or journal file's URL with an absolute path (a trial's job may run in another dir or on another
    node): sqlite:///runs/optuna.db -> sqlite:////<cwd>/runs/optuna.db."""
    from fmnist_exp import trials
    for scheme in ("sqlite:///", trials.JOURNAL):
        if url.startswith(scheme) and not url.startswith(scheme + "/"):
            return f"{scheme}{Path.cwd() / url.removeprefix(scheme)}"
    return url


def open_storage(url: str):
    """Optuna's storage for `url` (trials.open_storage; a SQLite or journal file's folder is made), or a SearchError
    saying what to pass."""
    from fmnist_exp import trials
    if url.startswith(("sqlite:///", trials.JOURNAL)):
        path = Path(url.removeprefix("sqlite:///").removeprefix(trials.JOURNAL))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SearchError(f"hydra.sweeper.storage={redact(url)}: cannot create {path.parent} ({e.strerror}); "
                              "pass a storage in a folder you can write to") from None
    try:
        return trials.open_storage(url)
    except Exception as e:
        raise SearchError(f"hydra.sweeper.storage={redact(url)} cannot be opened ({store.first_line(e, 200)}); pass "
                          "sqlite:///path/optuna.db, journal:///path/optuna.log or a database URL Optuna reads "
                          "(postgresql://...)") from None


def open_study(storage, name: str, sampler, direction: str, space: Space, pruner=None):
    """The study `name`: made, or loaded to continue it. One that searches another space, or the other direction,
    is a SearchError (a new name, or the same command, continues cleanly)."""
    import optuna
    try:
        existing = optuna.study.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
        if existing.direction.name.lower() != direction:
            raise SearchError(f"study '{name}' exists and {existing.direction.name.lower()}s its value, not "
                              f"{direction}s it: pass hydra.sweeper.study_name=<a new name>")
        if existing.user_attrs.get(SPACE_ATTR) not in (None, space.to_json()):
            raise SearchError(f"study '{name}' exists with another space ({existing.user_attrs[SPACE_ATTR]}): pass "
                              "hydra.sweeper.study_name=<a new name>, or search that study's space")
        return existing
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name,
                                direction=direction, load_if_exists=True)
    study.set_user_attr(SPACE_ATTR, space.to_json())
    study.set_user_attr(FIXED_ATTR, space.fixed)
    return study


def counted(study) -> int:
    """Trials that count toward n_trials: ended, except those a stop or a lost process killed (asked again)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.is_finished() and not t.user_attrs.get(KILLED))


def recover(study) -> list[int]:
    """Trials a killed search left RUNNING (its process lost: kill -9, a lost node): FAIL in Optuna, marked killed,
    and asked again (enqueued with their params) to continue from their checkpoints. Returns their numbers."""
    from optuna.trial import TrialState
    lost = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in lost:
        kill(study, t._trial_id, t.number, t.params, "its search process ended without recording it")
    return [t.number for t in lost]


def kill(study, trial_id: int, number: int, params: dict, reason: str) -> None:
    """A trial that did not end (stopped, or its process lost): FAIL, saying why, and asked again with its params."""
    from optuna.trial import TrialState
    study._storage.set_trial_user_attr(trial_id, KILLED, reason)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={RESUMES: number}, skip_if_exists=False)


def tell(study, trial, overrides: list[str], outcome, history: list[tuple[int, float]] = ()) -> str:
    """Record a trial's job in the study (trials.tell), unless the job has told it itself as it ended. `history`:
    its monitored metric per epoch from MLflow, for the epochs its job could not report (intermediate values).
    Returns the trial's state."""
    from fmnist_exp import trials
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state.is_finished():
        return frozen.state.name
    reported = frozen.intermediate_values  # by the job, each epoch
    for step, value in history:
        if math.isfinite(value) and step not in reported:
            trial.report(value, step)
    return trials.tell(study, trial, overrides, outcome)


def trial_number(overrides: list[str]) -> int:
    """The trial a job's overrides are (its sweep.trial=N)."""
    return next(int(o.split("=", 1)[1]) for o in overrides if o.startswith("sweep.trial="))


class Joining:
    """The trials of one launch that are not in its batch (launching.TrialSource, for the launcher): asked when a
    running group has free places, up to `budget` (what n_trials leaves after the batch). Trials that did not fit
    the group they were asked for are `leftover` (the next batch); those that joined one are `joined`, each
    (trial, overrides, job number, JobReturn or None until it ended)."""

    def __init__(self, study, budget: int, overrides_of: Callable):
        self.study, self.budget, self.overrides_of = study, budget, overrides_of
        self.asked: dict[int, tuple] = {}  # trial number -> (trial, overrides)
        self.leftover: list[tuple] = []
        self.joined: dict[int, list] = {}  # trial number -> [trial, overrides, num, ret]

    def __getstate__(self) -> dict:
        """A copy in another process (a SLURM task's pickled launcher) asks nothing: only the sweeper's own
        Joining asks the study, so every trial asked is one the sweeper will launch or tell."""
        return {**self.__dict__, "study": None, "budget": 0}

    def take(self, n: int) -> list[list[str]]:
        out = []
        while len(out) < n and self.budget > 0:
            try:
                trial = self.study.ask()
            except Exception:
                if out:  # the ones asked so far join; the rest may be asked at the next free place
                    break
                raise
            self.budget -= 1
            overrides = self.overrides_of(trial)
            self.asked[trial.number] = (trial, overrides)
            out.append(overrides)
        return out

    def give_back(self, overrides: list[str]) -> None:
        self.leftover.append(self.asked[trial_number(overrides)])

    def started(self, overrides: list[str], num: int) -> None:
        trial, mine = self.asked[trial_number(overrides)]
        self.joined[trial.number] = [trial, mine, num, None]

    def ended(self, overrides: list[str], ret) -> None:
        self.joined[trial_number(overrides)][3] = ret


def waiting(study) -> int:
    """Trials enqueued and not asked yet (stopped ones asked again)."""
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def selection_metric(monitor: str) -> str:
    """The metric a trial's value is: its best checkpoint's monitored validation score."""
    return {"valid_loss": "ckpt_valid_loss", "valid_acc": "ckpt_valid_acc"}.get(monitor, monitor)


def monitored_history(parent: dict | None, outcome, monitor: str) -> list[tuple[int, float]]:
    """A trial's monitored validation metric per epoch, from its MLflow run (empty when untracked)."""
    if parent is None or outcome is None or not outcome.run_id:
        return []
    try:
        return store.metric_history(parent["uri"], outcome.run_id, monitor)
    except Exception as e:  # the value still counts; the dashboard shows no curve for it
        log.warning("trial's %s history not read from MLflow: %s", monitor, store.first_line(e))
        return []


def read_parent(sweep_dir: Path) -> dict | None:
    return store.read_parent(sweep_dir)


def discard_parent(sweep_dir: Path) -> None:
    """A search refused before any trial ran (bad input): its parent run recorded nothing and is deleted, as a
    typo in a grid sweep's values leaves no run."""
    parent = store.read_parent(sweep_dir)
    if parent:
        try:
            store.discard_run(parent["uri"], parent["run_id"])
            (sweep_dir / store.PARENT_FILE).unlink(missing_ok=True)
        except Exception as e:  # the exit hook tries again (callbacks.end_if_running)
            log.error("could not delete the search's empty parent run: %s", store.first_line(e))


def outcome_of(ret, sweep_dir: Path):
    """The Outcome a launched trial's job recorded (outcome.json in its job dir), else one made from its JobReturn
    (another app's task: its return value), else None."""
    from omegaconf import OmegaConf

    from fmnist_exp import launching
    hydra_cfg = getattr(ret, "hydra_cfg", None)
    output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None) if hydra_cfg else None
    outcome = launching.read_outcome(Path(output_dir)) if output_dir else None
    if outcome is None:
        try:
            value = ret.return_value
        except Exception as e:  # the task raised
            return launching.Outcome("FAILED", error=store.first_line(e))
        if isinstance(value, (int, float)):
            return launching.Outcome("FINISHED", value=float(value))
    return outcome


def end_batch(study, trials: list, batch: list[list[str]], sweep_dir: Path, nums: list[int | None]) -> None:
    """A batch the launcher did not return (the user stopped the search, or the launcher failed): each trial whose
    job (number `nums[i]`; None: it never started) ended is told as it ended; the others FAIL in Optuna, marked
    killed, and are asked again by the next run of the same command (continuing from their last checkpoint)."""
    from optuna.trial import TrialState

    from fmnist_exp import launching
    by_num = {}
    for name, outcome in launching.read_outcomes(sweep_dir):
        num = name.split("_", 1)[0]
        if num.isdigit():
            by_num[int(num)] = outcome
    for i, (trial, overrides) in enumerate(zip(trials, batch)):
        try:
            if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                continue
            outcome = by_num.get(nums[i]) if nums[i] is not None else None
            if outcome is not None and outcome.status in ("FINISHED", "SKIPPED", "FAILED"):
                tell(study, trial, overrides, outcome)
            else:
                if outcome is not None and outcome.run_id:
                    trial.set_user_attr("mlflow_run_id", outcome.run_id)
                kill(study, trial._trial_id, trial.number, trial.params,
                     outcome.error if outcome is not None and outcome.error else "stopped with its search")
        except Exception as e:  # ending anyway: the next run's recover() finds it RUNNING
            log.error("trial %d was not recorded as stopped: %s", trial.number, store.first_line(e))


# --- records on the search's parent run ---------------------------------------------------------------------------
def write_search_file(sweep_dir: Path, storage_url: str, study_name: str, pruner: dict) -> None:
    """Where each trial's job finds its study and pruner (trials.TrialLink), in the sweep dir."""
    from fmnist_exp import trials
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / trials.SEARCH_FILE
    path.write_text(json.dumps({"storage": storage_url, "study_name": study_name, "pruner": pruner}))
    path.chmod(0o600)  # a database URL may hold a password


def record_start(parent: dict | None, study, storage_url: str, sampler_name: str, pruner_name: str, n_trials: int,
                 n_jobs: int, space: Space) -> None:
    """The search's settings on its parent run (params search.*, tag fmnist.study) and the parent's id on the
    study (mlflow.parent_run_ids: one per command that searched it)."""
    runs = list(study.user_attrs.get("mlflow.parent_run_ids", []))
    if parent is None:
        return
    study.set_user_attr("mlflow.parent_run_ids", runs + [parent["run_id"]])
    study.set_user_attr("mlflow.experiment_id", parent["experiment_id"])
    store.log_params(parent["uri"], parent["run_id"], {
        "search.study_name": study.study_name, "search.storage": redact(storage_url),
        "search.sampler": sampler_name, "search.pruner": pruner_name, "search.n_trials": str(n_trials),
        "search.n_jobs": str(n_jobs),
        "search.direction": study.direction.name.lower(), "search.space": space.describe()[:6000],
        "search.finished_before": str(counted(study))})
    store.set_tags(parent["uri"], parent["run_id"], {"fmnist.study": study.study_name,
                                                      "fmnist.search_storage": redact(storage_url)})


def best_so_far(study) -> list[tuple[int, float, float]]:
    """(trial number, its value, the best value up to it) for each COMPLETE trial, in trial order."""
    from optuna.trial import TrialState
    sign = 1 if study.direction.name.lower() == "minimize" else -1
    out, best = [], math.inf
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        best = min(best, sign * t.value)
        out.append((t.number, t.value, sign * best))
    return out


def record_progress(parent: dict | None, study, logged: set[int]) -> None:
    """trial_value and best_so_far on the parent, stepped by trial number, for trials not yet `logged` there."""
    if parent is None:
        return
    points = [p for p in best_so_far(study) if p[0] not in logged]
    if points:
        store.log_metric_steps(parent["uri"], parent["run_id"],
                               {"trial_value": [(n, v) for n, v, _ in points],
                                "best_so_far": [(n, b) for n, _, b in points]})
        logged.update(n for n, _, _ in points)


def record_end(parent: dict | None, study, sweep_dir: Path) -> None:
    """The best trial (params best.<key>, metric best_value, tag) and Optuna's plots on the parent run; one log
    line with the best trial."""
    from optuna.trial import TrialState
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log.warning("No trial of study '%s' completed: there is no best trial", study.study_name)
        return
    best = study.best_trial
    log.info("Best trial %d of study '%s': %s = %.4f with %s", best.number, study.study_name,
             "value", best.value, " ".join(f"{k}={format_value(v)}" for k, v in best.params.items()))
    if parent is None:
        return
    uri, run_id = parent["uri"], parent["run_id"]
    store.log_params(uri, run_id, {f"best.{k}": format_value(v) for k, v in best.params.items()})
    store.log_metrics(uri, run_id, {"best_value": best.value, "best_trial": best.number})
    store.set_tags(uri, run_id, {"fmnist.best_trial": str(best.number),
                                 "fmnist.best_trial_run_id": best.user_attrs.get("mlflow_run_id", "")})
    for path in plots(study, sweep_dir / "search"):
        store.log_artifact(uri, run_id, path, "plots")


def plots(study, folder: Path) -> list[Path]:
    """Optuna's plots of the study (matplotlib): optimization history, parameter importances, parallel coordinate,
    slice. A plot the study cannot draw yet (importances need two completed trials and a varied parameter) is left
    out with one line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, draw in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("parallel_coordinate", ovm.plot_parallel_coordinate), ("slice", ovm.plot_slice)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            path = folder / f"optuna_{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out.append(path)
        except Exception as e:
            log.info("Optuna's %s plot was left out: %s", name.replace("_", " "), store.first_line(e, 200))
    return out
