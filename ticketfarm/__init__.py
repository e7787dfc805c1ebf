"""ticketfarm: what users import and what master and slave share.

    from ticketfarm import Cluster
    with Cluster(local=2) as cluster:
        print(list(cluster.map(pow, range(10), [2] * 10)))
"""
from __future__ import annotations

from typing import Any

from ticketfarm.errors import RemoteError, TaskCancelled, TaskFailed, TicketfarmError

__version__ = "0.1.0"
__all__ = ["Cluster", "RemoteError", "TaskCancelled", "TaskFailed", "TicketfarmError", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily: the master and slave processes never pay for the client API's imports.
    if name == "Cluster":
        from ticketfarm.client.futures import Cluster
        return Cluster
    raise AttributeError(f"module 'ticketfarm' has no attribute {name!r}")
