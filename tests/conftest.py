"""Fixtures that start real masters and slaves as processes (fast heartbeats) and always clean them up."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from ticketfarm import keys
from ticketfarm.client.control import control
from ticketfarm.errors import MasterUnreachable
from ticketfarm.spec import load_spec

HEARTBEAT = 0.2
LIVENESS = 5

# Processes started by the tests import this checkout, wherever the package happens to be installed from.
REPO = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(directory: Path, text: str, name: str = "spec.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def dropped_messages(log: str) -> int:
    """`dropped_message` warnings in a master log: those logged, and those counted in the peer log's summaries."""
    summed = sum(int(n) for n in re.findall(r"peer_messages_suppressed.* dropped_message=(\d+)", log))
    return log.count("dropped_message ") + summed


def slave_key_args(state: Path, insecure: bool = False, name: str = "slave") -> list[str]:
    """Command-line options giving a slave the master's public key and a secret key of STATE/keys."""
    if insecure:
        return ["--insecure"]
    kdir = keys.keys_dir(state)
    secret = kdir / f"{name}.key_secret" if name == "slave" else kdir / "slaves" / f"{name}.key_secret"
    return ["--master-key", str(kdir / "master.key"), "--secret-key", str(secret)]


@dataclass
class MasterProcess:
    """`ticketfarm master` in a child process, with its own state dir, port and CURVE keys (unless insecure)."""

    state: Path
    endpoint: str
    extra_config: str = ""
    insecure: bool = False
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.log = self.state / "master.log"
        if self.insecure:
            self.extra_config += "\ninsecure = true\n"
        else:
            keys.init_state_keys(self.state)  # what `ticketfarm init` does; slaves start with these keys
        (self.state / "master.toml").write_text(
            f'bind = "{self.endpoint}"\nheartbeat_interval = {HEARTBEAT}\nliveness = {LIVENESS}\n'
            f'deadline_grace = 3.0\ndurability = "normal"\n{self.extra_config}'
        )

    def start(self) -> "MasterProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(self.state),
                                          "--log-level", "info", "master"], stdout=log, stderr=log)
        wait_for(self.alive, 10, "master to answer")
        return self

    @property
    def keys(self) -> keys.ClientKeys | None:
        """The control client's keys (None when insecure)."""
        return None if self.insecure else keys.ClientKeys.from_dir(keys.keys_dir(self.state))

    def slave_keys(self, name: str = "slave") -> keys.ClientKeys:
        """A slave's keys (the shared slave key, or keys/slaves/NAME) for hand-made DEALER sockets."""
        kdir = keys.keys_dir(self.state)
        return keys.ClientKeys.load(kdir / "master.key", kdir / f"{name}.key_secret" if name == "slave"
                                    else kdir / "slaves" / f"{name}.key_secret")

    def control(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        return control(self.endpoint, op, timeout=timeout, keys=self.keys, **fields)

    def alive(self) -> bool:
        try:
            return bool(self.control("ping", timeout=0.5).get("ok"))
        except MasterUnreachable:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def submit(self, spec_path: Path) -> str:
        reply = self.control("submit", **load_spec(spec_path).submit_fields())
        assert reply["ok"], reply
        return reply["state"]

    def sweep_status(self, name: str) -> dict[str, Any] | None:
        try:
            reply = self.control("status", timeout=1.0)
        except MasterUnreachable:
            return None
        return next((s for s in reply["sweeps"] if s["name"] == name), None)

    def wait_finished(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (s := self.sweep_status(name)) and s["state"] == "finished" and s,
                        timeout, f"sweep {name} to finish")


@dataclass
class SlaveProcess:
    name: str
    proc: subprocess.Popen[bytes]
    work_root: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def master(tmp_path: Path):
    """A running master process; killed at the end of the test whatever happened."""
    m = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{free_port()}").start()
    yield m
    m.stop()


@pytest.fixture
def start_slave(tmp_path: Path, master: MasterProcess):
    """start_slave(name, slots) -> a slave process connected to `master`; all stopped at the end."""
    slaves: list[SlaveProcess] = []

    def start(name: str, slots: int = 1, *extra: str) -> SlaveProcess:
        work = tmp_path / "work" / name
        log = open(tmp_path / f"slave-{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "slave", "--master", master.endpoint, "--name", name,
                                 "--slots", str(slots), "--work-root", str(work), "--heartbeat", str(HEARTBEAT),
                                 "--log-level", "info", *slave_key_args(master.state, master.insecure), *extra],
                                stdout=log, stderr=log)
        log.close()
        slave = SlaveProcess(name, proc, work)
        slaves.append(slave)
        return slave

    yield start
    for s in slaves:
        s.stop()


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ticketfarm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
