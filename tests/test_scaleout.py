"""Jobs in other processes (submitit, as on a SLURM cluster) still land under one parent in one store."""
from __future__ import annotations

from conftest import run_cli, store_runs, tiny_overrides


def test_submitit_local_sweep_has_one_parent(tmp_path, tiny_root):
    result = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *tiny_overrides(tiny_root),
                     "train.epochs=2", "optimizer=sgd,adam", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    runs = store_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 2
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parents[0]["run_uuid"]}
    assert {r["status"] for r in runs} == {"FINISHED"}
    assert sum(line.startswith("| ★") for line in result.stdout.splitlines()) == 1  # the table, in the submitting process
    assert "/.submitit/" not in "".join(c["tags"]["fmnist.job_dir"] for c in children)
