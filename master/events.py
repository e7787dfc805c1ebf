"""Hot-path events (tickets dispatched, tasks done) gathered in memory and written once per group commit."""
from __future__ import annotations

from typing import Any

from master.store import Store

#: Event kinds a client can wait for to know a sweep has ended.
SWEEP_END_KINDS = ("sweep_finished", "sweep_cancelled")


class EventBatch:
    """Collects per-ticket happenings; `flush` writes one event row per sweep and kind, not one per ticket."""

    def __init__(self) -> None:
        self._dispatched: dict[str, list[list[Any]]] = {}
        self._done: dict[str, list[int]] = {}

    def dispatched(self, sweep: str, ticket: int, task: int, slave: str) -> None:
        self._dispatched.setdefault(sweep, []).append([ticket, task, slave])

    def done(self, sweep: str, task: int) -> None:
        self._done.setdefault(sweep, []).append(task)

    def flush(self, store: Store) -> None:
        """Write what was gathered into the store's open transaction (call right before its commit)."""
        if self._dispatched:
            for sweep, tickets in self._dispatched.items():
                store.event("tickets_dispatched", sweep=sweep, detail={"tickets": tickets})
            self._dispatched = {}
        if self._done:
            for sweep, tasks in self._done.items():
                store.event("tasks_done", sweep=sweep, detail={"tasks": tasks})
            self._done = {}
