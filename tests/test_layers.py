"""The house's layers, checked over the import graph (every import, module-level or inside a function).

From the top: the entry point; the sweep's start and end (callbacks, report); the app APIs the plugins call
(search for the search sweeper, launching for the launchers); grouping jobs (fusion); a job's lifecycle (job); the training loop (train) and its step (step,
stacked); stopping; then what everything uses (models, data, plots, config, the machine, the store, the tracking
process). A
module imports only from its own layer or below, never in a circle; only the store and the tracking modules import
MLflow; the app never imports the plugins, and a plugin imports nothing of the app but its API.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "fmnist_exp"
API = {"hydra_plugins.fmnist_launchers": f"{APP}.launching",  # all a plugin may import of the app
       "hydra_plugins.fmnist_search": f"{APP}.search"}
LAYERS = [  # top first
    {"__main__"},
    {"callbacks", "report"},
    {"search"},
    {"launching"},
    {"fusion"},
    {"job"},
    {"train"},
    {"step"},
    {"stacked"},
    {"stopping"},
    {"models", "data", "plots", "config", "machine", "tracking", "tracking_process", "store", "trials", "__init__"},
]
RANK = {f"{APP}.{name}": rank for rank, layer in enumerate(LAYERS) for name in layer}
MLFLOW_MODULES = {f"{APP}.store", f"{APP}.tracking", f"{APP}.tracking_process"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (`from . import x` resolved; `from pkg import name` gives pkg.name when
    that is a module of ours, else pkg)."""
    package = module_name(path).rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else node.module
            if node.level and node.module:
                base = f"{package}.{node.module}"
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in OURS else base)
    return out


OURS = {module_name(p) for d in (APP, *(p.replace(".", "/") for p in API)) for p in (ROOT / d).glob("*.py")}
GRAPH = {name: imports(ROOT / (name.replace(".", "/") + ".py")) for name in OURS}


def ours(targets: set[str]) -> set[str]:
    return {t for t in targets if t in OURS}


def test_every_app_module_has_a_layer():
    assert {m for m in OURS if m.startswith(f"{APP}.")} == set(RANK)


def test_no_module_imports_a_layer_above_its_own():
    upward = [(m, t) for m in RANK if m in GRAPH for t in ours(GRAPH[m]) if t in RANK and RANK[t] < RANK[m]]
    assert upward == []


def test_no_import_cycles():
    seen, cycles = {}, []

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = "open"
        for t in sorted(ours(GRAPH[m])):
            if seen.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t, stack + [t])
        seen[m] = "done"

    for m in sorted(OURS):
        if m not in seen:
            visit(m, [m])
    assert cycles == []


def test_only_the_store_and_tracking_modules_import_mlflow():
    assert {m for m in OURS if any(t == "mlflow" or t.startswith("mlflow.") for t in GRAPH[m])} <= MLFLOW_MODULES


def test_the_app_never_imports_the_plugin():
    assert [(m, t) for m in RANK if m in GRAPH for t in GRAPH[m] if t.startswith("hydra_plugins")] == []


def test_each_plugin_imports_only_its_api_of_the_app():
    for plugin, api in API.items():
        modules = [m for m in OURS if m.startswith(plugin)]
        assert modules, f"{plugin} not found"
        assert [(m, t) for m in modules for t in GRAPH[m] if t.startswith(APP) and t not in (api, APP)] == []
