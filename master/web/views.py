"""The JSON bodies the read routes answer, built from the store (and the master's live view of its slaves)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from master.stats import SweepStats, all_sweep_stats, format_report, slave_stats
from master.store import Store
from master.web.context import WebContext
from master.web.errors import ApiError

API = "/api/v1"


def sweep_json(s: SweepStats, row: Any = None) -> dict[str, Any]:
    """A sweep's counts (`running` counts tasks a slave has started, `prefetched` those it holds ready)."""
    d = asdict(s)
    d["progress"] = round(s.settled / s.total, 4) if s.total else 1.0
    d["url"] = f"{API}/sweeps/{s.name}"
    if row is not None:
        d["created"], d["finished"] = row.created, row.finished
    return d


def live_slaves(ctx: WebContext) -> dict[str, Any] | None:
    """The master's view of its connected slaves (credit, last heard, last heartbeat), or None if it is away."""
    try:
        return ctx.link.call("live_slaves")  # a read: not ctx.control, which empties the answer cache
    except ApiError:
        return None


def sweeps_json(store: Store) -> list[dict[str, Any]]:
    rows = {r.name: r for r in store.sweeps()}
    return [sweep_json(s, rows.get(s.name)) for s in all_sweep_stats(store)]


def slaves_json(store: Store, live: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every slave the store knows, with the live view of connected ones; `running` excludes prefetched tickets."""
    stored = {s["name"]: s for s in store.slaves()}
    connected = live["slaves"] if live is not None else {}
    draining = set(live.get("draining", ())) if live is not None else set()
    out = []
    for s in slave_stats(store):
        row = stored.get(s.name, {})
        d = asdict(s)
        d.update(version=row.get("version"), first_seen=row.get("first_seen"), last_seen=row.get("last_seen"),
                 disk=row.get("info", {}).get("disk"), connected=s.name in connected,
                 draining=s.name in draining or s.state == "draining")
        now = connected.get(s.name)
        if now is not None:
            hb = now.get("heartbeat") or {}
            d.update(last_heard=now["last_heard"], seconds_since_heard=now["seconds_since_heard"],
                     load=hb.get("load", d["load"]), memory=hb.get("memory", d["memory"]),
                     disk=hb.get("disk", d["disk"]))
        out.append(d)
    return out


def slave_counts(slaves: list[dict[str, Any]]) -> dict[str, int]:
    """Slaves by state, their slots, and `busy`: tickets running on them (prefetched ones not counted)."""
    states: dict[str, int] = {}
    for s in slaves:
        states[s["state"]] = states.get(s["state"], 0) + 1
    return {"alive": states.get("alive", 0), "draining": states.get("draining", 0), "gone": states.get("gone", 0),
            "slots": sum(s["slots"] or 0 for s in slaves if s["state"] in ("alive", "draining")),
            "busy": sum(s["running"] for s in slaves), "prefetched": sum(s["prefetched"] for s in slaves)}


def status_json(ctx: WebContext) -> dict[str, Any]:
    return status_body(ctx.store(), live_slaves(ctx), uptime(ctx))


def status_body(store: Store, live: dict[str, Any] | None, up: float | None) -> dict[str, Any]:
    """/status from a store (the CLI's `status --format json` too); `live` is the master's view, `up` its uptime."""
    slaves = slaves_json(store, live)
    return {"time": time.time(), "uptime": up, "sweeps": sweeps_json(store),
            "slaves": slave_counts(slaves), "last_event": store.last_event_id()}


def stats_json(ctx: WebContext) -> dict[str, Any]:
    return stats_body(ctx.store(), live_slaves(ctx), uptime(ctx))


def stats_body(store: Store, live: dict[str, Any] | None, up: float | None) -> dict[str, Any]:
    """What /status says about sweeps and slave counts, with each slave's row, failures and the text report."""
    sweeps = sweeps_json(store)
    slaves = slaves_json(store, live)
    return {"time": time.time(), "uptime": up, "sweeps": sweeps, "slaves": slaves,
            "slave_counts": slave_counts(slaves), "last_event": store.last_event_id(),
            "failures": {s["name"]: [{"task": i, "params": p, "reason": r}
                                     for i, p, r in store.failed_tasks(s["name"])[:100]] for s in sweeps if s["failed"]},
            "report": format_report(store)}


def uptime(ctx: WebContext) -> float | None:
    started = ctx.master.started
    return round(time.time() - started, 3) if started is not None else None


def throughput_json(store: Store, sweep: str | None, window: float, intervals: int, end: float) -> dict[str, Any]:
    """Tasks done and failed per interval over the `window` seconds up to `end`; intervals are aligned to their
    length so that every poller (and every refresh) sees the same boundaries."""
    step = window / intervals
    start = (math.floor(end / step) - intervals + 1) * step
    done, failed = [0] * intervals, [0] * intervals
    for n, state, count in store.finished_per_interval(start, step, sweep):
        if 0 <= n < intervals:
            (done if state == "done" else failed)[n] += count
    return {"sweep": sweep, "start": start, "step": step, "done": done, "failed": failed}
