"""hydra/sweeper=search: Optuna 5 searches, its trials trained by our launchers, the study beside the MLflow store.

Searches run in this process (the `app` fixture) on tiny data; Ctrl-C, the dashboard and the cluster are the
process-boundary tests (marked)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import make_tiny_set, store_runs, tiny_overrides
from test_slurm import FITS_NODE, slurm  # noqa: F401  (slurm: the one-node cluster fixture, this module's own)

SEARCH = ["-m", "hydra/sweeper=search", "hydra/sweeper/pruner=none", "train.epochs=2", "tracking.processes=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_tiny_set(root, n_train=300, n_test=100)
    return root


def study(cwd: Path, name: str | None = None):
    import optuna
    storage = f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=name or names[-1], storage=storage)


def parent_run(cwd: Path):
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    runs = [r for r in store_runs(cwd) if "mlflow.parentRunId" not in r["tags"]]
    return client.get_run(runs[-1]["run_uuid"]), client


def active_runs(cwd: Path) -> list:
    if not (cwd / "mlruns" / "mlflow.db").exists():
        return []
    con = sqlite3.connect(cwd / "mlruns" / "mlflow.db")
    try:
        return con.execute("select run_uuid, status from runs where lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()


# --- the space: Hydra's override grammar, as hydra-optuna-sweeper reads it --------------------------------------
def test_each_override_form_is_the_distribution_hydra_optuna_sweeper_makes():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from fmnist_exp.search import parse_space
    space = parse_space(["optimizer=sgd,adam", "optimizer.lr=tag(log, interval(1e-4, 0.1))",
                         "optimizer.momentum=interval(0, 0.9)", "data.batch_size=choice(16, 100)",
                         "model.hidden=choice([128,64],[256])", "train.epochs=range(1, 5)",
                         "optimizer.weight_decay=range(0.0, 0.01, 0.005)", "train.seed=int(interval(1, 9))",
                         "schedule=shuffle(range(1, 3))", "train.epochs=3", "+experiment=notebook", "~foo"],
                        groups={"optimizer", "schedule", "model"})
    d = space.distributions
    assert d["optimizer"] == CategoricalDistribution(["sgd", "adam"])
    assert d["optimizer.lr"] == FloatDistribution(1e-4, 0.1, log=True)
    assert d["optimizer.momentum"] == FloatDistribution(0.0, 0.9)
    assert d["data.batch_size"] == CategoricalDistribution([16, 100])
    assert d["model.hidden"] == CategoricalDistribution(["[128,64]", "[256]"])
    assert d["optimizer.weight_decay"] == FloatDistribution(0.0, 0.01, step=0.005)
    assert d["train.seed"] == IntDistribution(1, 9)
    assert sorted(d["schedule"].choices) == [1, 2]  # shuffled: categorical, as that plugin reads it
    assert "train.epochs" not in d, "a later plain value fixes a key the space searched"
    assert space.fixed == ["train.epochs=3", "+experiment=notebook", "~foo"]
    assert space.groups == {"optimizer", "schedule"}
    assert parse_space(["train.epochs=range(1,5)"]).distributions["train.epochs"] == IntDistribution(1, 5)
    assert parse_space(["+model.extra=interval(0,1)"]).prefixes["model.extra"] == "+"


@pytest.mark.parametrize("argument, says", [
    ("optimizer.lr=tag(log, interval(0, 0.1))", "a log interval needs bounds above 0"),
    ("optimizer.lr=interval(0.1, 0.01)", "is not below its high bound"),
    ("optimizer.lr=interval(0.1", "does not parse"),
    ("optimizer=choice(sgd,sgd)", "listed twice"),
    ("train.epochs=range(5, 1)", "is empty"),
])
def test_a_space_optuna_cannot_search_is_one_line(argument, says):
    from fmnist_exp.search import SearchError, parse_space
    with pytest.raises(SearchError, match=says) as e:
        parse_space([argument])
    assert "\n" not in str(e.value)


# --- searches, in this process ------------------------------------------------------------------------------------
def test_a_search_trains_its_trials_fused_and_records_them_in_mlflow_and_the_study(app, tiny, tmp_path):
    r = app(*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=1",
            "optimizer.lr=tag(log,interval(1e-3,1e-1))", "optimizer=sgd,adam", "optimizer.momentum=interval(0,0.9)",
            *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Launching 2 jobs as 1 fused group(s)" in out, "each batch of trials trains as one stacked group"
    # the study: 4 trials, each with its MLflow run; a trial's value is its best checkpoint's validation loss
    s = study(tmp_path)
    trials = s.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    parent, client = parent_run(tmp_path)
    children = {c.data.tags["fmnist.trial"]: c for c in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(children) == ["0", "1", "2", "3"]
    for t in trials:
        child = children[str(t.number)]
        assert t.user_attrs["mlflow_run_id"] == child.info.run_id
        assert t.value == pytest.approx(child.data.metrics["ckpt_valid_loss"])  # validation, never test
        assert t.value != pytest.approx(child.data.metrics["test_loss"])
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(t.params["optimizer.lr"], rel=1e-5)
        # SGD's momentum is asked of SGD trials only (Adam has none)
        assert ("optimizer.momentum" in t.params) == (t.params["optimizer"] == "sgd")
    # the parent: the search's settings, the best trial, best_so_far by trial number, Optuna's plots
    p = parent.data.params
    assert p["search.sampler"] == "TPESampler" and p["search.n_trials"] == "4" and p["search.direction"] == "minimize"
    assert p["search.study_name"] == s.study_name and p["search.storage"].endswith("mlruns/optuna.db")
    assert p["sweep.optimizer.lr"] == "tag(log,interval(1e-3,1e-1))"
    best = s.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert p["best.optimizer"] == best.params["optimizer"]
    assert parent.data.metrics["winner_valid_loss"] == pytest.approx(best.value)
    history = client.get_metric_history(parent.info.run_id, "best_so_far")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(
        [min(t.value for t in trials[:n + 1]) for n in range(4)])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optuna_optimization_history.png", "plots/optuna_parallel_coordinate.png",
            "plots/optuna_slice.png", "plots/optuna_param_importances.png"} <= plots
    assert parent.data.tags["fmnist.study"] == s.study_name
    assert parent.info.run_id in s.user_attrs["mlflow.parent_run_ids"]
    # the table has a trial column, best first
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[2].strip() == "trial"
    assert table[2].split("|")[2].strip() == str(best.number)
    # python -m fmnist_exp.report on the search's dir: the same table
    import contextlib
    import io

    from fmnist_exp import report
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report.main([parent.data.tags["fmnist.sweep_dir"]])
    assert [line for line in printed.getvalue().splitlines() if line.startswith("|")] == table


@pytest.mark.e2e  # a few searches each: the fast tier keeps one
def test_rerunning_the_same_command_continues_the_study_and_n_trials_counts_what_it_has(app, tiny, tmp_path):
    args = [*SEARCH, "hydra.sweeper.n_jobs=2", "optimizer.lr=tag(log,interval(1e-3,1e-1))", *tiny_overrides(tiny)]
    assert app(*args, "hydra.sweeper.n_trials=2", cwd=tmp_path).returncode == 0
    r = app(*args, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Continuing the study: 2 trial(s) finished before" in r.stdout + r.stderr
    assert [t.number for t in study(tmp_path).get_trials()] == [0, 1, 2]
    assert len(store_runs(tmp_path)) == 2 + 3  # two parents, three trials


def test_a_trial_that_fails_its_config_check_fails_in_optuna_and_the_search_goes_on(app, tiny, tmp_path):
    r = app(*SEARCH, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_jobs=2", "optimizer.lr=choice(0.01,-1.0)",
            *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 1  # as a grid sweep with a failed job
    trials = {t.params["optimizer.lr"]: t for t in study(tmp_path).get_trials()}
    assert trials[0.01].state.name == "COMPLETE"
    assert trials[-1.0].state.name == "FAIL"
    assert "optimizer.lr" in trials[-1.0].user_attrs["error"] and "\n" not in trials[-1.0].user_attrs["error"]
    assert f"Trial {trials[-1.0].number} failed: " in r.stdout + r.stderr


@pytest.mark.e2e
def test_the_search_mlp_experiment_searches_its_space_with_momentum_for_sgd_alone(app, tiny, tmp_path):
    r = app("+experiment=search_mlp", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=4",
            "hydra.sweeper.sampler.seed=2", "train.epochs=1", "tracking.enabled=false", *tiny_overrides(tiny),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = study(tmp_path).get_trials()
    assert len(trials) == 4 and {t.state.name for t in trials} == {"COMPLETE"}
    assert {"optimizer", "optimizer.lr", "optimizer.weight_decay", "model.dropout", "schedule"} <= set(
        trials[0].distributions)
    assert "sgd" in {t.params["optimizer"] for t in trials} and len({t.params["optimizer"] for t in trials}) > 1
    for t in trials:
        assert ("optimizer.momentum" in t.params) == (t.params["optimizer"] == "sgd")
    assert "Launching 4 jobs as 1 fused group(s)" in r.stdout + r.stderr  # mixed optimizers train as one group


@pytest.mark.e2e  # a few searches each: the fast tier keeps one
@pytest.mark.parametrize("sampler", ["tpe", "gp", "cmaes", "random", "qmc", "grid"])
def test_each_sampler_runs_a_seeded_reproducible_search(app, tiny, tmp_path, sampler):
    args = [*SEARCH, f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.sampler.seed=7", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1", "tracking.enabled=false", "train.epochs=1", *tiny_overrides(tiny),
            "optimizer.lr=range(0.01,0.05,0.01)" if sampler == "grid" else "optimizer.lr=tag(log,interval(1e-3,1e-1))"]
    runs = []
    for name in ("a", "b"):
        r = app(*args, f"hydra.sweeper.study_name={name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append([(t.params, t.value) for t in study(tmp_path, name).get_trials()])
    assert len(runs[0]) == 2 and runs[0] == runs[1]


@pytest.mark.parametrize("args, says", [
    (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0: it must be at least 1"),
    (["optimizer.lr=tag(log,interval(0,1))"], "a log interval needs bounds above 0"),
    (["hydra.sweeper.direction=maximize"], "hydra.sweeper.direction=maximize, but a trial's value is"),
    (["optimizer.lrr=interval(0.1,0.2)"], "optimizer.lrr is not a key of this config"),
    (["hydra.sweeper.storage=sqlite:////proc/nope/optuna.db"], "hydra.sweeper.storage=sqlite:////proc/nope"),
    (["hydra/sweeper/sampler=grid"], "the grid sampler needs discrete values"),
    (["optimizer=sgd,adamm"], "optimizer=adamm does not compose: In 'config': Could not find 'optimizer/adamm'"),
])
def test_bad_input_is_one_line_before_anything_trains_and_leaves_no_run(app, tiny, tmp_path, args, says):
    r = app(*SEARCH, "optimizer.lr=tag(log,interval(1e-3,1e-1))", *args, *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert len([line for line in out.splitlines() if says in line]) == 1, out
    assert "Traceback" not in out and "Epoch" not in out
    assert active_runs(tmp_path) == []


@pytest.mark.e2e  # a few searches each: the fast tier keeps one
def test_a_study_name_taken_by_another_space_or_direction_is_refused(app, tiny, tmp_path):
    base = [*SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=mine", "tracking.enabled=false",
            "train.epochs=1", *tiny_overrides(tiny)]
    assert app(*base, "optimizer.lr=interval(0.01,0.1)", cwd=tmp_path).returncode == 0
    r = app(*base, "optimizer.lr=interval(0.01,0.2)", cwd=tmp_path)
    assert r.returncode == 1 and "study 'mine' exists with another space" in r.stdout + r.stderr
    r = app(*base, "optimizer.lr=interval(0.01,0.1)", "train.monitor=valid_acc", cwd=tmp_path)
    assert r.returncode == 1 and "study 'mine' exists and minimizes its value" in r.stdout + r.stderr


def test_an_unknown_sampler_is_hydras_one_line(app, tiny, tmp_path):
    r = app(*SEARCH, "hydra/sweeper/sampler=tpee", "optimizer.lr=interval(0.01,0.1)", *tiny_overrides(tiny),
            cwd=tmp_path)
    assert r.returncode == 1
    assert "hydra/sweeper/sampler" in r.stderr and "tpe" in r.stderr


def test_trials_a_killed_search_left_running_fail_and_are_asked_again_with_their_params(tmp_path):
    """kill -9 of a search leaves its trials RUNNING in the study: the next run of the command (recover) fails them,
    marked killed (not counted toward n_trials), and enqueues their params to continue them."""
    import optuna

    from fmnist_exp import search
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="x")
    done = s.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    s.tell(done, 0.5)
    lost = s.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    assert search.recover(s) == [lost.number]
    trials = s.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[1].user_attrs[search.KILLED] and trials[2].user_attrs[search.RESUMES] == lost.number
    assert search.counted(s) == 1
    again = s.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    assert again.params == trials[1].params  # asked again with the same config


def test_a_studys_default_name_is_its_space_and_what_it_fixes_not_where_or_how_it_runs():
    from fmnist_exp.search import default_study_name, parse_space
    name = default_study_name("fmnist", parse_space(["optimizer.lr=interval(0.01,0.1)", "train.epochs=3"]),
                              "minimize")
    assert name == default_study_name("fmnist", parse_space(["optimizer.lr=interval(0.01,0.1)", "train.epochs=3",
                                                             "sweep.skip_finished=true", "train.progress=off"]),
                                      "minimize")
    assert name != default_study_name("fmnist", parse_space(["optimizer.lr=interval(0.01,0.1)", "train.epochs=4"]),
                                      "minimize")
    assert name != default_study_name("fmnist", parse_space(["optimizer.lr=interval(0.01,0.2)", "train.epochs=3"]),
                                      "minimize")


def test_the_storage_url_is_recorded_and_printed_without_its_password():
    from fmnist_exp.search import redact
    assert redact("postgresql://me:s3cret@127.0.0.1:5432/optuna") == "postgresql://me:***@127.0.0.1:5432/optuna"
    assert redact("sqlite:////tmp/x/optuna.db") == "sqlite:////tmp/x/optuna.db"


# --- pruning: a trial leaves its fused group after an epoch ------------------------------------------------------
def enqueued(cwd: Path, name: str, configs: list[dict], storage=None) -> None:
    """A study `name` whose first trials are these configs, in order (asked before the sampler proposes any)."""
    import optuna
    s = optuna.create_study(storage=storage or f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}", study_name=name)
    for params in configs:
        s.enqueue_trial(params)


def valid_losses(cwd: Path, run_id: str) -> list[float]:
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, "valid_loss"), key=lambda m: m.step)]


def test_a_pruned_trial_leaves_its_group_after_epoch_1_and_the_others_train_on_as_if_it_had_not(app, tiny, tmp_path):
    """Successive halving at epoch 1: of two trials in one group, the one that trails is pruned; it is tested on its
    best checkpoint and recorded as pruned; the other's training is what it is in the same search unpruned."""
    (tmp_path / "mlruns").mkdir()
    good, bad = {"optimizer.lr": 0.02}, {"optimizer.lr": 1e-5}
    args = [*SEARCH, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "train.epochs=3",
            "optimizer.lr=tag(log,interval(1e-5,0.1))", *tiny_overrides(tiny)]
    enqueued(tmp_path, "pruned", [good, bad])
    r = app(*args, "hydra/sweeper/pruner=successive_halving", "hydra.sweeper.study_name=pruned", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Launching 2 jobs as 1 fused group(s)" in out and "Pruned after epoch 1 of 3 (trial 1)" in out
    kept, pruned = study(tmp_path, "pruned").get_trials()
    assert (kept.state.name, pruned.state.name) == ("COMPLETE", "PRUNED")
    assert pruned.user_attrs["pruned_at_epoch"] == 1 and list(pruned.intermediate_values) == [1]
    assert list(kept.intermediate_values) == [1, 2, 3]  # reported by its job, each epoch
    _, client = parent_run(tmp_path)
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["fmnist.pruned_at_epoch"] == "1"
    assert "test_acc" in run.data.metrics and run.data.metrics["epochs_run"] == 1  # tested on its best checkpoint
    header = [c.strip() for c in next(line for line in r.stdout.splitlines() if line.startswith("|")).split("|")]
    table = {row[header.index("trial")].strip(): row
             for row in (line.split("|") for line in r.stdout.splitlines() if line.startswith("|"))}
    assert table["1"][header.index("pruned_at")].strip() == "1"
    assert table["1"][header.index("epochs_run")].strip() == "1"
    assert table["0"][header.index("pruned_at")].strip() == ""
    # the same two configs unpruned: the kept trial trained exactly the same
    enqueued(tmp_path, "unpruned", [good, bad])
    assert app(*args, "hydra.sweeper.study_name=unpruned", cwd=tmp_path).returncode == 0
    alone, _ = study(tmp_path, "unpruned").get_trials()
    assert valid_losses(tmp_path, kept.user_attrs["mlflow_run_id"]) == pytest.approx(
        valid_losses(tmp_path, alone.user_attrs["mlflow_run_id"]), abs=1e-6)
    assert kept.value == pytest.approx(alone.value, abs=1e-6)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (tests/postgres_server.py) for this module; its URL."""
    import os

    from postgres_server import PostgresUnavailable, postgres_server
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e}: make test must install it", pytrace=False)
        pytest.skip(str(e))


@pytest.mark.e2e
@pytest.mark.parametrize("workers, storage", [(1, "sqlite"), (2, "sqlite"), (2, "journal"), (2, "postgresql")])
def test_a_trial_that_joins_a_running_group_trains_as_it_would_alone_and_so_do_the_others(app, tiny, tmp_path,
                                                                                           workers, storage, request):
    """Two trials; the one that trails is pruned after epoch 1 and a third trial takes its place at that epoch
    boundary: in one process, beside the kept trial's epoch 2 (workers=1); or in the worker process whose group
    it left, asked of the launcher (workers=2: a group each; the two workers report to and tell the one study at
    once, in SQLite, Optuna's journal file or a PostgreSQL server). Each trial trains exactly as it would alone;
    none runs twice, none is lost."""
    import optuna
    from optuna.storages.journal import JournalFileBackend
    (tmp_path / "mlruns").mkdir()
    lrs = [0.02, 1e-5, 0.01]
    url, opened = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}", None
    if storage == "postgresql":
        url = opened = request.getfixturevalue("postgres")
    if storage == "journal":
        url = f"journal:///{tmp_path / 'optuna.log'}"
        opened = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))
    enqueued(tmp_path, "joins", [{"optimizer.lr": lr} for lr in lrs], opened)
    r = app(*SEARCH, "hydra/sweeper/pruner=successive_halving", "hydra.sweeper.study_name=joins",
            f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
            f"hydra.launcher.n_jobs={workers}", "train.epochs=3", "optimizer.lr=tag(log,interval(1e-5,0.1))",
            *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("Launching ") == 1  # one launch: the third trial joined a group, no second batch
    assert "#2 : optimizer.lr=0.01 " in out and "sweep.trial=2 (joins group " in out
    trials = optuna.load_study(study_name="joins", storage=opened or url).get_trials()
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
    if workers == 1:  # the two reports at epoch 1 come in order: the second trails and is pruned
        assert "Launching 2 jobs as 1 fused group(s)" in out and "Pruned after epoch 1 of 3 (trial 1)" in out
        assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
        assert [list(t.intermediate_values) for t in trials] == [[1, 2, 3], [1], [1, 2, 3]]
    assert trials[2].state.name == "COMPLETE" and list(trials[2].intermediate_values) == [1, 2, 3]
    runs = {t.number: t.user_attrs["mlflow_run_id"] for t in trials}
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert sorted(r["tags"]["fmnist.trial"] for r in children) == ["0", "1", "2"]  # each trial once, none lost
    assert {r["run_uuid"] for r in children} == set(runs.values())
    _, client = parent_run(tmp_path)
    joined = client.get_run(runs[2])
    assert joined.data.tags["fmnist.trial"] == "2" and joined.data.metrics["epochs_run"] == 3
    assert "test_acc" in joined.data.metrics
    header = [c.strip() for c in next(line for line in r.stdout.splitlines() if line.startswith("|")).split("|")]
    table = {row[header.index("trial")].strip() for row in (line.split("|") for line in r.stdout.splitlines()
                                                           if line.startswith("|"))}
    assert table >= {"0", "1", "2"}  # the joined trial is in the sweep's table
    # the same configs, each alone (a group of one): per-epoch valid loss equal within 1e-4
    alone = app("-m", "hydra.launcher.max_group=1", "hydra.launcher.n_jobs=1", "train.epochs=3",
                "tracking.processes=1", "optimizer.lr=" + ",".join(map(str, lrs)), *tiny_overrides(tiny), cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    sweep, _ = parent_run(tmp_path)
    by_lr = {float(run.data.params["optimizer.lr"]): run.info.run_id
             for run in client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")}
    for t in trials:
        mine, theirs = valid_losses(tmp_path, runs[t.number]), valid_losses(tmp_path, by_lr[lrs[t.number]])
        assert mine == pytest.approx(theirs[:len(mine)], abs=1e-4), t.number


def test_a_journal_file_storage_holds_the_study_and_each_trials_epochs(app, tiny, tmp_path):
    """journal:///<path>: Optuna's journal file storage (workers that share only a filesystem); the jobs report
    their epochs to it."""
    import optuna
    from optuna.storages.journal import JournalFileBackend
    r = app(*SEARCH, "hydra.sweeper.storage=journal:///studies/optuna.log", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2", "tracking.enabled=false", "optimizer.lr=tag(log,interval(1e-3,1e-1))",
            *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "studies" / "optuna.log")))
    s = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert [(t.state.name, list(t.intermediate_values)) for t in s.get_trials()] == [("COMPLETE", [1, 2])] * 2
    assert "journal:////" in r.stdout + r.stderr  # made absolute: trials may train in another dir


@pytest.mark.e2e
@pytest.mark.parametrize("pruner, knobs", [("median", ["hydra.sweeper.pruner.n_startup_trials=1"]),
                                            ("hyperband", []), ("patient", ["hydra.sweeper.pruner.patience=0"])])
def test_each_pruner_runs_on_tiny_data(app, tiny, tmp_path, pruner, knobs):
    (tmp_path / "mlruns").mkdir()
    enqueued(tmp_path, "p", [{"optimizer.lr": 0.02}, {"optimizer.lr": 1e-5}, {"optimizer.lr": 0.01}])
    r = app(*SEARCH, f"hydra/sweeper/pruner={pruner}", *knobs, "hydra.sweeper.study_name=p", "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.n_trials=3", "train.epochs=3", "optimizer.lr=tag(log,interval(1e-5,0.1))",
            *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = study(tmp_path, "p").get_trials()
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"} and trials[0].state.name == "COMPLETE"
    assert all(t.intermediate_values for t in trials)
    if pruner == "median":  # 1e-5 trails the median of the completed trial at epoch 1
        assert trials[1].state.name == "PRUNED"


# --- across processes ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_ctrl_c_stops_a_search_and_rerunning_it_continues_each_stopped_trial_from_its_checkpoint(tmp_path):
    import signal

    from test_reliability import interrupt_after, start_cli
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)  # epochs long enough to stop one midway
    args = ["-m", "hydra/sweeper=search", "hydra/sweeper/pruner=none", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=3", "hydra.launcher.n_jobs=1", *tiny_overrides(root),
            "data.batch_size=16", "train.epochs=2", "optimizer.lr=tag(log,interval(1e-3,1e-2))"]
    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out
    runs = store_runs(tmp_path)
    assert sorted(r["status"] for r in runs) == ["KILLED"] * 3  # both trials, each with its checkpoint, and the parent
    s = study(tmp_path)
    stopped = s.get_trials()
    assert [t.state.name for t in stopped] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(t.user_attrs.get("fmnist.killed") for t in stopped[:2])

    again = run_search(args, tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stdout.count("Resuming after epoch 1 of 2") == 2
    trials = study(tmp_path).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len(trials) == 5  # 2 stopped (FAIL, not counted), 2 continued, 1 new
    for t in complete[:2]:  # a continued trial is the stopped one's config and MLflow run, trained on
        first = trials[t.user_attrs["fmnist.resumes"]]
        assert t.params == first.params
        assert t.user_attrs["mlflow_run_id"] == first.user_attrs["mlflow_run_id"]
    assert len({t.user_attrs["mlflow_run_id"] for t in complete}) == 3
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 3 and {r["status"] for r in children} == {"FINISHED"}


@pytest.mark.e2e
def test_ctrl_c_after_a_trial_joined_a_group_then_rerunning_continues_every_stopped_trial(tmp_path):
    """A trial pruned after epoch 1, a new one joined in its place; Ctrl-C during the next epoch. The kept trial
    and the one that joined late are KILLED with their checkpoints (FAIL, marked killed, in Optuna); the rerun
    continues each from its own epoch, in its own MLflow run."""
    import signal

    from test_reliability import interrupt_after, start_cli
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)  # epochs long enough to stop one midway
    (tmp_path / "mlruns").mkdir()
    # plain SGD: 1e-5 trails 1e-3 after epoch 1 (pruned), 0.05 leads both (kept on)
    enqueued(tmp_path, "late", [{"optimizer.lr": lr} for lr in (1e-3, 1e-5, 0.05)])
    args = ["-m", "hydra/sweeper=search", "hydra/sweeper/pruner=successive_halving", "hydra.sweeper.study_name=late",
            "optimizer=sgd",
            "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra.launcher.n_jobs=1", *tiny_overrides(root),
            "data.batch_size=16", "train.epochs=3", "optimizer.lr=tag(log,interval(1e-5,0.1))"]
    rc, out = interrupt_after(start_cli(*args, cwd=tmp_path), "Epoch 2/3", signal.SIGINT)
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "sweep.trial=2 (joins group 1)" in out
    stopped = study(tmp_path, "late").get_trials()
    assert [t.state.name for t in stopped] == ["FAIL", "PRUNED", "FAIL", "WAITING", "WAITING"]
    assert stopped[0].user_attrs.get("fmnist.killed") and stopped[2].user_attrs.get("fmnist.killed")
    runs = {r["run_uuid"]: r["status"] for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]}
    assert sorted(runs.values()) == ["FINISHED", "KILLED", "KILLED"]  # the pruned one ended; the others stopped

    again = run_search(args, tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "Resuming after epoch 2 of 3" in out and "Resuming after epoch 1 of 3" in out
    trials = study(tmp_path, "late").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "PRUNED", "FAIL", "COMPLETE", "COMPLETE"]
    for t in trials[3:]:  # each continued trial: the stopped one's params and MLflow run, trained to its end
        first = trials[t.user_attrs["fmnist.resumes"]]
        assert t.params == first.params and t.user_attrs["mlflow_run_id"] == first.user_attrs["mlflow_run_id"]
        assert sorted(t.intermediate_values) == [1, 2, 3]
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 3 and {r["status"] for r in children} == {"FINISHED"}


def run_search(args: list[str], cwd: Path):
    from conftest import run_cli
    return run_cli(*args, cwd=cwd)


@pytest.mark.e2e
@pytest.mark.server
def test_optuna_dashboard_shows_the_study_its_trials_and_their_intermediate_values(app, tiny, tmp_path):
    """`make dashboard` (optuna-dashboard on the study's storage, bound to 127.0.0.1) in headless Chromium."""
    import re
    import shutil
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from conftest import cli_env, free_port
    r = app(*SEARCH, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "train.epochs=3",
            "optimizer.lr=tag(log,interval(1e-3,1e-1))", *tiny_overrides(tiny), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = study(tmp_path)
    assert [len(t.intermediate_values) for t in s.get_trials()] == [3, 3]  # valid_loss per epoch, from MLflow
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: make test installs it (apt-get install -y chromium)")
    def start():  # as `make dashboard` starts it (wsgiref: one process, no gunicorn master, workers or control socket)
        port = free_port()
        log = open(tmp_path / f"dashboard-{port}.log", "w")
        proc = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), "--server", "wsgiref",
                                 "--host", "127.0.0.1", "--port", str(port),
                                 f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"],
                                cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                # no proxy: urlopen's global opener keeps the proxies of this worker's first call, and an earlier
                # test's download ran under http_proxy=127.0.0.1:9 (this test failed in every full run for that)
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/api/studies", timeout=5)
                return proc, port
            except urllib.error.HTTPError:  # it answers: up
                return proc, port
            except OSError:
                time.sleep(0.5)
        proc.terminate()
        proc.wait(timeout=30)
        return None, (tmp_path / f"dashboard-{port}.log").read_text()[-2000:]

    dashboard, port = start()
    if dashboard is None:  # once more on another port (another test's server may have taken the free one)
        dashboard, port = start()
    assert dashboard is not None, f"optuna-dashboard did not start: {port}"
    try:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              "--window-size=1600,1000", "--virtual-time-budget=15000",
                              "--disable-background-networking", "--disable-component-update", "--no-first-run",
                              "--disable-extensions", f"--user-data-dir={tmp_path / 'chrome'}",
                              f"http://127.0.0.1:{port}/dashboard/studies/{s._study_id}"],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert s.study_name in dom
    plot = dom[dom.index('id="intermediate-values"' if 'id="intermediate-values"' in dom else "intermediate-values"):]
    assert re.findall(r'class="legendtext"[^>]*>([^<]*)<', plot)[:2] == ["trial #0 ", "trial #1 "]
    assert plot[:40000].count('class="point"') == 6  # two trials x three epochs


@pytest.mark.e2e
def test_a_search_on_the_slurm_cluster_runs_each_batch_of_trials_as_array_tasks(slurm, tiny, tmp_path):  # noqa: F811
    from conftest import run_cli
    r = run_cli("-m", "hydra/sweeper=search", "hydra/launcher=slurm", *FITS_NODE, "hydra.sweeper.n_trials=3",
                "hydra.sweeper.n_jobs=2", "train.epochs=1", "optimizer=sgd,adam",
                "optimizer.lr=tag(log,interval(1e-3,1e-1))", *tiny_overrides(tiny), cwd=tmp_path, timeout=600,
                env=slurm.env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{out[-3000:]}\n{slurm.jobs()}\n{slurm.log_tails()}"
    assert out.count("SLURM job ") >= 2  # a submission per batch (2 trials, then 1)
    trials = study(tmp_path).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    children = {r["run_uuid"]: r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(children)
    assert {c["status"] for c in children.values()} == {"FINISHED"}
    assert sorted(c["tags"]["fmnist.trial"] for c in children.values()) == ["0", "1", "2"]
    parent, _ = parent_run(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_value"] == pytest.approx(
        study(tmp_path).best_value)
