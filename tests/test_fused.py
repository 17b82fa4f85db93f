"""Fused sweeps: what fuses, a job trained in a group equals the job trained alone, and `hydra/launcher=fused`
run the way a user runs it (failures, signals, resume), plus Hydra's own launcher test suites against it."""
from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import pytest
import torch
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from mlflow import MlflowClient

from conftest import compose_cfg, run_cli, store_runs, tiny_overrides, vary, wait_for_children
from fmnist_exp import fusion, job, stopping
from hydra_plugins.fmnist_launchers import _core
from hydra_plugins.fmnist_launchers.fused_launcher import FusedLauncher


def test_the_launcher_is_found_the_way_hydra_finds_plugins():
    assert FusedLauncher.__name__ in [p.__name__ for p in Plugins.instance().discover(Launcher)]


def test_what_fuses_and_what_does_not():
    cfgs = [compose_cfg(*o) for o in [
        [],                                                        # 0: the defaults
        ["optimizer=sgd", "schedule=cosine"],                      # 1: optimizer, schedule: per job
        ["model.init=he", "model.dropout=[0.5,0.2]", "train.monitor=valid_acc"],  # 2: init, dropout, monitor
        ["train.early_stopping.patience=2", "optimizer=adamw"],    # 3: early stopping, AdamW
        ["data.batch_size=16"],                                    # 4: another step shape
        ["model.hidden=[256,64]"],                                 # 5: another architecture
        ["regularization=batchnorm"],                              # 6: BatchNorm: apart on a CPU (cost)
        ["train.epochs=3"],                                        # 7: another number of epochs
        ["data.batch_size=16", "optimizer=sgd"],                   # 8: with 4
    ]]
    assert fusion.plan_groups(cfgs, None) == [[0, 1, 2, 3], [6], [4, 8], [5], [7]]
    assert fusion.plan_groups(cfgs, 3) == [[0, 1, 2], [3], [6], [4, 8], [5], [7]]  # fused.max_group caps a group


def test_batchnorm_is_a_per_job_switch_where_one_step_for_both_costs_less(monkeypatch):
    """The notebook grid's ablations: plain, He, He+BN, He+BN+dropout, SGD and Adam, at one batch size. On a CPU a
    step's arithmetic dominates and BatchNorm over all eight jobs costs more than a second step: two groups (a pair
    mixes: a step's fixed part dominates). On a GPU a step costs its launches: one group of all eight."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a login node planning for GPU nodes
    ladder = [[f"optimizer={o}", f"ablation={a}", "data.batch_size=16"] for o in ("sgd", "adam")
              for a in ("plain", "he", "he_bn", "he_bn_dropout")]
    cpu = [compose_cfg(*o, "train.device=cpu") for o in ladder]
    gpu = [compose_cfg(*o, "train.device=cuda") for o in ladder]
    assert len({fusion.fusion_key(c) for c in cpu}) == 1
    assert fusion.plan_groups(cpu, None) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert fusion.plan_groups(gpu, None) == [list(range(8))]
    assert fusion.describe_fusion(gpu).startswith("model MLP [128, 64] (+BN for 4 of 8), batch 16")
    assert fusion.describe_fusion([cpu[i] for i in (2, 3)]).startswith("model MLP [128, 64] +BN, batch 16")
    # a worker's half of a mixed group holds one kind: no stand-ins
    assert fusion.balance([list(range(8))], cpu, 2) == [[2, 3, 6, 7], [0, 1, 4, 5]]
    pair = [cpu[0], cpu[6]]  # plain SGD, He+BN Adam: cheaper as one step on one core, apart on two
    assert fusion.plan_groups(pair, None) == [[0, 1]] and fusion.balance([[0, 1]], pair, 2) == [[1], [0]]


def test_a_group_never_holds_more_jobs_than_fit_in_memory(monkeypatch):
    cfgs = [compose_cfg(f"train.seed={i}") for i in range(5)]
    assert 1 <= fusion.jobs_that_fit(cfgs[0]) and fusion.jobs_that_fit(cfgs[0], share=1e-12) == 1
    monkeypatch.setattr(fusion, "jobs_that_fit", lambda cfg: 2)
    assert fusion.plan_groups(cfgs, 64) == [[0, 1], [2, 3], [4]]


def test_a_login_node_without_a_gpu_plans_groups_for_gpu_nodes(monkeypatch):
    """hydra/launcher=slurm plans groups where the sweep is submitted; train.device=cuda jobs run on GPU nodes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfgs = [compose_cfg(f"train.seed={i}", "train.device=cuda") for i in range(5)]
    assert fusion.plan_groups(cfgs, 4) == [[0, 1, 2, 3], [4]]
    # 4 learning rates x 4 seeds: on a CPU a group per seed (shared batches), on a GPU, launch-bound, one group
    grid = [[f"optimizer.lr={lr}", f"train.seed={seed}"] for lr in (0.001, 0.002, 0.004, 0.008) for seed in range(4)]
    assert fusion.plan_groups([compose_cfg(*o, "train.device=cpu") for o in grid], None) == [
        list(range(seed, 16, 4)) for seed in range(4)]
    assert fusion.plan_groups([compose_cfg(*o, "train.device=cuda") for o in grid], None) == [list(range(16))]


