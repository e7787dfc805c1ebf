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
from typing import TYPE_CHECKING, Any

import structlog

from master.store import FINAL_TASK_STATES, StoredOutput
from ticketfarm import messages
from ticketfarm.protocol import FETCH_MAX, Command
from ticketfarm.spec import NAME_RE, PYTHON_RESULTS, CollectRule, Sweep

if TYPE_CHECKING:
    from master.scheduler import Ticket
    from master.server import Master

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


class PythonSweeps:
    """The master's side of python sweeps; `Master` calls its hooks, and it calls back into `Master`."""

    def __init__(self, master: "Master"):
        self.master = master
        self.functions: dict[str, bytes] = {}
        self.kinds: dict[str, bool] = {}
        self.watchers: dict[str, dict[bytes, float]] = {}
        self.pending: dict[str, list[tuple[int, str, str | None, list[StoredOutput]]]] = {}
        master._handlers[Command.CODE_REQUEST] = self.on_code_request

    # -- hooks called by Master ---------------------------------------------------------------
    def owns(self, sweep: str) -> bool:
        """Whether a sweep is a python sweep (remembered per name)."""
        kind = self.kinds.get(sweep)
        if kind is None:
            active = self.master.scheduler.active.get(sweep)
            if active is not None:
                kind = active.sweep.kind == "python"
            else:
                row = self.master.store.sweep(sweep)
                kind = row is not None and row.sweep().kind == "python"
            self.kinds[sweep] = kind
        return kind

    def ticket_messages(self, tickets: list["Ticket"]) -> list[messages.Ticket]:
        """TICKET messages for python tickets of one sweep: each names its function by hash and carries its
        pickled arguments (at most TICKET_BATCH tickets and about TICKET_BYTES of arguments per message)."""
        name = tickets[0].sweep
        sweep = self.master.scheduler.active[name].sweep
        # The sweep's own result names: a sweep stored before printed output was kept does not get it.
        shared = messages.TicketSweep(name, sweep.timeout, sweep.results, kind="python")
        out, batch, size = [], [], 0
        for ticket in tickets:
            params = ticket.params if ticket.params is not None else self.master.store.params(name, ticket.task)
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
        reason = None if state == "done" else self.master.store.task_reason(sweep, task)
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
        self.master._send(identity, messages.Code(msg.hash, body, "" if body else f"unknown function {msg.hash}"))

    def function(self, digest: str) -> bytes | None:
        body = self.functions.get(digest)
        if body is None:
            body = self.master.store.function(digest)
            if body is not None:
                self.functions[digest] = body
        return body

    # -- API clients -------------------------------------------------------------------------------
    def control(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        """Answer one `py_*` CONTROL op (the master echoes the client's request id)."""
        handler = {
            "py_add": self._add, "py_watch": self._watch, "py_unwatch": self._unwatch,
            "py_fetch": self._fetch, "py_cancel": self._cancel, "py_ping": self._ping,
        }.get(msg.op)
        if handler is None:
            raise ValueError(f"unknown control op {msg.op!r}")
        reply, payload = handler(identity, msg)
        reply.setdefault("ok", True)
        return reply, payload

    def _add(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        add = messages.PyAdd.from_control(msg)
        name = add.sweep
        for digest, body in add.functions.items():
            self.functions[digest] = body
            self.master.store.add_function(digest, body)
        row = self.master.store.sweep(name)
        if row is None:
            sweep = Sweep.from_json(add.spec)
            if sweep.kind != "python" or sweep.name != name or not NAME_RE.match(name):
                raise ValueError(f"py_add: {name!r} needs a python sweep spec with that name")
            sweep.params, sweep.results = [], dict(PYTHON_RESULTS)
            # `ticketfarm collect` writes a folder per task: params.json (the call) and the pickled result or error.
            # The master never unpickles them: a result's pickle may run code wherever it is loaded.
            sweep.collect = [CollectRule("folders", name)]
            self.master.store.add_sweep(sweep)
            row = self.master.store.sweep(name)
        elif not self.owns(name):
            raise ValueError(f"sweep {name!r} exists and is not a python sweep")
        assert row is not None
        if row.state == "cancelled":
            raise ValueError(f"sweep {name!r} was cancelled")
        params = [{"fn": c.fn, "args": base64.b64encode(c.args).decode(), "repr": c.repr} for c in add.calls]
        new = self.master.store.add_tasks(name, add.first, params)
        if new:
            active = self.master.scheduler.active.get(name)
            if active is None:
                self.master.store.reopen_sweep(name)
                self.master.scheduler.activate(row.sweep(), row.created, new)
            else:
                active.queued.extend(new)
        # Dispatch before the fsync: the REPLY waits for on_control's commit, and a crash in between only re-runs tasks.
        self.master._dispatch_hungry()
        return {"added": len(new), "ntasks": add.first + len(add.calls)}, []

    def _watch(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        name = msg.args().text("sweep")
        row = self.master.store.sweep(name)
        if row is None:
            return {"ok": False, "error": f"no sweep named {name!r}"}, []
        if not self.owns(name):
            return {"ok": False, "error": f"sweep {name!r} is not a python sweep"}, []
        self.master._commit_and_ack()  # everything settled so far is in the store, and nothing is pending
        self.watchers.setdefault(name, {})[identity] = time.time()
        batch: list[tuple[int, str, str | None, list[StoredOutput]]] = []
        for entry in self.master.store.settled_tasks(name):
            batch.append(entry)
            if len(batch) >= NOTIFY_BATCH:
                self._notify(identity, name, batch)
                batch = []
        if batch:
            self._notify(identity, name, batch)
        return {"ntasks": row.ntasks, "state": row.state}, []

    def _unwatch(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        watchers = self.watchers.get(msg.args().text("sweep"), {})
        watchers.pop(identity, None)
        return {}, []

    def _fetch(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        args = msg.args()
        name, task, output = args.text("sweep"), args.count("task"), args.text("name")
        offset, length = args.count("offset"), min(args.count("length"), FETCH_MAX)
        stored = self.master.store.outputs(name, task).get(output)
        if stored is None:
            return {"ok": False, "error": f"no result {output!r} for task {task} of {name!r}"}, []
        if stored.data is not None:
            return {"size": stored.size}, [stored.data[offset:offset + length]]
        with open(self.master.state_dir / stored.path, "rb") as fh:
            fh.seek(offset)
            return {"size": stored.size}, [fh.read(length)]

    def _cancel(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        args = msg.args()
        name, tasks = args.text("sweep"), args.counts("tasks", None)
        if tasks is None:
            cancelled = list(self.master.store.tasks_in_state(name, "queued")) + \
                list(self.master.store.tasks_in_state(name, "running"))
            ok = self.master.cancel(name)
            for task in sorted(cancelled):
                self.settled(name, task, "cancelled")
            return {"ok": ok, "cancelled": len(cancelled)}, []
        done = 0
        for task in tasks:
            if self.cancel_task(name, task):
                done += 1
        if name in self.master.scheduler.active:
            self.master._finish_if_done(name)
        return {"cancelled": done}, []

    def cancel_task(self, name: str, task: int) -> bool:
        """Drop one task: out of the queue, its running tickets killed; False if it had already settled."""
        state = self.master.store.db.execute("SELECT state FROM tasks WHERE sweep = ? AND idx = ?",
                                             (name, task)).fetchone()
        if state is None or state[0] in FINAL_TASK_STATES:
            return False
        self.master._unqueue(name, task)
        for ticket in self.master.scheduler.siblings(name, task):
            self.master._cancel_ticket(ticket, "task cancelled by its client")
        self.master.store.cancel_task(name, task)
        self.settled(name, task, "cancelled")
        return True

    def _ping(self, identity: bytes, msg: messages.Control) -> tuple[dict[str, Any], list[bytes]]:
        now = time.time()
        for watchers in self.watchers.values():
            if identity in watchers:
                watchers[identity] = now
        self._expire_watchers(now)
        return {"epoch": self.master.epoch}, []

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
            self.master._send(identity, messages.Notify(sweep, tasks))
