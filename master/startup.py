"""What must hold before a master serves, each refusal said in one line: the state dir's lock, its addresses."""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ticketfarm.errors import BindFailed, StateDirInUse

LOCK_FILE = "master.lock"


class StateLock:
    """One master per state dir: an flock on STATE/master.lock held for the master's life (freed by the kernel
    however the master ends, SIGKILL included). The file says who holds it: pid, then endpoint once bound."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.file = open(state_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().split()
            self.file.close()
            raise StateDirInUse(in_use_message(state_dir, holder)) from None
        self.record()

    def record(self, endpoint: str = "") -> None:
        self.file.truncate(0)
        self.file.write(f"{os.getpid()} {endpoint}".strip() + "\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def in_use_message(state_dir: Path, holder: list[str]) -> str:
    pid = holder[0] if holder else "unknown"
    where = f" --master {holder[1]}" if len(holder) > 1 else ""
    return (f"state dir {state_dir} is in use by the master with pid {pid}: wait for it to end, give this one "
            f"another --state, or submit to it: ticketfarm --state {state_dir}{where} submit SPEC")


def bind_failed(setting: str, address: str, exc: Exception) -> BindFailed:
    """The one-line error for an address the master cannot listen on (`exc` from ZeroMQ or a socket)."""
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        advice = "another process (perhaps another master) listens there: stop it, or choose another port"
    elif code == errno.EADDRNOTAVAIL:
        advice = "that address is not one of this machine's: use one it has, or 0.0.0.0 for all"
    else:
        advice = "check the address"
    return BindFailed(f"cannot listen on {address} ({setting}): {os.strerror(code) if code else exc}; {advice}",
                      field=setting)
