"""A private single-node Slurm for tests: munged (when none answers), slurmctld and slurmd in the foreground, with a
slurm.conf of its own in a temporary folder and free ports; stopped again by their pids.

Needs root (slurmd starts the jobs) and Debian's `slurmctld slurmd slurm-client munge` packages (.ci/run installs
them). No systemd: each daemon is a child process of the test session.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


class Unavailable(RuntimeError):
    """Slurm cannot be started here (packages missing, not root)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024 * 9 // 10
    return 1024


class LocalSlurm:
    """`start()`, then submit with `env` (SLURM_CONF set); `stop()` cancels jobs and ends the daemons."""

    def __init__(self, root: Path, partition: str = "ci"):
        self.root, self.partition = Path(root), partition
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]
        self.cpus = _cpus()
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------------------------------------- start
    def start(self) -> "LocalSlurm":
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged", "munge") if not _which(b)]
        if missing:
            raise Unavailable(f"Slurm/munge programs missing: {', '.join(missing)} (apt-get install slurmctld slurmd "
                              "slurm-client munge)")
        if os.geteuid() != 0:
            raise Unavailable("starting slurmd needs root")
        try:
            self._start_munge()
            self._write_conf()
            for name in ("slurmctld", "slurmd"):
                log = open(self.root / f"{name}.out", "wb")
                self.procs[name] = subprocess.Popen([_which(name), "-D", "-f", str(self.conf)], stdout=log,
                                                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            self._wait_idle(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _munge_works(self) -> bool:
        try:
            cred = subprocess.run([_which("munge"), "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run([_which("unmunge")], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # a munged already answers: use it, leave it running
        user = pwd.getpwnam("munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_which("mungekey") or "mungekey", "--create", "--keyfile", str(key)], check=True)
            os.chown(key, user.pw_uid, user.pw_gid)
            key.chmod(0o600)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        os.chown(run, user.pw_uid, user.pw_gid)
        run.chmod(0o755)
        log = open(self.root / "munged.out", "wb")
        self.procs["munged"] = subprocess.Popen([_which("munged"), "--foreground", "--force"], stdout=log,
                                                stderr=subprocess.STDOUT, user=user.pw_uid, group=user.pw_gid,
                                                extra_groups=[], start_new_session=True)
        deadline = time.monotonic() + 15
        while not self._munge_works():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {(self.root / 'munged.out').read_text()[-2000:]}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        (self.root / "state").mkdir(exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=flashkm-ci",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MinJobAge=30",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            run = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
            state = run.stdout.strip()
            if run.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm node is not idle after {timeout:g} s (state {state!r}):\n{self.logs()}")

    # ---------------------------------------------------------------------------------------------- use
    def run(self, *cmd, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T").stdout
        return [line for line in out.splitlines() if line.strip()]

    def wait_no_jobs(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while self.jobs():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)
        return True

    def wait_job(self, job_id: str, timeout: float = 300) -> tuple[str, str]:
        """Poll (every 0.5 s, quicker than `sbatch --wait`) until the job ends: (state, 'exit:signal')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = dict(f.split("=", 1) for f in self.run("scontrol", "-o", "show", "job", job_id).stdout.split()
                          if "=" in f)
            state = fields.get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state, fields.get("ExitCode", "")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still running after {timeout:g} s")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            for job in self.jobs():
                self.run("scancel", job.split()[0])
            self.wait_no_jobs(timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
