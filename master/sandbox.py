"""Files uploaded into a task's sandbox, kept on the master (STATE/sandbox/<sweep>/<task>/) until its sweep ends.

Every ticket of the task gets them in its TICKET, so they are in the work dir before the worker starts.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from master.scheduler import Ticket
from ticketfarm.errors import TaskUnreachable


class Staging:
    """The uploaded files by task; only their sizes are held in memory, the bytes are read at dispatch."""

    def __init__(self, state_dir: Path, task_bytes: int):
        self.root = state_dir / "sandbox"
        self.task_bytes = task_bytes
        self.files: dict[tuple[str, int], dict[str, int]] = {}
        for task_dir in self.root.glob("*/*"):  # what was staged before a restart
            if task_dir.name.isdigit():
                key = (task_dir.parent.name, int(task_dir.name))
                self.files[key] = {p.relative_to(task_dir).as_posix(): p.stat().st_size
                                   for p in task_dir.rglob("*") if p.is_file() and not p.is_symlink()}

    def put(self, sweep: str, task: int, path: str, data: bytes) -> None:
        """Keep `data` as the task's file `path` (a checked relative path), replacing an earlier upload of it."""
        staged = self.files.setdefault((sweep, task), {})
        total = sum(size for name, size in staged.items() if name != path) + len(data)
        if total > self.task_bytes:
            raise TaskUnreachable("too_large", f"task {task} of {sweep!r} would keep {total} bytes of uploads, "
                                               f"over sandbox_task_bytes ({self.task_bytes})")
        target = self.root / sweep / str(task) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        staged[path] = len(data)

    def of(self, ticket: Ticket) -> list[tuple[str, bytes]]:
        """The files staged for a ticket's task, with their bytes (none: the common case costs a dict look-up)."""
        staged = self.files.get((ticket.sweep, ticket.task))
        if not staged:
            return []
        base = self.root / ticket.sweep / str(ticket.task)
        return [(name, (base / name).read_bytes()) for name in sorted(staged)]

    def drop_sweep(self, sweep: str) -> None:
        """The sweep ended: nothing of it is dispatched again."""
        for key in [k for k in self.files if k[0] == sweep]:
            del self.files[key]
        shutil.rmtree(self.root / sweep, ignore_errors=True)
