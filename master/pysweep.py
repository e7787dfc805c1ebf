"""Python-function sweeps on the master: function bodies, task batches from API clients, results pushed to watchers.

A python sweep is a `Sweep` with kind "python". Each task's params are
`{"fn": <sha256 of the cloudpickled function>, "args": <base64 of cloudpickled (args, kwargs)>, "repr": ...}`.
Function bodies live once in the store's `functions` table; a slave asks for a
body it lacks with CODE_REQUEST and caches it, so a function crosses the wire
once per slave, not once per task.

API clients (ticketfarm/client/futures.py) speak CONTROL ops named `py_*` on the master's
ROUTER socket, each answered by a REPLY echoing the client's `rid`:

    py_add     header {sweep, spec, first, fns, reprs, functions, sizes}; payload: one frame per new function
               body (in `functions` order), then ONE frame with every task's pickled (args, kwargs) back to
               back, task i's being sizes[i] bytes (len(sizes) == len(fns), sum(sizes) == that frame's length);
               appends tasks first..first+len(fns)-1 (idempotent: indices already there are skipped)
    py_watch   header {sweep}: REPLY {ntasks, state}, then NOTIFY with every settled task so far,
               and from then on a NOTIFY after each group commit that settled tasks of the sweep
    py_unwatch header {sweep}
    py_fetch   header {sweep, task, name, offset, length}: REPLY with that piece of a large result
    py_cancel  header {sweep, tasks?}: cancel those tasks (or the whole sweep)
    py_ping    REPLY {epoch}: a client notices a restarted master and watches again

NOTIFY header {sweep, tasks: [{task, state, output?, size?, inline?, reason?}]}, and one payload
frame: the inline outputs' bytes back to back in item order (empty when none is inline), cut by their
`size`s. One frame, not one per task: each frame costs several µs (CURVE encrypts frame by frame).
"""
from __future__ import annotations

import base64
import time
from json.encoder import encode_basestring_ascii as quoted
from pathlib import Path
from typing import Any, Callable

import structlog

from master.lifecycle import Lifecycle
from master.link import Link
from master.scheduler import Ticket
from master.store import Store, StoredOutput
from ticketfarm import messages
from ticketfarm.protocol import FETCH_MAX
from ticketfarm.spec import NAME_RE, PYTHON_RESULTS, CollectRule, Sweep

log = structlog.get_logger("ticketfarm.pysweep")

#: A python task's value: the pickled return value, or the pickled exception and remote traceback.
VALUE_OUTPUTS = ("result", "error")
#: Python tickets per TICKET message at most, and about this many bytes of arguments.
TICKET_BATCH = 256
TICKET_BYTES = 1024 * 1024
#: Settled tasks per NOTIFY message at most.
NOTIFY_BATCH = 1000
#: A client silent this many seconds (it pings every second) stops being sent notifications.
CLIENT_EXPIRY = 60.0


Reply = tuple[dict[str, Any], list[bytes]]


