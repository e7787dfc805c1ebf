"""The master's side of its HTTP process: its client key, starting it, restarting it if it dies, stopping it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog

from master.config import MasterConfig
from master.web.context import check_http_config
from master.web.tokens import TokenSet
from ticketfarm import keys
from ticketfarm.errors import ConfigError

log = structlog.get_logger("ticketfarm.http")

#: The line (then the URL) the HTTP process prints on stdout once it listens: what the master waits for.
READY = "ticketfarm-http listening on"
#: Seconds the master waits for its HTTP process to listen.
START_TIMEOUT = 30.0
#: Seconds before an HTTP process that died is started again.
RESTART_DELAY = 1.0
#: Seconds a stopping HTTP process gets before it is killed.
STOP_TIMEOUT = 5.0


def http_client_key(state_dir: Path) -> None:
    """The HTTP process's own client keypair (keys/http.key_secret), authorised when first made.

    Revoking it (`ticketfarm keys revoke client http`) cuts the HTTP process off; it is not re-authorised.
    """
    kdir = keys.keys_dir(state_dir)
    if (kdir / "http.key_secret").exists():
        return
    public, _ = keys.write_keypair(kdir, "http")
    keys.authorize(state_dir, keys.CLIENT, "http", public)


class WebProcess:
    """`python -m master.web` as a child of the master, supervised by a thread that waits on it."""

    def __init__(self, config: MasterConfig, state_dir: Path, endpoint: str, epoch: int, started: float):
        self.state_dir = state_dir
        # A wildcard bind is reached on loopback (the HTTP process runs on this machine).
        local = endpoint.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")
        self.argv = [sys.executable, "-m", "master.web", "--state", str(state_dir), "--master", local,
                     "--epoch", str(epoch), "--started", repr(started)]
        check_http_config(config, TokenSet(state_dir))
        if not config.insecure:
            http_client_key(state_dir)
        self.url = ""
        self._stopping = threading.Event()
        self._proc = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="ticketfarm-http-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[str]:
        argv = self.argv + (["--port", self.url.rsplit(":", 1)[1]] if self.url else [])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT)
        line = ready[0] if ready else ""
        if not line.startswith(READY):
            proc.kill()
            proc.wait()
            raise ConfigError(f"the HTTP process did not start (exit {proc.returncode}; its message is above)",
                              field="http_bind")
        self.url = line[len(READY):].strip()
        log.info("http_process_started", pid=proc.pid, url=self.url)
        return proc

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            log.warning("http_process_died", exit_code=code, restart_in=RESTART_DELAY)
            if self._stopping.wait(RESTART_DELAY):
                return
            try:
                self._proc = self._spawn()
            except ConfigError as exc:
                log.error("http_process_restart_failed", error=str(exc))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._watcher.join(2)
