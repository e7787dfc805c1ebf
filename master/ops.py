"""Control operations behind the HTTP API (run on the master's loop): submit with callback, pause, task cancel, drain."""
from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any, Callable

from ticketfarm.spec import Sweep

if TYPE_CHECKING:
    from master.server import Master

Reply = dict[str, Any]


def _fail(code: str, message: str) -> Reply:
    """A refused operation; `code` is one of the HTTP API's error codes (not_found, conflict, bad_request)."""
    return {"ok": False, "code": code, "error": message}


def _str(header: dict[str, Any], name: str) -> str:
    value = header.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {name!r} missing or not a string")
    return value


def submit(master: "Master", header: dict[str, Any]) -> Reply:
    """Submit a sweep; an optional status_callback_url (+ secret) is stored in the same transaction."""
    sweep = Sweep.from_json(_str(header, "sweep"))
    url = header.get("status_callback_url")
    secret = header.get("status_callback_secret") or master.config.callback_secret
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return _fail("bad_request", "status_callback_url must be an http:// or https:// URL")
        if not secret:
            return _fail("bad_request", "status_callback_secret is required (the master has no callback_secret)")
    from ticketfarm.errors import SweepExists

    if url is not None and master.store.sweep(sweep.name) is None:
        # Same transaction as the sweep_submitted event: the sender finds the URL when it reads that event.
        master.store.set_callback(sweep.name, url, secret)
        master.callbacks.ensure_started()
    try:
        return {"ok": True, "state": master.submit(sweep)}
    except SweepExists as exc:
        return _fail("conflict", str(exc))


def cancel(master: "Master", header: dict[str, Any]) -> Reply:
    name = _str(header, "sweep")
    row = master.store.sweep(name)
    if row is None:
        return _fail("not_found", f"no sweep named {name!r}")
    master.events.flush(master.store)
    if not master.cancel(name):
        return _fail("conflict", f"sweep {name!r} is {row.state}: nothing to cancel")
    return {"ok": True, "state": "cancelled"}


def set_paused(master: "Master", header: dict[str, Any], paused: bool) -> Reply:
    name = _str(header, "sweep")
    row = master.store.sweep(name)
    if row is None:
        return _fail("not_found", f"no sweep named {name!r}")
    active = master.scheduler.active.get(name)
    if active is None:
        return _fail("conflict", f"sweep {name!r} is {row.state}: only an active or paused sweep can be "
                                 f"{'paused' if paused else 'resumed'}")
    if active.paused != paused:
        active.paused = paused
        master.store.set_sweep_state(name, "paused" if paused else "active")
        if not paused:
            master._dispatch_hungry()
    return {"ok": True, "state": "paused" if paused else "active"}


def cancel_task(master: "Master", header: dict[str, Any]) -> Reply:
    """Cancel one task: dropped from the queue, its running tickets killed on their slaves."""
    name, task = _str(header, "sweep"), header.get("task")
    if not isinstance(task, int) or isinstance(task, bool):
        raise ValueError("field 'task' missing or not an integer")
    row = master.store.task(name, task)
    if row is None:
        return _fail("not_found", f"sweep {name!r} has no task {task}")
    if row["state"] not in ("queued", "running", "paused"):
        return _fail("conflict", f"task {task} of {name!r} is {row['state']}: nothing to cancel")
    master._unqueue(name, task)
    if (active := master.scheduler.active.get(name)) is not None:
        active.held.discard(task)
    for ticket in master.scheduler.siblings(name, task):
        master._cancel_ticket(ticket, "task cancelled")
    master.store.cancel_task(name, task)
    master._finish_if_done(name)
    return {"ok": True, "state": "cancelled"}


def _task_arg(header: dict[str, Any]) -> int:
    task = header.get("task")
    if not isinstance(task, int) or isinstance(task, bool):
        raise ValueError("field 'task' missing or not an integer")
    return task


