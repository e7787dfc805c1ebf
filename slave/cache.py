"""Worker executables shipped by the master, cached by SHA-256 in a folder several slaves may share (NFS-safe).

Layout: `<cache_dir>/<sha256>/<name>`. A slave that needs a worker checks the
file's SHA-256 (once per process, then by size and mtime); a missing or wrong
copy is fetched from the master in chunks by the one slave that creates
`<name>.lock` (O_EXCL), written to a temporary file of its own, checked, made
executable and moved into place with an atomic rename. Others wait for the file
to appear; a lock not touched for `lock_stale` seconds is broken.
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from ticketfarm import messages, protocol

log = structlog.get_logger("ticketfarm.cache")


@dataclass
class Fetch:
    """One worker this slave is fetching (it holds the lock) or waiting for (another slave holds it)."""

    name: str
    sha256: str
    size: int
    parked: list[Any] = field(default_factory=list)
    tmp: Path | None = None
    received: int = 0
    since: float = field(default_factory=time.time)


class WorkerCache:
    """Resolves a ticket's worker to a verified local path; parks tickets while it is fetched."""

    def __init__(self, root: Path, slave: str, send: Callable[[messages.WorkerRequest], None], lock_stale: float):
        self.root = root
        self.slave = slave
        self.send = send
        self.lock_stale = lock_stale
        self.fetches: dict[str, Fetch] = {}
        self.fetched: set[Path] = set()
        self._verified: dict[Path, tuple[int, int]] = {}

    def path(self, sha256: str, name: str) -> Path:
        return self.root / sha256 / name

    # -- from the daemon ---------------------------------------------------------------------
    def resolve(self, entry: messages.WorkerFile, spec: Any) -> Path | None:
        """The verified worker path, or None: then the ticket is parked until the fetch completes."""
        sha, name = entry.sha256, entry.name
        if "/" in name or name in ("", ".", "..") or not all(c in "0123456789abcdef" for c in sha):
            raise ValueError(f"bad worker entry {entry!r}")  # it would name a path outside the cache
        path = self.path(sha, name)
        fetch = self.fetches.get(sha)
        if fetch is None and self.valid(path, sha):
            return path
        if fetch is None:
            fetch = self.fetches[sha] = Fetch(name, sha, entry.size)
            self._try_lock(fetch)
        fetch.parked.append(spec)
        return None

    def valid(self, path: Path, sha256: str) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        key = (st.st_size, st.st_mtime_ns)
        if self._verified.get(path) == key:
            return True
        if sha256_of(path) != sha256:
            log.warning("worker_cache_wrong", path=str(path))
            return False
        self._verified[path] = key
        return True

    def poll(self) -> list[Any]:
        """Tickets whose worker another slave has just put in place (or whose stale lock we now hold)."""
        ready: list[Any] = []
        for sha, fetch in list(self.fetches.items()):
            if fetch.tmp is not None:
                continue  # ours: chunks are on their way
            if self.valid(self.path(sha, fetch.name), sha):
                del self.fetches[sha]
                ready.extend(fetch.parked)
            else:
                self._try_lock(fetch)
        return ready

    def on_chunk(self, msg: messages.Worker) -> tuple[list[Any], list[Any], str]:
        """A WORKER message: returns (tickets ready to run, tickets that cannot run, why not)."""
        sha = msg.sha256
        fetch = self.fetches.get(sha)
        if fetch is None or fetch.tmp is None:
            return [], [], ""
        if msg.error or msg.offset != fetch.received:
            return self._give_up(fetch, f"cannot fetch worker {fetch.name}: {msg.error or 'bad chunk'}")
        with open(fetch.tmp, "ab") as fh:
            fh.write(msg.data)
        fetch.received += len(msg.data)
        final = self.path(sha, fetch.name)
        try:
            os.utime(self._lock(final))  # still alive: nobody breaks this lock
        except OSError:
            pass
        if fetch.received < fetch.size:
            self._request(fetch)
            return [], [], ""
        if sha256_of(fetch.tmp) != sha:
            return self._give_up(fetch, f"worker {fetch.name}: SHA-256 of the fetched copy does not match")
        fetch.tmp.chmod(fetch.tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(fetch.tmp, final)
        self._unlock(final)
        self.fetched.add(final)
        del self.fetches[sha]
        log.info("worker_cached", worker=fetch.name, sha256=sha[:12], bytes=fetch.size)
        return fetch.parked, [], ""

    def reset(self) -> None:
        """A new connection to the master: fetches in flight start again from their first byte."""
        for fetch in self.fetches.values():
            if fetch.tmp is not None:
                fetch.tmp.unlink(missing_ok=True)
                fetch.tmp.write_bytes(b"")
                fetch.received = 0
                self._request(fetch)

    def delete_fetched(self) -> None:
        """End of work with `delete_workers`: remove the executables this slave fetched."""
        for path in self.fetched:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
        self.fetched.clear()

    # -- locking and fetching -------------------------------------------------------------------------
    @staticmethod
    def _lock(final: Path) -> Path:
        return final.with_name(final.name + ".lock")

    def _try_lock(self, fetch: Fetch) -> None:
        final = self.path(fetch.sha256, fetch.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = self._lock(final)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except OSError:
                return  # just released: the next poll looks again
            if age > self.lock_stale:
                log.warning("worker_lock_broken", lock=str(lock), age=round(age, 1))
                lock.unlink(missing_ok=True)
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.slave} {socket.gethostname()} {os.getpid()} {time.time():.3f}\n")
        if self.valid(final, fetch.sha256):  # put in place while we were looking
            self._unlock(final)
            return
        fetch.tmp = final.with_name(f".{fetch.name}.{self.slave}.{os.getpid()}.tmp")
        fetch.tmp.write_bytes(b"")
        fetch.received = 0
        self._request(fetch)

    def _request(self, fetch: Fetch) -> None:
        length = min(protocol.CHUNK_SIZE, fetch.size - fetch.received) or 1
        self.send(messages.WorkerRequest(fetch.sha256, fetch.received, length))

    def _unlock(self, final: Path) -> None:
        self._lock(final).unlink(missing_ok=True)

    def _give_up(self, fetch: Fetch, reason: str) -> tuple[list[Any], list[Any], str]:
        log.warning("worker_fetch_failed", worker=fetch.name, reason=reason)
        if fetch.tmp is not None:
            fetch.tmp.unlink(missing_ok=True)
        self._unlock(self.path(fetch.sha256, fetch.name))
        del self.fetches[fetch.sha256]
        return [], fetch.parked, reason


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
