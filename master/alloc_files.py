"""What an allocation queue's jobs read: its CURVE keypair, the slave config and the setup script (all 0600/0700).

The job script the scheduler stores holds only paths to these files, never a key: compute nodes read them from
the master's state dir (a shared file system on a cluster), as the user who owns them.
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from master.batch import QueueSpec
from ticketfarm import keys
from ticketfarm.config import to_toml


@dataclass
class QueuePaths:
    slave_config: Path
    setup: Path
    directory: Path


@dataclass
class SlaveSettings:
    """The slave config of an allocation queue (written as slave.toml; fields as in slave/config.py)."""

    master: str
    master_key: str
    secret_key: str
    insecure: bool
    slots: int
    work_root: str
    heartbeat_interval: float
    liveness: int
    reconnect_min: float
    reconnect_max: float
    idle_exit: float
    handback: float


class QueueFiles:
    """Writes and removes the files under <state>/alloc/<queue>/ and the queue's key under keys/alloc/."""

    def __init__(self, state_dir: Path, endpoint: str, insecure: bool, heartbeat: float, liveness: int):
        self.state_dir = Path(state_dir).resolve()
        self.endpoint = endpoint
        self.insecure = insecure
        self.heartbeat = heartbeat
        self.liveness = liveness

    def directory(self, name: str) -> Path:
        return self.state_dir / "alloc" / name

    def prepare(self, spec: QueueSpec) -> QueuePaths:
        """The queue's files, (re)written from its settings; its keypair is made once and authorised."""
        base = self.directory(spec.name)
        (base / "jobs").mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        key_name = f"alloc-{spec.name}"
        secret = ""
        if not self.insecure:
            public, secret_path = keys.ensure_keypair(keys.keys_dir(self.state_dir) / "alloc", key_name,
                                                      {"slave-names": "*"})
            keys.authorize(self.state_dir, keys.SLAVE, key_name, public, replace=False)
            secret = str(secret_path)
        settings = SlaveSettings(
            master=spec.master_address or self.reachable_endpoint(),
            master_key=str(keys.keys_dir(self.state_dir) / "master.key"), secret_key=secret, insecure=self.insecure,
            slots=spec.slots_per_slave, work_root=str(base / "work"), heartbeat_interval=self.heartbeat,
            liveness=self.liveness, reconnect_min=self.heartbeat, reconnect_max=max(4 * self.heartbeat, 1.0),
            idle_exit=spec.idle_timeout, handback=spec.handback)
        paths = QueuePaths(base / "slave.toml", base / "setup.sh", base / "jobs")
        _write_private(paths.slave_config, f"# Written by the master for allocation queue {spec.name}.\n\n"
                                           + to_toml(settings), 0o600)
        # The end of the allocation, from the job's own start (sourced by the job before the slave starts).
        _write_private(paths.setup, f"export TICKETFARM_ALLOC_END=$(( $(date +%s) + {int(spec.walltime)} ))\n"
                                    f"{spec.setup}\n", 0o700)
        return paths

    def reachable_endpoint(self) -> str:
        """The bound endpoint with a wildcard host replaced by this machine's name."""
        scheme, _, rest = self.endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        if host in ("*", "0.0.0.0", "[::]"):
            host = socket.getfqdn()
        return f"{scheme}://{host}:{port}"

    def remove(self, name: str) -> None:
        keys.revoke(self.state_dir, keys.SLAVE, f"alloc-{name}")
        shutil.rmtree(self.directory(name), ignore_errors=True)


def _write_private(path: Path, text: str, mode: int) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    tmp.replace(path)