def set_task_paused(master: "Master", header: dict[str, Any], paused: bool) -> Reply:
    """Pause one task (held back; a running attempt is killed and not counted) or resume it (queued again, first)."""
    name, task = _str(header, "sweep"), _task_arg(header)
    row = master.store.task(name, task)
    if row is None:
        return _fail("not_found", f"sweep {name!r} has no task {task}")
    active = master.scheduler.active.get(name)
    wanted = ("queued", "running") if paused else ("paused",)
    if active is None or row["state"] not in wanted:
        return _fail("conflict", f"task {task} of {name!r} is {row['state']}: only a "
                                 f"{' or '.join(wanted)} task can be {'paused' if paused else 'resumed'}")
    if paused:
        master._unqueue(name, task)
        running = master.scheduler.siblings(name, task)
        for ticket in running:
            master._cancel_ticket(ticket, "task paused")
        master.store.hold_task(name, task, refund=bool(running))
        active.held.add(task)
        return {"ok": True, "state": "paused"}
    active.held.discard(task)
    master.store.requeue_task(name, task)
    master.store.event("task_resumed", sweep=name, task=task)
    active.queued.appendleft(task)
    master._dispatch_hungry()
    return {"ok": True, "state": "queued"}


def prune(master: "Master", header: dict[str, Any]) -> Reply:
    """Prune expired results now (optionally with another keep_days than the configured one)."""
    keep = header.get("keep_days")
    if keep is not None and (not isinstance(keep, (int, float)) or isinstance(keep, bool) or keep < 0):
        raise ValueError("field 'keep_days' must be a number >= 0")
    return {"ok": True, **master.housekeeping.prune(time.time(), keep)}


def set_draining(master: "Master", header: dict[str, Any], draining: bool) -> Reply:
    """A draining slave gets no new tickets; the ones it runs finish normally."""
    name = _str(header, "slave")
    known = {s["name"] for s in master.store.slaves()}
    if name not in known and name not in master.by_name:
        return _fail("not_found", f"no slave named {name!r}")
    session = master.by_name.get(name)
    if draining:
        master.draining.add(name)
        master.store.slave_state(name, "draining" if session else "gone")
        master.store.event("slave_draining", detail={"slave": name})
    else:
        master.draining.discard(name)
        master.store.slave_state(name, "alive" if session else "gone")
        master.store.event("slave_undrained", detail={"slave": name})
        if session is not None:
            master._dispatch(session)
    return {"ok": True, "draining": draining}


def forget_results(master: "Master", header: dict[str, Any]) -> Reply:
    """Remove a sweep's stored results (after an HTTP collection with remove)."""
    name = _str(header, "sweep")
    if master.store.sweep(name) is None:
        return _fail("not_found", f"no sweep named {name!r}")
    for path in master.store.remove_results(name):
        (master.state_dir / path).unlink(missing_ok=True)
    shutil.rmtree(master.results_dir / name, ignore_errors=True)
    master.store.event("results_removed", sweep=name)
    return {"ok": True}


def live_slaves(master: "Master", header: dict[str, Any]) -> Reply:
    """What only the loop knows about connected slaves: credit, last heard, draining."""
    window = master.config.heartbeat_interval * master.config.liveness
    now = time.time()
    return {"ok": True, "slaves": {
        s.name: {"connected": True, "credit": s.credit, "last_heard": s.expiry - window,
                 "last_heartbeat": s.last_heartbeat or None, "seconds_since_heard": round(now - (s.expiry - window), 3),
                 "draining": s.name in master.draining, "heartbeat": s.info}
        for s in master.sessions.values()}, "draining": sorted(master.draining)}


OPS: dict[str, Callable[["Master", dict[str, Any]], Reply]] = {
    "cancel_sweep": cancel,
    "pause": lambda m, h: set_paused(m, h, True),
    "resume": lambda m, h: set_paused(m, h, False),
    "cancel_task": cancel_task,
    "pause_task": lambda m, h: set_task_paused(m, h, True),
    "resume_task": lambda m, h: set_task_paused(m, h, False),
    "prune": prune,
    "drain": lambda m, h: set_draining(m, h, True),
    "undrain": lambda m, h: set_draining(m, h, False),
    "forget_results": forget_results,
    "live_slaves": live_slaves,
    "alloc": lambda m, h: m.allocator.control(h),
}
