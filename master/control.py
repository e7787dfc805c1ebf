"""Control operations: every CONTROL op (CLI, HTTP API, python clients) in one table, answered after a commit."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from master.callbacks import CallbackSender
from master.collect import remove_results
from master.dispatch import Dispatch
from master.housekeeping import Housekeeping
from master.intake import Intake
from master.lifecycle import Lifecycle
from master.link import Link
from master.pysweep import PythonSweeps
from master.roster import Roster
from master.stats import all_sweep_stats, format_report
from master.store import FINAL_TASK_STATES, Store
from ticketfarm import messages
from ticketfarm.errors import ConfigError, RetryRefused, SweepExists
from ticketfarm.spec import ParamLines, Sweep

Reply = tuple[dict[str, Any], list[bytes]]
#: One control op: (sender's routing id, the CONTROL message) -> (REPLY fields, REPLY payload).
Op = Callable[[bytes, messages.Control], Reply]


def refused(code: str, message: str) -> Reply:
    """A refused operation; `code` is one of the HTTP API's error codes (not_found, conflict, bad_request)."""
    return {"ok": False, "code": code, "error": message}, []


def done(**fields: Any) -> Reply:
    return {"ok": True, **fields}, []


def sweep_and_task(msg: messages.Control) -> tuple[str, int]:
    args = msg.args()
    return args.text("sweep", empty=False), args.count("task")


