"""A real single-node Slurm cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd from
Debian's `munge` and `slurm-wlm`, with a config, key, socket and state of their own in a temp
folder (nothing system-wide is touched), stopped after the test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(root: Path, cpus: int) -> str:
    return "\n".join(
        [
            "ClusterName=curatetest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={root}/munge/sock",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError(f"test Slurm cluster: {what} did not come up in {timeout:.0f} s")


@contextmanager
def slurm_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Start the cluster in `root`; yields the environment its clients need (SLURM_CONF)."""
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = root / "munge"
    subprocess.run(
        [
            "munged", "--force", "-S", str(munge / "sock"), f"--key-file={key}",
            f"--log-file={munge / 'log'}", f"--pid-file={munge / 'pid'}",
            f"--seed-file={munge / 'seed'}",
        ],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    pids = [root / "munge" / "pid"]
    try:
        _wait_for(lambda: (munge / "sock").exists(), "munged")
        subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env)
        pids.append(root / "slurmctld.pid")
        subprocess.run(["slurmd", "-N", "localhost", "-f", str(conf)], check=True, env=env)
        pids.append(root / "slurmd.pid")

        def idle() -> bool:
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            )
            return done.returncode == 0 and done.stdout.strip() == "idle"

        _wait_for(idle, "the node")
        yield env
    finally:
        for pid_file in reversed(pids):
            with suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        time.sleep(0.5)


def wait_for_jobs(env: dict[str, str], job_ids: list[str], timeout: float = 300.0) -> None:
    """Until none of `job_ids` is pending or running."""

    def gone() -> bool:
        done = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        return done.returncode == 0 and not done.stdout.strip()

    _wait_for(gone, f"jobs {', '.join(job_ids)} finishing", timeout)
