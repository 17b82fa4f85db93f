"""Shared fixtures: the real conf/ through Hydra's compose API, tiny generated IDX files, the CLI in a subprocess
or in this process (`app`).

Tiers (pyproject.toml's markers): a test unmarked is in the fast tier that `pytest` alone runs; one that runs a whole
command that trains, or starts the CLI at all, is marked `e2e` (cli_env fails an unmarked one); one on the SLURM
cluster or a real MLflow server gets `cluster` or `server` from its fixture.
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

# torch's OpenMP threads spin between parallel regions while they wait for work (libgomp's default): where other
# processes want the cores too (the run's tracking process, a sweep's other workers, a second xdist worker, another
# user), the spinning threads take them, and an epoch of the tests' slow data took 21 s instead of 1.4 s (2-core VM,
# 2026-12-07). Waiting passively changes no result (only how idle threads wait). Set before torch is imported here;
# the commands the tests start inherit it (cli_env copies os.environ), as do SLURM jobs (sbatch --export=ALL).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")


def compose_cfg(*overrides: str, hydra: bool = False):
    """The config a user gets for these overrides, composed from the real conf/ (with the hydra node if asked)."""
    from fmnist_exp import config
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def vary(cfg, *overrides: str):
    """A copy of a composed config with plain `key=value` overrides set (what composing them gives, without Hydra's
    ~0.1 s per config: for tests that plan dozens of jobs)."""
    import yaml
    from omegaconf import OmegaConf
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_tiny_set(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, seed: int = 0) -> dict:
    """Four small IDX files whose images carry their class (learnable), as Fashion-MNIST lays them out."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y: 4 + 2 * y, 4:24] = 250
        ext = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images, 0x0803)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels, 0x0801)
        out[split] = (images, labels)
    return out


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    root = tmp_path / "data"
    make_tiny_set(root)
    return root


def tiny_overrides(root: Path) -> list[str]:
    """Point a run at tiny data only (no system copy, no download) with a small valid split."""
    return [f"data.root={root}", f"data.system_dir={root / 'none'}", "data.download=false",
            "data.valid_size=100", "train.progress=off"]


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The Debian copy of Fashion-MNIST; required (not skipped) in CI, where .ci/run installs it."""
    if not (REAL_DATA / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_DATA} is missing: .ci/run must 'apt-get install -y dataset-fashion-mnist'")
        pytest.skip("real Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    return REAL_DATA


TIERS = ("e2e", "server", "cluster", "slow")  # every tier but the fast one, which `pytest` alone runs
FIXTURE_TIERS = {"slurm": "cluster", "server_uri": "server"}  # a fixture that puts its tests in a tier
_running: dict = {}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, tier in FIXTURE_TIERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(tier)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running["item"] = item  # before its fixtures: a module-scoped one that runs the CLI is checked too


def cli_env(extra: dict | None = None) -> dict:
    """The environment of a command run the way a user runs it, importing this checkout's code (the one under
    test), not whatever fmnist_exp is installed. Only a test in a tier other than the fast one may start one."""
    item = _running.get("item")
    if item is not None and not any(item.get_closest_marker(t) for t in TIERS):
        pytest.fail(f"{item.nodeid} starts the CLI in a subprocess but is in the fast tier: mark it "
                    f"@pytest.mark.e2e, or run the code in-process", pytrace=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fmnist_exp ARGS` in `cwd`, as a user types it."""
    return subprocess.run([sys.executable, "-m", "fmnist_exp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env))


@pytest.fixture
def app(capfd, monkeypatch):
    """`python -m fmnist_exp ARGS` run in this process, as Hydra's own tests run an app (no interpreter to start):
    `app(*args, cwd=..., env=...)` gives a CompletedProcess with the exit code and what was printed. The process's
    signal handlers, logging and torch threads are as before afterwards (Hydra's plugins stay found: a scan each
    run would cost a second)."""
    import logging
    import signal

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from fmnist_exp.__main__ import STOPPED_STARTING, task

    def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["fmnist_exp", *args])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        root = logging.getLogger()
        logged = (list(root.handlers), root.level)
        threads = torch.get_num_threads()
        GlobalHydra.instance().clear()
        capfd.readouterr()
        code: int | str | None = 0
        try:  # what main() does around task(), less the fast exit
            task()
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:
            print(STOPPED_STARTING, file=sys.stderr)
            code = 130
        finally:
            out, err = capfd.readouterr()
            GlobalHydra.instance().clear()
            for s, h in handlers.items():
                signal.signal(s, h)
            root.handlers[:], root.level = logged
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
            monkeypatch.undo()
        if isinstance(code, str):  # sys.exit("message"), as the interpreter prints it
            err, code = err + code + "\n", 1
        return subprocess.CompletedProcess(["fmnist_exp", *args], code or 0, out, err)
    return run


def run_in_terminal(*args: str, cwd: Path, timeout: float = 600) -> tuple[int, list[str]]:
    """`python -m fmnist_exp ARGS` in a 150x50 pseudo-terminal, as a user sees it: (exit code, the screen's lines
    after it, from a minimal terminal that follows what tqdm writes: text, carriage return, newline, cursor up)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_exp", *args], cwd=cwd, stdin=slave, stdout=slave,
                            stderr=slave, env=cli_env({"COLUMNS": "150"}), close_fds=True)
    os.close(slave)
    raw, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the command and its children are done
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    code = proc.wait(timeout=60)
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw.decode("utf-8", "replace")):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return code, [line.rstrip() for line in lines]


def table_rows(text: str) -> list[list[str]]:
    """The markdown table in `text` (a sweep's output or sweep_table.md), header first, as cells (log lines start
    with '[', table rows with '|')."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|:")]


