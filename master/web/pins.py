"""What a sweep pinned to named slaves waits for: which of its slaves are connected, and why it waits if none serves."""
from __future__ import annotations

from typing import Any

from master.store import Store


def pin_json(slaves: list[str], queued: int, store: Store, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pin of a sweep (None when it has none); `waiting` is the reason its queued tasks do not start."""
    if not slaves:
        return None
    connected = {name: info for name, info in (live or {}).get("slaves", {}).items() if name in slaves}
    waiting = None
    if queued and all(info.get("draining") for info in connected.values()):
        seen = {s["name"] for s in store.slaves()}
        parts = [("never seen", [n for n in slaves if n not in seen]),
                 ("gone", [n for n in slaves if n in seen and n not in connected]),
                 ("draining", [n for n in slaves if n in connected])]
        waiting = "none of its slaves takes tickets: " + "; ".join(f"{what}: {', '.join(names)}"
                                                                  for what, names in parts if names)
    return {"slaves": slaves, "connected": [n for n in slaves if n in connected], "waiting": waiting}
