"""Test helper: a real `ticketfarm master` with its HTTP API and real slave processes, all on loopback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1"
TOKEN = "test-token-0123456789"
CALLBACK_SECRET = "callback-secret"
HEARTBEAT = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        e.pop(k, None)
    return e


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


class HttpCluster:
    """Master subprocess (ZeroMQ + HTTP on free loopback ports) and `n` slave subprocesses."""

    def __init__(self, state: Path, n: int = 2, slots: int = 2, extra_config: str = "", cafile: Path | None = None):
        from master.web.tokens import hash_token

        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        zport, hport = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{zport}"
        # cafile: the master serves HTTPS (extra_config sets http_tls_*) with this certificate
        self.cafile = cafile
        self.url = f"{'https' if cafile else 'http'}://127.0.0.1:{hport}"
        (state / "master.toml").write_text(
            f'bind = "{self.endpoint}"\nheartbeat_interval = {HEARTBEAT}\nliveness = 5\ndeadline_grace = 2.0\n'
            f'http_bind = "127.0.0.1:{hport}"\nhttp_token_hash = "{hash_token(TOKEN)}"\n'
            f'callback_secret = "{CALLBACK_SECRET}"\ncallback_backoff = 0.1\ndurability = "normal"\n' + extra_config)
        from ticketfarm.keys import init_state_keys

        init_state_keys(state)  # before the slaves start: they need the master's public key
        self.log = open(state / "master.log", "wb")
        self.master = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(state), "master"],
                                       env=env(), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.slaves: list[subprocess.Popen[bytes]] = []
        try:
            self.slaves = [self.start_slave(f"s{i}", slots) for i in range(1, n + 1)]
            self.wait_for(lambda: len([s for s in self.get("/api/v1/slaves").json()["slaves"] if s["connected"]]) == n,
                          what=f"{n} slaves connected")
        except BaseException:
            self.close()  # a cluster that never came up leaves no processes behind
            raise

    def start_slave(self, name: str, slots: int, *extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "slave", "--master", self.endpoint, "--name", name, "--slots", str(slots),
             "--work-root", str(self.state / "work" / name), "--heartbeat", str(HEARTBEAT),
             "--master-key", str(self.state / "keys" / "master.key"),
             "--secret-key", str(self.state / "keys" / "slave.key_secret"), *extra],
            env=env(), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    # -- HTTP --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
        h = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if self.cafile:
            import ssl

            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.cafile))))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=timeout) as r:
                return Reply(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.headers, e.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, token: str | None = TOKEN, **kw: Any) -> Reply:
        return self.request("POST", path, body if body is not None else {}, token=token, **kw)

    def submit(self, spec: dict[str, Any], **extra: Any) -> Reply:
        return self.post("/api/v1/sweeps", {"spec": spec, **extra})

    def sweep(self, name: str) -> dict[str, Any]:
        return self.get(f"/api/v1/sweeps/{name}").json()

    def wait_for(self, cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError(f"master exited with {self.master.returncode}: "
                                   + (self.state / "master.log").read_text()[-3000:])
            try:
                if cond():
                    return
            except (OSError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what} (last error: {last})")

    def wait_state(self, name: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        self.wait_for(lambda: self.sweep(name)["state"] in states, timeout, f"sweep {name} in {states}")
        return self.sweep(name)

    def close(self) -> None:
        procs = [self.master, *self.slaves]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()


def spec(name: str, n: int, command: str = "echo x={x}", **extra: Any) -> dict[str, Any]:
    return {"name": name, "command": command, "timeout": 20, "parameters": {"grid": {"x": {"range": [0, n]}}},
            **extra}


def module_cluster(name: str) -> Callable[..., Any]:
    """A module-scoped `cluster` fixture: one HttpCluster (state in a temp dir named NAME) for the test module."""
    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
        c = HttpCluster(tmp_path_factory.mktemp(name) / "state")
        yield c
        c.close()

    return cluster
