"""Sweep review: a table of a sweep's jobs read from the MLflow store (the source of truth)."""
from __future__ import annotations

import pandas as pd

from fmnist_exp import tracking


def sweep_table(uri: str, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per child run: its overrides, status, best valid accuracy and test accuracy."""
    rows = []
    for r in tracking.child_runs(uri, experiment_id, parent_run_id):
        m, t = r.data.metrics, r.data.tags
        rows.append({"run": t.get("fmnist.overrides", r.info.run_name), "status": r.info.status,
                     "best_valid_acc": m.get("best_valid_acc"), "test_acc": m.get("test_acc"),
                     "error": t.get("error", "")})
    return pd.DataFrame(rows, columns=["run", "status", "best_valid_acc", "test_acc", "error"])


def format_table(table: pd.DataFrame) -> str:
    """The table as the terminal shows it: a GitHub-style markdown grid, best test accuracy first."""
    if table.empty:
        return "(no jobs recorded)"
    shown = table.sort_values("test_acc", ascending=False, na_position="last")
    if not shown["error"].astype(bool).any():
        shown = shown.drop(columns="error")
    return shown.to_markdown(index=False, floatfmt=".4f")