class PythonSweeps:
    """The master's side of python sweeps: function bodies for slaves, the `py_*` ops, notifications to watchers."""

    def __init__(self, lifecycle: Lifecycle, link: Link, store: Store, state_dir: Path, epoch: int,
                 commit: Callable[[], None], max_message_size: int = 8 * 1024 * 1024):
        self.max_message_size = max_message_size
        """The largest message the master's socket takes (a larger one drops the connection): clients learn it."""
        self.lifecycle = lifecycle
        self.link = link
        self.store = store
        self.state_dir = state_dir
        self.epoch = epoch
        self.commit = commit
        self.functions: dict[str, bytes] = {}
        self.kinds: dict[str, bool] = {}
        self.watchers: dict[str, dict[bytes, float]] = {}
        self.pending: dict[str, list[tuple[int, str, str | None, list[StoredOutput]]]] = {}

    # -- hooks called by dispatch, the lifecycle and the group commit ----------------------------------------
    def owns(self, sweep: str) -> bool:
        """Whether a sweep is a python sweep (remembered per name)."""
        kind = self.kinds.get(sweep)
        if kind is None:
            active = self.lifecycle.active(sweep)
            if active is not None:
                kind = active.sweep.kind == "python"
            else:
                row = self.store.sweep(sweep)
                kind = row is not None and row.sweep().kind == "python"
            self.kinds[sweep] = kind
        return kind

    def ticket_messages(self, tickets: list[Ticket]) -> list[messages.Ticket]:
        """TICKET messages for python tickets of one sweep: each names its function by hash and carries its
        pickled arguments (at most TICKET_BATCH tickets and about TICKET_BYTES of arguments per message)."""
        name = tickets[0].sweep
        active = self.lifecycle.active(name)
        assert active is not None
        sweep = active.sweep
        # The sweep's own result names: a sweep stored before printed output was kept does not get it.
        shared = messages.TicketSweep(name, sweep.timeout, sweep.results, kind="python")
        out, batch, size = [], [], 0
        for ticket in tickets:
            params = ticket.params if ticket.params is not None else self.store.params(name, ticket.task)
            data = base64.b64decode(params["args"])
            batch.append(messages.TicketEntry(ticket.id, ticket.task, ticket.attempt, fn=params["fn"], args=data))
            size += len(data)
            if len(batch) >= TICKET_BATCH or size >= TICKET_BYTES:
                out.append(messages.Ticket(shared, batch))
                batch, size = [], 0
        if batch:
            out.append(messages.Ticket(shared, batch))
        return out

    def settled(self, sweep: str, task: int, state: str, outputs: list[StoredOutput] | None = None) -> None:
        """A task reached a final state; watchers hear about it after the next commit."""
        if not self.owns(sweep) or sweep not in self.watchers:
            return
        reason = None if state == "done" else self.store.task_reason(sweep, task)
        self.pending.setdefault(sweep, []).append((task, state, reason, outputs or []))

    def after_commit(self) -> None:
        """Push what settled in the transaction just committed to the clients watching those sweeps."""
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        for sweep, entries in pending.items():
            for identity in self.watchers.get(sweep, {}):
                self._notify(identity, sweep, entries)

    # -- slaves: function bodies ---------------------------------------------------------------
    def on_code_request(self, identity: bytes, msg: messages.CodeRequest) -> None:
        body = self.function(msg.hash)
        self.link.send(identity, messages.Code(msg.hash, body, "" if body else f"unknown function {msg.hash}"))

    def function(self, digest: str) -> bytes | None:
        body = self.functions.get(digest)
        if body is None:
            body = self.store.function(digest)
            if body is not None:
                self.functions[digest] = body
        return body

    # -- API clients -------------------------------------------------------------------------------
    def add(self, identity: bytes, msg: messages.Control) -> Reply:
        add = messages.PyAdd.from_control(msg)
        name = add.sweep
        for digest, body in add.functions.items():
            self.functions[digest] = body
            self.store.add_function(digest, body)
        row = self.store.sweep(name)
        if row is None:
            sweep = Sweep.from_json(add.spec)
            if sweep.kind != "python" or sweep.name != name or not NAME_RE.match(name):
                raise ValueError(f"py_add: {name!r} needs a python sweep spec with that name")
            sweep.params, sweep.results = [], dict(PYTHON_RESULTS)
            # `ticketfarm collect` writes a folder per task: params.json (the call) and the pickled result or error.
            # The master never unpickles them: a result's pickle may run code wherever it is loaded.
            sweep.collect = [CollectRule("folders", name)]
            self.lifecycle.add_sweep(sweep)
            row = self.store.sweep(name)
        elif not self.owns(name):
            raise ValueError(f"sweep {name!r} exists and is not a python sweep")
        assert row is not None
        if row.state == "cancelled":
            raise ValueError(f"sweep {name!r} was cancelled")
        # The rows' JSON written here, not by json.dumps of a dict per task (4 µs each: most of a py_add's cost).
        rows = ['{"fn": %s, "args": "%s", "repr": %s}'
                % (quoted(c.fn), base64.b64encode(c.args).decode(), quoted(c.repr)) for c in add.calls]
        # Dispatched before the fsync: the REPLY waits for the op's commit; a crash in between only re-runs tasks.
        new = self.lifecycle.add_tasks(name, add.first, rows)
        return {"added": len(new), "ntasks": add.first + len(add.calls)}, []

    def watch(self, identity: bytes, msg: messages.Control) -> Reply:
        name = msg.args().text("sweep")
        row = self.store.sweep(name)
        if row is None:
            return {"ok": False, "error": f"no sweep named {name!r}"}, []
        if not self.owns(name):
            return {"ok": False, "error": f"sweep {name!r} is not a python sweep"}, []
        self.commit()  # everything settled so far is in the store, and nothing is pending
        self.watchers.setdefault(name, {})[identity] = time.time()
        batch: list[tuple[int, str, str | None, list[StoredOutput]]] = []
        for entry in self.store.settled_tasks(name):
            batch.append(entry)
            if len(batch) >= NOTIFY_BATCH:
                self._notify(identity, name, batch)
                batch = []
        if batch:
            self._notify(identity, name, batch)
        return {"ntasks": row.ntasks, "state": row.state}, []

    def unwatch(self, identity: bytes, msg: messages.Control) -> Reply:
        watchers = self.watchers.get(msg.args().text("sweep"), {})
        watchers.pop(identity, None)
        return {}, []

    def fetch(self, identity: bytes, msg: messages.Control) -> Reply:
        args = msg.args()
        name, task, output = args.text("sweep"), args.count("task"), args.text("name")
        offset, length = args.count("offset"), min(args.count("length"), FETCH_MAX)
        stored = self.store.outputs(name, task).get(output)
        if stored is None:
            return {"ok": False, "error": f"no result {output!r} for task {task} of {name!r}"}, []
        if stored.data is not None:
            return {"size": stored.size}, [stored.data[offset:offset + length]]
        with open(self.state_dir / stored.path, "rb") as fh:
            fh.seek(offset)
            return {"size": stored.size}, [fh.read(length)]

    def cancel(self, identity: bytes, msg: messages.Control) -> Reply:
        """Cancel the listed tasks, or the whole sweep; watchers hear of each task cancelled."""
        args = msg.args()
        name, tasks = args.text("sweep"), args.counts("tasks", None)
        if tasks is None:
            cancelled = self.lifecycle.cancel_sweep(name)
            return {"ok": cancelled is not None, "cancelled": len(cancelled or [])}, []
        done = sum(1 for task in tasks if self.lifecycle.cancel_task(name, task, "task cancelled by its client"))
        return {"cancelled": done}, []

    def ping(self, identity: bytes, msg: messages.Control) -> Reply:
        now = time.time()
        for watchers in self.watchers.values():
            if identity in watchers:
                watchers[identity] = now
        self._expire_watchers(now)
        return {"epoch": self.epoch, "max_message_size": self.max_message_size}, []

    def _expire_watchers(self, now: float) -> None:
        for name in list(self.watchers):
            watchers = self.watchers[name]
            for identity in [i for i, seen in watchers.items() if now - seen > CLIENT_EXPIRY]:
                del watchers[identity]
            if not watchers:
                del self.watchers[name]

    def _notify(self, identity: bytes, sweep: str,
                entries: list[tuple[int, str, str | None, list[StoredOutput]]]) -> None:
        for start in range(0, len(entries), NOTIFY_BATCH):
            tasks = []
            for task, state, reason, outputs in entries[start:start + NOTIFY_BATCH]:
                if state != "done":
                    tasks.append(messages.Settled(task, state, reason=reason or ""))
                    continue
                out = next((o for o in outputs if o.name in VALUE_OUTPUTS), None)
                if out is None:
                    tasks.append(messages.Settled(task, "failed", reason="no result stored"))
                else:
                    tasks.append(messages.Settled(task, "done", out.name, out.size, out.data))
            self.link.send(identity, messages.Notify(sweep, tasks))
