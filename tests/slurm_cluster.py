"""A real one-node SLURM cluster on this machine, for tests (no systemd, no accounting database).

    with slurm_cluster() as cluster:          # SlurmUnavailable: not installable here; SlurmStartError: no start
        subprocess.run(["sbatch", "--wrap", "true"], env=cli_env(cluster.env))

Everything lives in a fresh temp dir (munge key and socket, slurm.conf, state, spool, logs, pid files) and the
daemons listen on free ports, so a second cluster (or a munged/slurmctld the system already runs) does not
collide with this one. Jobs see the cluster through SLURM_CONF, which sbatch passes on (its default --export=ALL).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
PACKAGES = ("slurm-wlm", "munge")
PREFIX = "fmnist-slurm-"
REGISTRY = Path(tempfile.gettempdir()) / "fmnist-slurm-daemons"  # pids of daemons started here, for a later cleanup


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (no root or apt-get, or apt-get failed): skip."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but its daemons would not start or the node never became idle: a real failure."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge when they are missing and we may (root, apt-get); else raise."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and cannot be installed here "
                               f"(needs root and apt-get: apt-get install -y {' '.join(PACKAGES)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    log = ""
    for step in (install, ["apt-get", "update", "-q"], install):
        r = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
        log += r.stdout[-2000:] + r.stderr[-2000:]
        if step is install and r.returncode == 0 and not missing_binaries():
            return
    raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)} with apt-get "
                           f"({', '.join(missing_binaries()) or 'nothing'} still missing):\n{log[-3000:]}")


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _kill(pid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_users_of(dirs) -> None:
    """SIGKILL every process (job, slurmstepd) whose environment points SLURM_CONF into one of these cluster dirs:
    what is left of a cluster's jobs once its daemons are gone."""
    marks = [f"SLURM_CONF={d}/".encode() for d in dirs]
    if not marks:
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(m in environ for m in marks):
            _kill(int(entry.name), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _registry_lock():
    with open(f"{REGISTRY}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _reap_stale() -> None:
    """Stop daemons that an earlier cluster left behind when its test process was killed: only pids recorded in
    REGISTRY whose owning process is gone and whose command line still names one of our temp dirs (a cluster
    another test session is using right now is left alone)."""
    with _registry_lock():
        entries = [line.split() for line in REGISTRY.read_text().splitlines()] if REGISTRY.exists() else []
    entries = [(int(e[0]), int(e[1])) for e in entries if len(e) == 2 and e[0].isdigit() and e[1].isdigit()]
    stale = [p for p, owner in entries if not _alive(owner) and PREFIX in _cmdline(p)]
    dirs = {Path(d) for p in stale for d in re.findall(rf"/\S*?{PREFIX}[^/\s]+", _cmdline(p))}
    for p in stale:
        _kill(p)
    deadline = time.time() + 10
    while time.time() < deadline and any(PREFIX in _cmdline(p) for p in stale):
        time.sleep(0.2)
    for p in stale:
        if PREFIX in _cmdline(p):
            _kill(p, signal.SIGKILL)
    _unregister(p for p, owner in entries if not _alive(owner) or p in stale)
    _kill_users_of(dirs)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _register(pid: int) -> None:
    with _registry_lock(), REGISTRY.open("a") as f:
        f.write(f"{pid} {os.getpid()}\n")


def _unregister(pids) -> None:
    drop = {str(p) for p in pids}
    with _registry_lock():
        if not REGISTRY.exists():
            return
        rest = [line for line in REGISTRY.read_text().splitlines() if line.split()[:1] and line.split()[0] not in drop]
        if rest:
            REGISTRY.write_text("".join(f"{line}\n" for line in rest))
        else:
            REGISTRY.unlink(missing_ok=True)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    mem_mb: int
    procs: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        """What a process (and, through sbatch, its jobs) needs to use this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, squeue, sbatch, scancel, ...) against this cluster."""
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=self.root,
                           env={**os.environ, **self.env})
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}\n{self.log_tails()}")
        return r

    def state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10).stdout.strip()
        except subprocess.TimeoutExpired:
            return "sinfo timed out"

    def jobs(self) -> list[str]:
        """`squeue` lines: 'JOBID STATE REASON' for every job still known to the controller."""
        r = self.run("squeue", "-h", "-o", "%i %T %r", check=False, timeout=10)
        return r.stdout.splitlines()

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out)

    def start_requeued_now(self) -> list[str]:
        """SLURM holds a requeued job about two minutes (reason BeginTime) before it may start again; let such jobs
        start now, as a patient user would see them start later. Returns their ids."""
        ids = [line.split()[0] for line in self.jobs() if line.split()[1:3] == ["PENDING", "BeginTime"]]
        for job_id in ids:
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False, timeout=10)
        return ids

    def cancel_all(self, wait: float = 20) -> None:
        if not self.jobs():
            return
        self.run("scancel", "--user", str(os.geteuid()), check=False, timeout=10)
        deadline = time.time() + wait
        while time.time() < deadline and self.jobs():
            time.sleep(0.5)


