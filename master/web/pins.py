"""What a sweep pinned to named slaves waits for: which of its slaves are connected, and why it waits if none is."""
from __future__ import annotations

from typing import Any

from master.store import Store


def pin_json(slaves: list[str], queued: int, store: Store, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pin of a sweep (None when it has none); `waiting` is the reason its queued tasks do not start."""
    if not slaves:
        return None
    connected = [name for name in slaves if live is not None and name in live["slaves"]]
    waiting = None
    if queued and not connected:
        seen = {s["name"] for s in store.slaves()}
        never = [name for name in slaves if name not in seen]
        gone = [name for name in slaves if name in seen]
        waiting = "none of its slaves is connected: " + "; ".join(
            part for part in (f"never seen: {', '.join(never)}" if never else "",
                              f"gone: {', '.join(gone)}" if gone else "") if part)
    return {"slaves": slaves, "connected": connected, "waiting": waiting}