def store_runs(cwd: Path) -> list[dict]:
    """Every run in ./mlruns/mlflow.db with its status and tags, straight from SQLite."""
    con = sqlite3.connect(cwd / "mlruns" / "mlflow.db")
    try:
        runs = [dict(zip(("run_uuid", "name", "status"), r))
                for r in con.execute("select run_uuid, name, status from runs")]
        for r in runs:
            r["tags"] = dict(con.execute("select key, value from tags where run_uuid=?", (r["run_uuid"],)))
        return runs
    finally:
        con.close()


def wait_for_children(cwd: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> list[dict]:
    """Poll ./mlruns until a sweep's `count` jobs have their runs (or `proc` ends, or `timeout`): a test that acts on
    started jobs waits for them, not for one worker's line (another worker may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (cwd / "mlruns" / "mlflow.db").is_file():
            try:
                children = [r for r in store_runs(cwd) if "mlflow.parentRunId" in r["tags"]]
            except sqlite3.Error:  # the store's tables still being made
                children = []
            if len(children) >= count:
                return children
        time.sleep(0.2)
    state = "ended" if proc.poll() is not None else "still runs"
    pytest.fail(f"{count} jobs did not start within {timeout} s (the sweep {state})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, *extra: str):
    """A real `mlflow server` on a free 127.0.0.1 port; yields its URL and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend_uri, "--workers", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def server_uri(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifacts under tmp_path."""
    store = tmp_path / "server"
    store.mkdir()
    with mlflow_server(f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")) as url:
        yield url


# pytest-xdist 3.8 groups xdist_group-marked tests by renaming item._nodeid, which pytest 9.2 no longer reads
# (Node.nodeid comes from item._id): --dist loadgroup ran as plain load (checked 2026-12-07). These modules share a
# module-scoped fixture (the SLURM cluster, the review sweep), so under `make test` each goes to one worker whole.
SHARED_MODULES = ("tests/test_slurm.py", "tests/test_review.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_MODULES else nodeid
    return ModulesWhole(config, log)