def test_groups_are_balanced_for_worker_processes():
    """n_jobs workers take groups costliest first; the costliest is halved only where that shortens the sweep."""
    card = [compose_cfg(*o) for o in [["data.batch_size=16"], ["data.batch_size=100"],
                                       ["data.batch_size=16", "optimizer=sgd"], ["data.batch_size=100", "optimizer=sgd"]]]
    groups = fusion.plan_groups(card, None)
    assert groups == [[0, 2], [1, 3]]
    assert fusion.balance(groups, card, 2) == [[0, 2], [1, 3]]  # halving the batch-16 pair would not end sooner
    assert fusion.balance(list(reversed(groups)), card, 2) == [[0, 2], [1, 3]]  # costliest first
    base = compose_cfg()
    seeds = [vary(base, f"train.seed={i}") for i in range(64)]
    assert fusion.balance([list(range(64))], seeds, 1) == [list(range(64))]
    assert fusion.balance([list(range(64))], seeds, 2) == [list(range(32)), list(range(32, 64))]  # one per worker
    assert [len(g) for g in fusion.balance([list(range(64))], seeds, 4)] == [16] * 4
    assert fusion.makespan([4, 3, 2, 2], 2) == 6 and fusion.makespan([5], 3) == 5
    # jobs of one seed share their batches: a sweep over seeds fuses per seed where the parts cost less...
    grid = [vary(base, f"optimizer.lr={lr}", f"optimizer.weight_decay={wd}", f"train.seed={seed}")
            for lr in (0.001, 0.002, 0.004, 0.008) for wd in (0, 0.001, 0.01, 0.1) for seed in range(4)]
    assert fusion.plan_groups(grid, None) == [list(range(seed, 64, 4)) for seed in range(4)]
    assert fusion.balance(fusion.plan_groups(grid, None), grid, 2) == [list(range(seed, 64, 4)) for seed in range(4)]
    few = [compose_cfg(f"train.seed={seed}", f"optimizer.lr={lr}") for seed in range(4) for lr in (0.001, 0.002)]
    assert fusion.plan_groups(few, None) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # two jobs a seed: pairs cost less
    pair = [compose_cfg(f"train.seed={seed}", "data.batch_size=16") for seed in range(2)]
    assert fusion.plan_groups(pair, None) == [[0, 1]]  # ...one a seed: fused still (a step's fixed part saved)
    assert fusion.balance([list(range(8))], few, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # halved along seeds
    alternating = [few[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)]  # seeds 0 1 2 3 0 1 2 3
    assert fusion.balance([list(range(8))], alternating, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # workers only where they repay their start: the design card yes, two jobs of one epoch no
    assert fusion.workers_pay(groups, fusion.balance(groups, card, 2), card, 2)
    short = [compose_cfg("train.epochs=1", f"optimizer.lr={lr}") for lr in (0.01, 0.001)]
    assert not fusion.workers_pay([[0, 1]], fusion.balance([[0, 1]], short, 2), short, 2)


def history(outcome_job_dir):
    return torch.load(outcome_job_dir / "last.pt", weights_only=True)["loop"]["history"]


def test_each_job_config_is_composed_once_for_the_sweeper_and_the_launcher():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from conftest import CONF
    from fmnist_exp import config
    from hydra_plugins.fmnist_launchers import _core
    config.register()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    master = loader.load_configuration("config", overrides=["optimizer=sgd,adam"], run_mode=RunMode.MULTIRUN)
    composed = []
    compose = loader.load_configuration
    loader.load_configuration = lambda *a, **k: composed.append(k["overrides"]) or compose(*a, **k)
    once = _core.ComposedOnce(loader)
    batch = [["optimizer=sgd"], ["optimizer=adam"]]
    for overrides in batch:  # what Hydra's sweepers do to check a batch before launching it
        once.load_sweep_config(master_config=master, sweep_overrides=overrides)
    configs = [once.take_sweep_config(master, overrides) for overrides in batch]
    assert len(composed) == 2 and [c.optimizer.kind for c in configs] == ["sgd", "adam"]
    assert list(configs[0].hydra.overrides.task) == ["optimizer=sgd"]
    again = once.take_sweep_config(master, batch[0])  # taken once: a second call composes it anew
    assert len(composed) == 3 and again is not configs[0] and again == configs[0]


def test_a_job_trained_in_a_group_matches_the_job_trained_alone(tmp_path, tiny_root):
    """3 jobs without dropout (SGD+momentum, Adam, AdamW with a schedule, different seeds), fused vs alone."""
    variants = [["optimizer=sgd", "optimizer.momentum=0.9", "train.seed=1"],
                ["optimizer=adam", "train.seed=2", "model.init=he"],
                ["optimizer=adamw", "train.seed=3", "schedule=step", "schedule.step_size=1"]]
    cfgs = [compose_cfg(*tiny_overrides(tiny_root), "train.epochs=2", "tracking.enabled=false", *v)
            for v in variants]
    fused = [job.JobContext(tmp_path / f"fused{i}", f"job{i}") for i in range(3)]
    alone = [job.JobContext(tmp_path / f"alone{i}", f"job{i}") for i in range(3)]
    process = job.ProcessSettings()
    outcomes = job.run_group(list(zip(cfgs, fused)), stopping.StopOnSignal(), process)
    assert [o.status for o in outcomes] == ["FINISHED"] * 3
    for cfg, ctx_f, ctx_a in zip(cfgs, fused, alone):
        assert job.run(cfg, ctx_a, stopping.StopOnSignal(), process).status == "FINISHED"
        initial = job.build(cfg, torch.device("cpu")).model.state_dict()
        assert all(torch.equal(initial[k], v) for k, v in
                   job.build(cfg, torch.device("cpu")).model.state_dict().items())  # seeded: the same start
        f, a = history(ctx_f.job_dir), history(ctx_a.job_dir)
        assert [h["epoch"] for h in f] == [1, 2]
        for hf, ha in zip(f, a):
            assert hf["valid_loss"] == pytest.approx(ha["valid_loss"], rel=1e-4)
            assert hf["lr"] == ha["lr"]


def test_a_group_counts_each_epoch_and_the_epochs_its_leavers_skip(tmp_path, tiny_root):
    """run_group's epochs_done (the fused workers' feed to the sweep's bar) hears each epoch's job-epochs: the jobs
    that trained it, plus the epochs a diverged (epoch 1) or early-stopped (epoch 2) job will not train."""
    variants = [["optimizer.lr=0.1"], ["optimizer.lr=1e12"],
                ["optimizer.lr=0.1", "train.early_stopping.patience=1", "train.early_stopping.min_delta=100"]]
    cfgs = [compose_cfg(*tiny_overrides(tiny_root), "train.epochs=4", "tracking.enabled=false", "optimizer=sgd", *v)
            for v in variants]
    ctxs = [job.JobContext(tmp_path / f"job{i}", f"job{i}") for i in range(3)]
    counts = []
    outcomes = job.run_group(list(zip(cfgs, ctxs)), stopping.StopOnSignal(), job.ProcessSettings(), epochs_done=counts.append)
    assert [o.status for o in outcomes] == ["FINISHED", "FAILED", "FINISHED"]
    assert counts == [1 + (1 + 3) + 1, 1 + (1 + 2), 1, 1] and sum(counts) == 3 * 4


@pytest.fixture
def one_thread():
    """Fused workers train on one torch thread each; the jobs they are compared with must too (below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LADDER = lambda *ablations: [[f"optimizer={o}", f"ablation={a}"] for a in ablations for o in ("sgd", "adam")]
SEEDS = lambda *extra: [[f"optimizer={o}", f"train.seed={s}", *extra] for s in (0, 1) for o in ("sgd", "adam")]


ODD = [[f"optimizer={o}", f"ablation={a}", "data.batch_size=7"] for a in ("plain", "he") for o in ("sgd", "adam")]
NARROW = [[f"optimizer={o}", "model.hidden=[8]", "data.batch_size=64", f"optimizer.lr={lr}"] for o in ("sgd", "adam")
          for lr in (0.01, 0.001)]  # one seed: the first layer is one wide product where that is exact
CNN_ODD = [[f"optimizer={o}", "model=cnn", "data.batch_size=7", f"train.seed={s}"] for o in ("sgd", "adam")
           for s in (0, 1)]
CNN_NARROW = [[f"optimizer={o}", "model=cnn", "model.channels=[8,16]", "data.batch_size=64", f"train.seed={s}"]
              for o in ("sgd", "adam") for s in (0, 1)]


@pytest.mark.parametrize("variants", [LADDER("he_bn", "he_bn_dropout"), LADDER("plain", "he_bn_dropout"), SEEDS(),
                                      SEEDS("data.batch_size=20"), SEEDS("regularization=dropout"), SEEDS("model=cnn"),
                                      ODD, NARROW, CNN_ODD, CNN_NARROW],
                         ids=["bn", "mixed", "seeds", "seeds-batch20", "seeds-dropout", "seeds-cnn", "batch7", "narrow",
                              "cnn-batch7", "cnn-narrow"])
def test_at_one_thread_a_job_in_a_group_is_bitwise_the_job_alone(tmp_path, tiny_root, one_thread, variants):
    """The notebook grid's He+BN (+dropout) group: SGD and Adam, one seed (so one batch for all), fused vs alone;
    a group of jobs with and without BatchNorm, as a GPU trains them (a per-job switch); and groups of two seeds,
    so a batch per job (MLP at batch 16 and 20 with dropout, CNN); odd batches and narrow layers, where a stacked
    product in another orientation than a lone layer's rounded differently (stacked.BatchedLinear).
    On the same number of threads every kernel gives a job's numbers whatever else is stacked beside it, so the two
    are equal to the last bit: what differs between a sweep's fused jobs and the same jobs run alone on 2 threads
    is torch's own 1- vs 2-thread rounding (batch-norm statistics, reductions), not fusion."""
    cfgs = [compose_cfg(*tiny_overrides(tiny_root), "train.epochs=2", "tracking.enabled=false", "data.batch_size=16",
                        "train.threads=1", *v) for v in variants]
    assert len({fusion.fusion_key(c) for c in cfgs}) == 1
    assert fusion.shares_batches(cfgs) == (len({c.train.seed for c in cfgs}) == 1)
    fused = [job.JobContext(tmp_path / f"fused{i}", f"job{i}") for i in range(4)]
    alone = [job.JobContext(tmp_path / f"alone{i}", f"job{i}") for i in range(4)]
    process = job.ProcessSettings()
    outcomes = job.run_group(list(zip(cfgs, fused)), stopping.StopOnSignal(), process)
    assert [o.status for o in outcomes] == ["FINISHED"] * len(cfgs)
    for cfg, ctx_f, ctx_a in zip(cfgs, fused, alone):
        assert job.run(cfg, ctx_a, stopping.StopOnSignal(), process).status == "FINISHED"
        f, a = history(ctx_f.job_dir), history(ctx_a.job_dir)
        assert [{k: v for k, v in h.items() if k != "epoch_time"} for h in f] == \
               [{k: v for k, v in h.items() if k != "epoch_time"} for h in a]
        best_f, best_a = (torch.load(c.job_dir / "best_model.pt", weights_only=True) for c in (ctx_f, ctx_a))
        assert best_f.keys() == best_a.keys() and all(torch.equal(best_f[k], best_a[k]) for k in best_f)


@pytest.mark.e2e
def test_fused_design_card_sweep_has_four_complete_children(tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=fused", *tiny_overrides(tiny_root), "train.epochs=2",
                     "optimizer=sgd,adam", "data.batch_size=16,100", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Group 1/2: 2 job(s) sharing model MLP [128, 64], batch 16" in out
    assert_job_lines_as_hydra_logs_them(result.stdout, epochs=2, jobs=4, groups=2)
    runs = store_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 4 and {r["status"] for r in runs} == {"FINISHED"}
    assert {c["tags"]["fmnist.group"] for c in children} == {"1", "2"}
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for child in children:
        r = c.get_run(child["run_uuid"])
        assert [m.step for m in c.get_metric_history(r.info.run_id, "valid_loss")] == [1, 2]
        assert {"test_acc", "ckpt_valid_loss", "best_epoch"} <= set(r.data.metrics)
        assert {"best_model.pt", "config.yaml", "model_summary.txt"} <= {a.path for a in c.list_artifacts(
            r.info.run_id)}
        job_dir = r.data.tags["fmnist.job_dir"]
        assert (tmp_path / job_dir / ".hydra" / "overrides.yaml").is_file()  # as Hydra's own launchers leave it
        from fmnist_exp import models
        from omegaconf import OmegaConf
        models.load_best(OmegaConf.load(f"{job_dir}/config.yaml").model, job_dir)  # loads strict, weights_only
    assert sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1
    # each job dir has its group's log: one file (hard links), with every job's epochs and the group's start
    for group in ("1", "2"):
        dirs = [Path(r["tags"]["fmnist.job_dir"]) for r in children if r["tags"]["fmnist.group"] == group]
        logs = [d / "group.log" for d in dirs]
        assert len({log.stat().st_ino for log in logs}) == 1 and logs[0].stat().st_nlink == 2
        text = logs[0].read_text()
        assert all(text.count(f"[{r['tags']['fmnist.overrides']}] Epoch 2/2") == 1 for r in children
                   if r["tags"]["fmnist.group"] == group)


def assert_job_lines_as_hydra_logs_them(stdout: str, epochs: int, jobs: int, groups: int) -> None:
    """A job's lines look as under the basic launcher (Hydra's job_logging: logger and level, which `[HYDRA]` hid,
    an [ERROR] too); a group's jobs share their data and shapes: its Data and Training lines come once."""
    lines = stdout.splitlines()
    epoch_lines = [line for line in lines if f"Epoch {epochs}/{epochs} |" in line]
    assert len(epoch_lines) == jobs and all(re.match(r"\[[\d:, -]+\]\[fmnist_exp\.train\]\[INFO\] - \[", line)
                                            for line in epoch_lines), "\n".join(epoch_lines)
    assert sum("][fmnist_exp][INFO] - Data: " in line for line in lines) == groups, stdout[-3000:]
    assert sum("][fmnist_exp][INFO] - Training: " in line for line in lines) == groups, stdout[-3000:]


def test_a_group_log_is_each_job_dirs_where_links_fail(tmp_path, monkeypatch):
    """group.log as each job dir's own file where hard links cannot be made, or where one was there before."""
    paths = [tmp_path / f"job{i}" / "group.log" for i in range(3)]
    for p in paths:
        p.parent.mkdir()
    paths[2].write_text("attempt 1\n")  # a requeued job's log from its first attempt, in another file
    handlers = _core.group_log(paths)
    assert len(handlers) == 2 and paths[1].stat().st_ino == paths[0].stat().st_ino != paths[2].stat().st_ino
    again = _core.group_log(paths)  # a requeue: the links stay, nothing is added
    assert len(again) == 2
    for h in handlers + again:
        h.close()

    def refuse(source, link):
        raise OSError("no hard links here")
    monkeypatch.setattr(_core.os, "link", refuse)
    other = [tmp_path / f"other{i}.log" for i in range(3)]
    log = logging.getLogger("group-log-test")
    handlers = _core.group_log(other)
    for h in handlers:
        log.addHandler(h)
    log.warning("a line")
    for h in handlers:
        log.removeHandler(h)
        h.close()
    assert len(handlers) == 3 and all(p.read_text() == "a line\n" for p in other)


@pytest.mark.e2e  # the whole command, in this process: it trains
def test_a_diverging_job_fails_alone_inside_its_group(app, tmp_path, tiny_root):
    result = app("-m", "hydra/launcher=fused", "hydra.launcher.n_jobs=1", *tiny_overrides(tiny_root),
                     "train.epochs=2", "optimizer=sgd", "optimizer.lr=0.1,1e12", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "1 of 2 jobs failed" in out and "training diverged: loss is nan at epoch 1" in out
    runs = store_runs(tmp_path)
    bad = next(r for r in runs if r["name"].endswith("optimizer.lr=1000000000000.0"))
    good = next(r for r in runs if r["name"].endswith("optimizer.lr=0.1"))
    assert f"[fmnist_exp][ERROR] - [{bad['name']}] training diverged" in out  # which job, at ERROR level
    assert bad["status"] == "FAILED" and good["status"] == "FINISHED"
    assert bad["tags"]["fmnist.group"] == good["tags"]["fmnist.group"]  # they trained together


@pytest.mark.e2e
def test_a_job_that_leaves_its_group_early_ends_its_run_then(tmp_path):
    """Diverged (epoch 1) and early-stopped (epoch 2) jobs end their runs while the rest of the group trains on."""
    from conftest import make_tiny_set
    make_tiny_set(tmp_path / "slowdata", n_train=16000, n_test=500)  # ~1 s an epoch: room between the ends
    result = run_cli("-m", "hydra/launcher=fused", "hydra.launcher.n_jobs=1", *tiny_overrides(tmp_path / "slowdata"),
                     "data.batch_size=16", "train.epochs=4", "optimizer=sgd", "optimizer.lr=0.1,1e12",
                     "train.early_stopping.patience=1", "train.early_stopping.min_delta=0,100", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "2 of 4 jobs failed" in out and "Launching 4 jobs as 1 fused group" in out
    assert "Early stopping: valid_loss has not improved by more than min_delta=100 for 1 epoch (best" in out, out
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = {}
    for r in store_runs(tmp_path):
        if "mlflow.parentRunId" in r["tags"]:
            o = dict(t.split("=", 1) for t in r["name"].split())
            runs[float(o["optimizer.lr"]), float(o["train.early_stopping.min_delta"])] = c.get_run(r["run_uuid"])
    longest, stopped = runs[0.1, 0.0], runs[0.1, 100.0]
    diverged = [runs[1e12, 0.0], runs[1e12, 100.0]]
    assert longest.data.metrics["epochs_run"] == 4 and stopped.data.metrics["epochs_run"] == 2
    epoch_done = {m.step: m.timestamp for m in c.get_metric_history(longest.info.run_id, "valid_loss")}
    assert all(r.info.status == "FAILED" and r.info.end_time <= epoch_done[2] for r in diverged)
    assert stopped.info.status == "FINISHED" and stopped.info.end_time <= epoch_done[3]


@pytest.mark.e2e
def test_a_bad_value_fails_its_own_job_and_bad_launcher_options_are_refused(tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=fused", "hydra.launcher.n_jobs=2", *tiny_overrides(tiny_root),
                     "train.epochs=1", "data.batch_size=64,0", cwd=tmp_path)  # planning and balancing see batch 0
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "1 of 2 jobs failed" in out and "data.batch_size=0 is invalid: it must be a positive integer" in out
    children = {r["name"]: r["status"] for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]}
    assert sorted(children.values()) == ["FAILED", "FINISHED"]
    assert next(s for name, s in children.items() if name.endswith("data.batch_size=0")) == "FAILED"
    for option in ("max_group=0", "n_jobs=-1"):  # not silently "no limit" / "one process"
        refused = run_cli("-m", f"hydra.launcher.{option}", *tiny_overrides(tiny_root), "train.epochs=1",
                          "optimizer.lr=0.1,0.01", cwd=tmp_path)
        assert refused.returncode == 1
        assert f"hydra.launcher.{option} is invalid: it must be a positive number of" in refused.stderr


@pytest.mark.e2e
def test_sigint_during_a_fused_sweep_then_skip_finished_completes_it(tmp_path):
    from conftest import make_tiny_set
    from test_reliability import interrupt_after, start_cli
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    args = ["hydra/launcher=fused", "hydra.launcher.n_jobs=1", *tiny_overrides(root), "data.batch_size=16",
            "train.epochs=2", "optimizer.lr=0.001,0.003"]  # one group of two (n_jobs=2 would give each its process)
    rc, out = interrupt_after(start_cli("-m", *args, cwd=tmp_path), "Epoch 1/2", signal.SIGINT)
    assert rc == 130, out[-3000:]
    runs = store_runs(tmp_path)
    assert sorted(r["status"] for r in runs) == ["KILLED"] * 3  # both jobs, each with its checkpoint, and the parent
    again = run_cli("-m", *args, "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stdout.count("Resuming after epoch 1 of 2") == 2
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 2 and {r["status"] for r in children} == {"FINISHED"}
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for r in children:
        assert [m.step for m in c.get_metric_history(r["run_uuid"], "valid_loss")] == [1, 2]


@pytest.mark.e2e
def test_groups_train_at_once_in_worker_processes(tmp_path, tiny_root):
    """hydra.launcher.n_jobs=2: the design card's two groups train at the same time, each in its own process with
    its share of the cores, every job as complete as when groups take turns."""
    result = run_cli("-m", "hydra/launcher=fused", "hydra.launcher.n_jobs=2", *tiny_overrides(tiny_root),
                     "train.epochs=2", "optimizer=sgd,adam", "data.batch_size=16,100", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Launching 4 jobs as 2 fused group(s), 2 at a time (a process each)" in out
    assert_job_lines_as_hydra_logs_them(result.stdout, epochs=2, jobs=4, groups=2)
    assert out.count("Test (best checkpoint") == 4 and sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    children = [c.get_run(r["run_uuid"]) for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    by_group = {g: [r for r in children if r.data.tags["fmnist.group"] == g] for g in ("1", "2")}
    assert [len(v) for v in by_group.values()] == [2, 2]
    a, b = by_group["1"][0].info, by_group["2"][0].info
    assert a.start_time < b.end_time and b.start_time < a.end_time  # they trained at the same time
    cores = len(__import__("os").sched_getaffinity(0))
    assert {r.data.tags["fmnist.threads"] for r in children} == {str(max(1, cores // 2))}
    for r in children:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "valid_loss")] == [1, 2]
        assert {"best_model.pt", "config.yaml"} <= {x.path for x in c.list_artifacts(r.info.run_id)}


@pytest.mark.e2e
def test_workers_sharing_a_terminal_show_one_sweep_bar_under_their_log_lines(tmp_path):
    """Each worker drew its own batch bar, which the other worker's log lines overwrote (stale bars, lines starting
    mid-line). Now the launcher draws one bar for the sweep and prints its workers' lines above it."""
    from conftest import make_tiny_set, run_in_terminal
    make_tiny_set(tmp_path / "slowdata", n_train=16000, n_test=500)  # epochs long enough for bars to be drawn
    code, screen = run_in_terminal("-m", "hydra.launcher.n_jobs=2", *tiny_overrides(tmp_path / "slowdata"),
                                   "train.progress=auto", "train.epochs=2", "optimizer=sgd,adam",
                                   "data.batch_size=16,100", cwd=tmp_path)
    assert code == 0, "\n".join(screen[-30:])
    log_end = next(i for i, line in enumerate(screen) if line.startswith("| best"))
    lines = [line for line in screen[:log_end] if line]
    assert lines[-1].startswith("sweep: 100%") and "8/8" in lines[-1], "\n".join(lines[-5:])  # job-epochs
    assert all(line.startswith("[20") for line in lines[:-1]), "\n".join(lines)  # whole log lines, no bar left
    assert sum("Epoch 2/2" in line for line in lines) == 4
    assert_job_lines_as_hydra_logs_them("\n".join(lines), epochs=2, jobs=4, groups=2)


@pytest.mark.e2e
def test_a_big_group_spreads_its_writes_over_several_tracking_processes(tmp_path, tiny_root):
    """tracking.processes=3 (on a GPU host with spare cores the default for a big group): one group of 5 jobs, its
    runs, plots and TensorBoard files as complete as with one tracking process."""
    result = run_cli("-m", "hydra/launcher=fused", "hydra.launcher.n_jobs=1", "tracking.processes=3",
                     *tiny_overrides(tiny_root), "train.epochs=2", "optimizer.lr=0.001,0.002,0.003,0.004,0.005",
                     cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Tracking: the writes of 5 jobs spread over 3 tracking processes" in out
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    children = [c.get_run(r["run_uuid"]) for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 5 and {r.info.status for r in children} == {"FINISHED"}
    assert all("tracking.processes" not in r.info.run_name for r in children)  # how, not what: not in the name
    for r in children:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "valid_loss")] == [1, 2]
        assert {"plots/learning_curves.png", "plots/confusion_matrix.png", "plots/test_samples.png"} == {
            a.path for a in c.list_artifacts(r.info.run_id, "plots")}
        assert list((tmp_path / r.data.tags["fmnist.job_dir"]).glob("events.out.tfevents.*"))


@pytest.mark.e2e
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_worker_then_skip_finished_completes_the_sweep(tmp_path, sig, code):
    from conftest import make_tiny_set
    from test_reliability import interrupt_after, start_cli
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    args = ["hydra/launcher=fused", "hydra.launcher.n_jobs=2", *tiny_overrides(root), "data.batch_size=16",
            "train.epochs=2", "optimizer.lr=0.001,0.003", "model.hidden=[128,64],[64,32]"]
    rc, out = interrupt_after(start_cli("-m", *args, cwd=tmp_path), "Epoch 1/2", sig, jobs=4, cwd=tmp_path)
    assert rc == code, out[-3000:]
    assert "2 at a time" in out and "Epoch 2/2" not in out
    assert out.count(f"Sweep stopped by {sig.name}") == 1 and "sweep.skip_finished=true" in out
    assert "Resume with:" not in out  # one line for the sweep, not a single-run command per job
    runs = store_runs(tmp_path)
    assert sorted(r["status"] for r in runs) == ["KILLED"] * 5, out[-3000:]  # 4 jobs in 2 workers, and the parent
    again = run_cli("-m", *args, "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 4 and {r["status"] for r in children} == {"FINISHED"}
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for r in children:
        assert [m.step for m in c.get_metric_history(r["run_uuid"], "valid_loss")] == [1, 2]


@pytest.mark.e2e
def test_a_worker_killed_outright_loses_only_its_own_jobs(tmp_path):
    """A worker process SIGKILLed (the OOM killer) mid-sweep: its jobs end KILLED with a line saying how to finish
    the sweep; the other worker trains on and the groups not yet started still run (the dead one's slot in a fresh
    worker); the sweep's end counts each job once and exits 1; nothing stays RUNNING; skip_finished completes it."""
    import os
    from pathlib import Path

    from conftest import make_tiny_set
    from hydra_plugins.fmnist_launchers._workers import LOST
    from test_reliability import start_cli
    root = tmp_path / "slowdata"
    make_tiny_set(root, n_train=16000, n_test=500)
    args = ["hydra/launcher=fused", "hydra.launcher.n_jobs=2", *tiny_overrides(root), "data.batch_size=16",
            "train.epochs=2", "optimizer=sgd,adam", "model.hidden=[128,64],[64,32],[32,16]"]
    proc = start_cli("-m", *args, cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Epoch 1/2" in line:
            break
    wait_for_children(tmp_path, 4, proc)  # both workers' groups (two jobs each) started, not only the first's
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _parent(p) == proc.pid and b"spawn_main" in (p / "cmdline").read_bytes()]
    assert len(workers) == 2, "".join(seen)[-2000:]
    os.kill(workers[0], signal.SIGKILL)
    out = "".join(seen) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "Launching 6 jobs as 4 fused group(s), 2 at a time" in out  # groups 3 and 4 wait for a free worker
    assert "its worker process died" in out and "sweep.skip_finished=true" in out
    assert "SIGTERM" not in out and "Resume with:" not in out, out[-3000:]  # no signal reached the other worker
    assert "2 of 6 jobs failed" in out, out[-3000:]
    runs = store_runs(tmp_path)
    assert "RUNNING" not in {r["status"] for r in runs}, runs
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    killed = [r for r in children if r["status"] == "KILLED"]
    assert len(children) == 6 and len(killed) == 2, children
    assert {r["tags"]["fmnist.group"] for r in killed} in ({"1"}, {"2"})  # one of the two groups started first
    assert {r["tags"]["error"] for r in killed} == {LOST}
    assert {r["status"] for r in children if r not in killed} == {"FINISHED"}  # the other 3 groups, 4 jobs
    again = run_cli("-m", *args, "sweep.skip_finished=true", cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    children = [r for r in store_runs(tmp_path) if "mlflow.parentRunId" in r["tags"]]
    assert {r["status"] for r in children} == {"FINISHED"} and len({r["name"] for r in children}) == 6


def _parent(proc_dir) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# Hydra's own expectations of a launcher: its apps are not fmnist_exp jobs, so they run one by one.
@pytest.fixture
def fresh_hydra_version(hydra_restore_singletons):
    """As in Hydra's own plugin test runs (a process of their own): no version_base set by an earlier test's
    compose, so Hydra's test apps get the defaults they were written for (e.g. chdir into the job dir)."""
    from hydra.version import _UNSPECIFIED_, VersionBase
    VersionBase.instance().version_base = _UNSPECIFIED_


@pytest.mark.usefixtures("fresh_hydra_version")
@pytest.mark.parametrize("launcher_name, overrides", [("fused", [])])
class TestFusedLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags",
                         [({}, ["-m", "hydra/job_logging=hydra_debug", "hydra/job_logging=disabled",
                                "hydra/launcher=fused"])])
@pytest.mark.e2e
class TestFusedLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.e2e
def test_fused_is_the_launcher_of_a_plain_sweep(tmp_path, tiny_root):
    result = run_cli("-m", *tiny_overrides(tiny_root), "train.epochs=1", "optimizer.lr=0.01,0.001", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "Launching 2 jobs as " in result.stdout + result.stderr  # 1 group, or 2 at once on 2+ cores
    basic = run_cli("-m", "hydra/launcher=basic", *tiny_overrides(tiny_root), "train.epochs=1",
                    "optimizer.lr=0.01,0.001", cwd=tmp_path)
    assert basic.returncode == 0 and "fused group" not in basic.stdout + basic.stderr