def _write_conf(root: Path, node: str, cpus: int, mem_mb: int) -> Path:
    conf = root / "slurm.conf"
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf.write_text(f"""\
ClusterName=fmnisttest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PlugStackConfig={root / 'plugstack.conf'}
ReturnToService=2
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=30
SchedulerParameters=sched_interval=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    (root / "plugstack.conf").write_text("")
    return conf


@contextlib.contextmanager
def slurm_cluster(start_timeout: float = 60):
    """Start munged, slurmctld and slurmd on this machine (as root), wait until the node is idle, yield a
    SlurmCluster; afterwards cancel its jobs and stop the daemons. Raises SlurmUnavailable when SLURM is missing and
    cannot be installed, SlurmStartError when it is installed but does not come up."""
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting a SLURM cluster for the tests needs root (slurmd runs jobs as any user)")
    _reap_stale()
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    root.chmod(0o755)  # munged wants its socket's directory traversable by everyone
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = max(256, int(_mem_mb() * 0.9))
    conf = _write_conf(root, node, cpus, mem_mb)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, mem_mb=mem_mb)
    daemon_env = {**os.environ, "SLURM_CONF": str(conf)}
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    def start(name: str, cmd: list[str]) -> None:
        with (root / f"{name}.out").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=daemon_env, cwd=root, start_new_session=True)
        cluster.procs[name] = proc
        _register(proc.pid)

    try:
        start("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                         f"--key-file={key}", f"--pid-file={root / 'munged.pid'}",
                         f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}"])
        _wait(lambda: (root / "munge.socket").exists(), 15, "munged did not create its socket", cluster)
        # -D: stay in the foreground (we own the process); -i: ignore state files (a fresh cluster anyway)
        start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)])
        start("slurmd", [_sbin("slurmd"), "-D", "-f", str(conf), "-N", node])
        _wait(lambda: cluster.state() == "idle", start_timeout, "the SLURM node did not become idle", cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
                cluster.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = cluster.procs.get(name)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _unregister(p.pid for p in cluster.procs.values())
        _kill_users_of([root])
        if not os.environ.get("FMNIST_KEEP_SLURM_DIR"):
            shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while not ready():
        dead = [f"{n} exited with {p.returncode}" for n, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.time() > deadline:
            outs = "\n".join(f"--- {cluster.root / (n + '.out')} ---\n"
                             + (cluster.root / f"{n}.out").read_text(errors="replace")[-1500:]
                             for n in cluster.procs)
            raise SlurmStartError(f"{what} within {timeout:.0f}s ({'; '.join(dead) or 'state: ' + cluster.state()})"
                                   f"\n{cluster.log_tails()}\n{outs}")
        time.sleep(0.5)