class Control:
    """Answers CONTROL messages from `ops`; whoever asked reads the store next, so the answer follows a commit."""

    def __init__(self, *, epoch: int, state_dir: Path, callback_secret: str, store: Store, lifecycle: Lifecycle,
                 roster: Roster, dispatch: Dispatch, intake: Intake, python: PythonSweeps,
                 housekeeping: Housekeeping, callbacks: CallbackSender, link: Link, commit: Callable[[], None],
                 liveness_window: float, metrics_text: Callable[[], bytes], stop: Callable[[], None],
                 refusals: Callable[[], list[dict[str, Any]]] = list):
        self.epoch = epoch
        self.state_dir = state_dir
        self.callback_secret = callback_secret
        self.store = store
        self.lifecycle = lifecycle
        self.roster = roster
        self.dispatch = dispatch
        self.intake = intake
        self.housekeeping = housekeeping
        self.callbacks = callbacks
        self.link = link
        self.commit = commit
        self.liveness_window = liveness_window
        #: The master's Prometheus text (op `metrics`: the HTTP process serves it on /metrics with its own).
        self.metrics_text = metrics_text
        #: Keys the master refused lately (ZapHandler.refusals), for `live_slaves`.
        self.refusals = refusals
        #: Ends the master's loop after this turn; closing it then commits, acknowledges and tells the slaves.
        self.stop = stop
        self.ops: dict[str, Op] = {
            "ping": lambda _, m: done(epoch=self.epoch, slaves=len(self.roster),
                                      slots=sum(s.slots for s in self.roster.sessions())),
            "submit": self.submit,
            "cancel": lambda _, m: ({"ok": self.lifecycle.cancel_sweep(m.args().text("sweep")) is not None}, []),
            "status": lambda _, m: done(sweeps=[asdict(s) for s in all_sweep_stats(self.store)]),
            "report": lambda _, m: done(report=format_report(self.store)),
            "progress": lambda _, m: done(output=self.intake.output_so_far(m.args().count("ticket"))),
            "cancel_sweep": self.cancel_sweep,
            "pause": lambda _, m: self.set_paused(m, True),
            "resume": lambda _, m: self.set_paused(m, False),
            "cancel_task": self.cancel_task,
            "pause_task": lambda _, m: self.set_task_paused(m, True),
            "resume_task": lambda _, m: self.set_task_paused(m, False),
            "prune": self.prune,
            "drain": lambda _, m: self.set_draining(m, True),
            "undrain": lambda _, m: self.set_draining(m, False),
            "forget_results": self.forget_results,
            "retry": self.retry,
            "forget": self.forget,
            "live_slaves": self.live_slaves,
            "metrics": lambda _, m: done(text=self.metrics_text().decode()),
            "shutdown": self.shutdown,
            "py_add": python.add,
            "py_watch": python.watch,
            "py_unwatch": python.unwatch,
            "py_fetch": python.fetch,
            "py_cancel": python.cancel,
            "py_ping": python.ping,
        }
        #: Ops whose answer comes from a slave (master/relay.py): answered when it arrives, nothing committed.
        self.later: dict[str, Callable[[bytes, messages.Control], Reply | None]] = {}

    def on_control(self, identity: bytes, msg: messages.Control) -> None:
        later = self.later.get(msg.op)
        if later is not None:
            try:
                answer = later(identity, msg)
            except (KeyError, TypeError, ValueError, OSError) as exc:  # ProtocolError is a ValueError
                answer = {"ok": False, "error": str(exc)}, []
            if answer is not None:  # else the slave's answer is relayed when it comes
                fields, payload = answer
                self.link.send(identity, messages.Reply(bool(fields.pop("ok", True)), fields, msg.rid, payload))
            return
        reply, payload = self.answer(identity, msg)
        ok = bool(reply.pop("ok", True))
        # A client with several requests in flight matches replies by its request id.
        self.link.send(identity, messages.Reply(ok, reply, msg.rid, payload))

    def answer(self, identity: bytes, msg: messages.Control) -> Reply:
        """Run one op and commit; the reply's fields include `ok` (in-process callers use this directly)."""
        op = self.ops.get(msg.op)
        payload: list[bytes] = []
        try:
            if op is None:
                reply: dict[str, Any] = {"ok": False, "error": f"unknown control op {msg.op!r}"}
            else:
                reply, payload = op(identity, msg)
        except (ConfigError, KeyError, TypeError, ValueError, OSError) as exc:  # ProtocolError is a ValueError
            reply = {"ok": False, "error": str(exc)}
        # Read-your-writes: whoever asked reads the store next (HTTP, CLI), so commit before answering.
        self.commit()
        return reply, payload

    # -- sweeps ---------------------------------------------------------------------------------------
    def submit(self, identity: bytes, msg: messages.Control) -> Reply:
        """Submit a sweep; an optional status_callback_url (+ secret) is stored in the same transaction."""
        args = msg.args()
        sweep = Sweep.from_json(args.text("sweep", empty=False, limit=1 << 30))
        if sweep.params:
            return refused("bad_request", "a submit carries the parameter rows in `params` (JSON lines), "
                                          "not in the spec")
        rows = ParamLines.parse(args.text("params", "", limit=1 << 30))
        url = msg.fields.get("status_callback_url")
        secret = msg.fields.get("status_callback_secret") or self.callback_secret
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                return refused("bad_request", "status_callback_url must be an http:// or https:// URL")
            if not secret:
                return refused("bad_request", "status_callback_secret is required (the master has no callback_secret)")
            if self.store.sweep(sweep.name) is None:
                # Same transaction as the sweep_submitted event: the sender finds the URL when it reads that event.
                self.store.set_callback(sweep.name, url, secret)
                self.callbacks.ensure_started()
        try:
            state = self.lifecycle.submit(sweep, rows)
        except SweepExists as exc:
            return refused("conflict", str(exc))
        if state == "submitted" and sweep.slaves:
            self.report_unknown_pins(sweep)
        return done(state=state)

    def report_unknown_pins(self, sweep: Sweep) -> None:
        """A pin naming slaves this master never saw waits for them: event `pin_unknown` says so at once."""
        known = {s["name"] for s in self.store.slaves()}
        unknown = [name for name in sweep.slaves if name not in known]
        if unknown:
            reason = (f"pinned to {', '.join(sweep.slaves)}; never seen by this master: {', '.join(unknown)} "
                      "(its tasks wait until one of them connects)")
            self.store.event("pin_unknown", sweep=sweep.name, detail={"slaves": unknown, "reason": reason})

    def cancel_sweep(self, identity: bytes, msg: messages.Control) -> Reply:
        name = msg.args().text("sweep", empty=False)
        row = self.store.sweep(name)
        if row is None:
            return refused("not_found", f"no sweep named {name!r}")
        if self.lifecycle.cancel_sweep(name) is None:
            return refused("conflict", f"sweep {name!r} is {row.state}: nothing to cancel")
        return done(state="cancelled")

    def set_paused(self, msg: messages.Control, paused: bool) -> Reply:
        name = msg.args().text("sweep", empty=False)
        row = self.store.sweep(name)
        if row is None:
            return refused("not_found", f"no sweep named {name!r}")
        if self.lifecycle.active(name) is None:
            return refused("conflict", f"sweep {name!r} is {row.state}: only an active or paused sweep can be "
                                       f"{'paused' if paused else 'resumed'}")
        self.lifecycle.set_paused(name, paused)
        return done(state="paused" if paused else "active")

    def forget_results(self, identity: bytes, msg: messages.Control) -> Reply:
        """Remove a sweep's stored results (after an HTTP collection with remove)."""
        name = msg.args().text("sweep", empty=False)
        if self.store.sweep(name) is None:
            return refused("not_found", f"no sweep named {name!r}")
        remove_results(self.store, self.state_dir, name)
        return done()

    def retry(self, identity: bytes, msg: messages.Control) -> Reply:
        """Queue failed tasks again with fresh attempts; `spec` (JSON) may change timeout and max_attempts."""
        args = msg.args()
        name = args.text("sweep", empty=False)
        task = args.count("task", None)
        spec_json = args.text("spec", None, limit=1 << 30)
        spec = None if spec_json is None else Sweep.from_json(spec_json)
        if spec is not None and spec.name != name:
            return refused("bad_request", f"the spec is sweep {spec.name!r}, not {name!r}")
        try:
            return done(tasks=self.lifecycle.retry(name, task, spec))
        except RetryRefused as exc:
            return refused("not_found" if self.store.sweep(name) is None else "conflict", str(exc))

    def forget(self, identity: bytes, msg: messages.Control) -> Reply:
        """Delete a settled sweep, its tasks and results (files too), so its name can start anew."""
        name = msg.args().text("sweep", empty=False)
        try:
            paths = self.lifecycle.forget(name)
        except RetryRefused as exc:
            return refused("not_found" if self.store.sweep(name) is None else "conflict", str(exc))
        for path in paths:
            (self.state_dir / path).unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "results" / name, ignore_errors=True)
        return done()

    def shutdown(self, identity: bytes, msg: messages.Control) -> Reply:
        """Stop the master as SIGTERM does: the answer goes out first, then the loop ends and close() runs."""
        self.stop()
        return done(state="stopping")

    def prune(self, identity: bytes, msg: messages.Control) -> Reply:
        """Prune expired results now (optionally with another keep_days than the configured one)."""
        keep = msg.fields.get("keep_days")
        if keep is not None and (not isinstance(keep, (int, float)) or isinstance(keep, bool) or keep < 0):
            raise ValueError("field 'keep_days' must be a number >= 0")
        return done(**self.housekeeping.prune(time.time(), keep))

    # -- one task -------------------------------------------------------------------------------------
    def cancel_task(self, identity: bytes, msg: messages.Control) -> Reply:
        """Cancel one task: dropped from the queue (or from the paused ones), its running tickets killed."""
        name, task = sweep_and_task(msg)
        row = self.store.task(name, task)
        if row is None:
            return refused("not_found", f"sweep {name!r} has no task {task}")
        if row["state"] in FINAL_TASK_STATES or not self.lifecycle.cancel_task(name, task, "task cancelled"):
            return refused("conflict", f"task {task} of {name!r} is {row['state']}: nothing to cancel")
        return done(state="cancelled")

    def set_task_paused(self, msg: messages.Control, paused: bool) -> Reply:
        """Pause one task (held back; a running attempt is killed, not counted) or resume it (queued again, first)."""
        name, task = sweep_and_task(msg)
        row = self.store.task(name, task)
        if row is None:
            return refused("not_found", f"sweep {name!r} has no task {task}")
        wanted = ("queued", "running") if paused else ("paused",)
        if self.lifecycle.active(name) is None or row["state"] not in wanted:
            return refused("conflict", f"task {task} of {name!r} is {row['state']}: only a "
                                       f"{' or '.join(wanted)} task can be {'paused' if paused else 'resumed'}")
        if paused:
            self.lifecycle.pause_task(name, task)
            return done(state="paused")
        self.lifecycle.resume_task(name, task)
        return done(state="queued")

    # -- slaves ---------------------------------------------------------------------------------------
    def set_draining(self, msg: messages.Control, draining: bool) -> Reply:
        """A draining slave gets no new tickets; the ones it runs finish normally."""
        name = msg.args().text("slave", empty=False)
        session = self.roster.named(name)
        if session is None and name not in {s["name"] for s in self.store.slaves()}:
            return refused("not_found", f"no slave named {name!r}")
        if draining:
            self.roster.draining.add(name)
        else:
            self.roster.draining.discard(name)
        self.store.slave_state(name, self.roster.state_of(name))
        self.store.event("slave_draining" if draining else "slave_undrained", detail={"slave": name})
        if session is not None and not draining:
            self.dispatch.serve(session)
        return done(draining=draining)

    def live_slaves(self, identity: bytes, msg: messages.Control) -> Reply:
        """What only the loop knows: connected slaves (credit, last heard, draining, tickets held), keys refused
        since they last got in, and the state dir (the playbooks check a rollout against all three)."""
        window, now, draining = self.liveness_window, time.time(), self.roster.draining
        return done(slaves={
            s.name: {"connected": True, "credit": s.credit, "last_heard": s.expiry - window,
                     "last_heartbeat": s.last_heartbeat or None,
                     "seconds_since_heard": round(now - (s.expiry - window), 3),
                     "draining": s.name in draining, "heartbeat": s.info,
                     "tickets": len(self.lifecycle.tickets_of(s.name))}
            for s in self.roster.sessions()}, draining=sorted(draining), refused=self.refusals(),
            state_dir=str(self.state_dir.resolve()))
