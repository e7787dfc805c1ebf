"""The CLI's read-only views (status, stats, slaves, tasks): the HTTP API's bodies, as a table or as JSON.

Each view is one JSON body, the same whichever way it is read: from the master's HTTP API when the CLI uses
one, else from the state dir's store (with the running master's live view of its slaves when one answers).
`--format json` prints that body (docs/CLI.md lists the fields); the table is drawn from it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from master.config import master_config_path
from master import stats
from master.stats import table
from master.store import Store
from master.web import views
from ticketfarm import cli_http
from ticketfarm.cli_options import client_keys, endpoint
from ticketfarm.client.control import control
from ticketfarm.client.http import ApiClient
from ticketfarm.errors import ConfigError, MasterRefused, MasterUnreachable

API = "/api/v1"
#: Tasks read from the store at a time.
PAGE = 1000
#: Longest reason a `tasks` table shows (its first line); `--format json` has the whole reason.
REASON_WIDTH = 72


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="a table for people (default), or JSON for scripts (fields: docs/CLI.md)")


def cmd_status(args: argparse.Namespace) -> int:
    return show(args, body(args, "status"), status_table)


def cmd_stats(args: argparse.Namespace) -> int:
    return show(args, body(args, "stats"), lambda b: b["report"])


def cmd_slaves(args: argparse.Namespace) -> int:
    return show(args, body(args, "slaves"), slaves_table)


def cmd_tasks(args: argparse.Namespace) -> int:
    return show(args, body(args, "tasks", args.sweep), tasks_table)


def show(args: argparse.Namespace, data: dict[str, Any], draw: Callable[[dict[str, Any]], str]) -> int:
    print(json.dumps(data, indent=2) if args.format == "json" else draw(data))
    return 0


def status_table(data: dict[str, Any]) -> str:
    return stats.status_table(data["sweeps"])


def slaves_table(data: dict[str, Any]) -> str:
    return table(["slave", "platform", "slots", "state", "running", "done", "failed", "busy s"],
                 [[s["name"], s["platform"], s["slots"], s["state"], s["running"], s["done"], s["failed"], s["busy"]]
                  for s in data["slaves"]])


def tasks_table(data: dict[str, Any]) -> str:
    def reason(text: str | None) -> str:
        first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
        return first if len(first) <= REASON_WIDTH else first[:REASON_WIDTH - 3] + "..."

    return table(["task", "state", "attempts", "slave", "elapsed s", "exit", "reason"],
                 [[t["task"], t["state"], t["attempts"], t["slave"], t["elapsed"], t["exit_code"], reason(t["reason"])]
                  for t in data["tasks"]])


# -- where a view is read from ------------------------------------------------------------------
def body(args: argparse.Namespace, view: str, sweep: str | None = None) -> dict[str, Any]:
    """The view's body: from the HTTP API when the CLI has one (an API that does not answer falls back to the
    store, unless --http named it), else from the store, else (no store here) what the master says over CONTROL."""
    api = cli_http.http_api(args)
    if api is not None:
        try:
            return from_api(api, view, sweep)
        except MasterUnreachable:
            if args.http:
                raise
    if (args.state / "state.db").exists():
        return from_store(args.state, view, sweep, live_slaves(args))
    if args.master and view in ("status", "stats") and getattr(args, "format", "table") == "table":
        reply = control(args.master, "status" if view == "status" else "report", keys=client_keys(args))
        return reply
    raise ConfigError(f"{args.state}: no ticketfarm state here (no state.db), so no {view} to show: pass --state "
                      "DIR of the master's state dir, or --http URL of its HTTP API")


def from_api(api: ApiClient, view: str, sweep: str | None) -> dict[str, Any]:
    if view != "tasks":
        return api.get(f"{API}/{view}")
    assert sweep is not None
    base = f"{API}/sweeps/{quote(sweep, safe='')}/tasks"
    first = api.get(base)  # pages of the API's default size, following `next`
    tasks, offset = first["tasks"], first["next"]
    while offset is not None:
        page = api.get(f"{base}?offset={offset}")
        tasks, offset = tasks + page["tasks"], page["next"]
    return page_of_all(first["sweep"], tasks)


def from_store(state: Path, view: str, sweep: str | None, live: dict[str, Any] | None) -> dict[str, Any]:
    store = Store(state / "state.db", readonly=True)
    try:
        if view == "status":
            return views.status_body(store, live, None)
        if view == "stats":
            return views.stats_body(store, live, None)
        if view == "slaves":
            return {"slaves": views.slaves_json(store, live), "time": time.time()}
        assert sweep is not None
        return tasks_body(store, state, sweep)
    finally:
        store.close()


def tasks_body(store: Store, state: Path, sweep: str) -> dict[str, Any]:
    row = store.sweep(sweep)
    if row is None:
        known = ", ".join(repr(r.name) for r in store.sweeps()[:10]) or "none yet"
        raise MasterRefused(f"no sweep named {sweep!r} in {state} (known: {known}); `ticketfarm status` lists them")
    tasks: list[dict[str, Any]] = []
    while page := store.tasks_page(row.name, None, len(tasks), PAGE):
        tasks += page
    return page_of_all(row.name, tasks)


def page_of_all(sweep: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Every task as one page of the API's task list (its TaskPage schema)."""
    return {"sweep": sweep, "state": None, "offset": 0, "limit": len(tasks), "total": len(tasks), "next": None,
            "tasks": tasks}


def live_slaves(args: argparse.Namespace) -> dict[str, Any] | None:
    """The running master's view of its slaves (what is connected, prefetched), or None when none answers."""
    if not args.master and not master_config_path(args.state).exists():
        return None
    try:
        reply = control(endpoint(args), "live_slaves", timeout=2.0, keys=client_keys(args))
    except (MasterUnreachable, ConfigError):
        return None
    return reply if reply.get("ok") else None
