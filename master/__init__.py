"""ticketfarm master: ROUTER server, ticket store, scheduler, collection, statistics, control CLI, Python API."""
from __future__ import annotations

from typing import Any

__all__ = ["Cluster", "TaskFailed", "TaskCancelled", "RemoteError"]


def __getattr__(name: str) -> Any:
    # Imported lazily: the master and slave processes never pay for the client API's imports.
    if name == "Cluster":
        from master.api import Cluster
        return Cluster
    if name in ("TaskFailed", "TaskCancelled", "RemoteError"):
        from master import pyerrors
        return getattr(pyerrors, name)
    raise AttributeError(f"module 'master' has no attribute {name!r}")
