"""What every request of the HTTP process shares: settings, tokens, the master link, store readers, a cache."""
from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from master.config import MasterConfig
from master.store import Store
from master.web.link import MasterLink
from master.web.tokens import TokenSet
from ticketfarm.errors import ConfigError

#: Most answers the cache holds at once.
MAX_CACHED = 64


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"http_bind must be HOST:PORT, got {bind!r}", field="http_bind")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_config(config: MasterConfig, tokens: TokenSet) -> None:
    """Refuse what must not be served: a bind beyond this machine with no token, half a TLS setting."""
    host, _ = parse_bind(config.http_bind)
    if not is_loopback(host) and not len(tokens):
        raise ConfigError(f"http_bind {config.http_bind!r} is not loopback: make a token (`ticketfarm token "
                          "--write` or `token add`) before serving HTTP beyond this machine", field="http_bind")
    if bool(config.http_tls_cert) != bool(config.http_tls_key):
        raise ConfigError("http_tls_cert and http_tls_key go together: set both or neither", field="http_tls_cert")


@dataclass
class MasterInfo:
    """What the API tells about the master it fronts (given by the master that started it, or asked for)."""

    endpoint: str
    epoch: int
    started: float | None


@dataclass
class WebContext:
    """Shared by the request handlers; holds no master objects, only its link and read-only store readers."""

    config: MasterConfig
    state_dir: Path
    master: MasterInfo
    link: MasterLink
    tokens: TokenSet
    url: str = ""
    stopping: threading.Event = field(default_factory=threading.Event)
    _readers: threading.local = field(default_factory=threading.local)
    _cache: dict[str, tuple[float, Any]] = field(default_factory=dict)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock)
    _building: dict[str, threading.Lock] = field(default_factory=dict)
    _claims: dict[str, float] = field(default_factory=dict)
    _generation: int = 0

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @cached_property  # asked by every request without a token
    def open_reads(self) -> bool:
        return self.config.http_open_reads and is_loopback(parse_bind(self.config.http_bind)[0])

    def store(self) -> Store:
        """This thread's read-only connection (each statement reads the newest commit: WAL, autocommit)."""
        store = getattr(self._readers, "store", None)
        if store is None:
            store = self._readers.store = Store(self.db_path, readonly=True)
        return store

    def control(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = self.link.call(op, **fields)
        self.invalidate()
        return reply

    def fresh(self, key: str) -> Any:
        """The cached answer under `key` while fresh. Once it is stale the first caller gets None (it rebuilds the
        answer) and the others the stale one until that is done (or for one more http_cache_ttl if it never is):
        pollers never queue behind a rebuild."""
        now, ttl = time.monotonic(), self.config.http_cache_ttl
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            if now - hit[0] < ttl or now - self._claims.get(key, -ttl) < ttl:
                return hit[1]
            self._claims[key] = now
            return None

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """The same answer to every poller for http_cache_ttl seconds: one request builds it while the others
        wait for it (many pollers cost one query), and a change made meanwhile is not hidden by it."""
        with self._cache_lock:
            if len(self._building) >= MAX_CACHED:  # keys carry query values: a client cannot grow these
                self._building.clear()
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._cache_lock:
                hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.config.http_cache_ttl:
                return hit[1]
            now, generation = time.monotonic(), self._generation
            try:
                value = build()
            finally:
                with self._cache_lock:
                    self._claims.pop(key, None)
            with self._cache_lock:
                if generation == self._generation:
                    if len(self._cache) >= MAX_CACHED:
                        self._cache.clear()
                    self._cache[key] = (now, value)
            return value

    def invalidate(self) -> None:
        """Forget every cached answer (after a change), and any being built now."""
        with self._cache_lock:
            self._cache.clear()
            self._claims.clear()
            self._generation += 1
