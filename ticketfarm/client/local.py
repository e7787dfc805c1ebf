"""The embedded default: a master in this process plus N slave processes on this machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from master.config import (
    MasterConfig,
    load_master_config,
    master_config_path,
    write_default_master_config,
)
from master.server import Master
from ticketfarm import keys
from ticketfarm.spec import Sweep


class LocalCluster:
    """A master (in this process) and `n` local slaves (child processes), cleaned up on close()."""

    def __init__(self, state_dir: Path, n: int, slots: int = 1, config: MasterConfig | None = None,
                 log_level: str = "warning", slave_args: tuple[str, ...] = (), http_bind: str | None = None):
        self.state_dir = Path(state_dir)
        self.slave_args = tuple(slave_args)
        if config is None:
            if not master_config_path(self.state_dir).exists():
                write_default_master_config(self.state_dir)
            config = load_master_config(self.state_dir)
        # Local slaves live and die with this run, on a port of loopback nobody else needs to know.
        config.bind = "tcp://127.0.0.1:*"
        config.slave_exit_when_done = True
        if http_bind:
            config.http_bind = http_bind
        self.master = Master(config, self.state_dir)
        self.slaves: list[subprocess.Popen[bytes]] = []
        for i in range(1, n + 1):
            self.slaves.append(self._start_slave(f"local-{i}", slots, log_level))
        self.master.runnability.expect(self._slaves_starting)

    def _slaves_starting(self) -> bool:
        """Some local slave is alive but not connected yet."""
        return len(self.master.roster) < sum(proc.poll() is None for proc in self.slaves)

    def _start_slave(self, name: str, slots: int, log_level: str) -> subprocess.Popen[bytes]:
        cfg = self.master.config
        cmd = [sys.executable, "-m", "slave", "--master", self.master.endpoint, "--name", name,
               "--slots", str(slots), "--work-root", str(self.state_dir / "work" / name),
               "--heartbeat", str(cfg.heartbeat_interval), "--exit-on-shutdown", "--log-level", log_level,
               "--parent-pid", str(os.getpid()),
               *self.security_args(), *self.slave_args]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def security_args(self) -> list[str]:
        """Local slaves use the state dir's shared slave key (CURVE even on loopback), or --insecure."""
        if self.master.config.insecure:
            return ["--insecure"]
        kdir = keys.keys_dir(self.state_dir)
        return ["--master-key", str(kdir / "master.key"), "--secret-key", str(kdir / "slave.key_secret")]

    def run_until(self, done: Callable[[], bool], tick: Callable[[], None] | None = None) -> None:
        """Serve until `done()`; a slave process that dies is reported, the sweep goes on without it."""
        self.master.serve(until=done, tick=tick)

    def run_sweep(self, sweep: Sweep) -> dict[str, int]:
        """Submit (or resume) a sweep, serve until it is over, and return its task counts by state."""
        self.master.submit(sweep)
        self.run_until(lambda: self.master.sweep_done(sweep.name))
        return self.master.store.task_counts(sweep.name)

    def close(self, interrupted: bool = False) -> None:
        """The master says goodbye (its tickets given back without cost when the user `interrupted` the run), then
        every slave is stopped at once: local slaves live and die with this run, and one still starting (or
        reconnecting) would otherwise wait for a master that is gone."""
        if interrupted:
            self.master.release_all("interrupted by the user")
        self.master.close()
        for proc in self.slaves:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.slaves:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
