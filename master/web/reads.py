"""Read routes: info, status, statistics, sweeps, tasks, failures, slaves, a ticket's progress, the page, metrics."""
from __future__ import annotations

import time
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import ticketfarm
from master.stats import sweep_stats
from master.web import models, views
from master.web.base import API, Json, cached_json, context, need
from master.web.errors import ApiError
from master.web.pins import pin_json
from ticketfarm import protocol

router = APIRouter()
READ = [Depends(need("read"))]
#: Largest page of tasks one request returns.
MAX_PAGE = 1000
SweepName = Path(description="the sweep's name")
TaskIndex = Path(ge=0, description="the task's index in its sweep")


def sweep_row(request: Request, name: str) -> Any:
    row = context(request).store().sweep(name)
    if row is None:
        raise ApiError("not_found", f"no sweep named {name!r}")
    return row


@router.get("/", operation_id="dashboard", response_class=HTMLResponse, include_in_schema=True,
            summary="The dashboard page (no data: it reads the API)")
def dashboard() -> HTMLResponse:
    return HTMLResponse(resources.files("master").joinpath("dashboard.html").read_bytes())


@router.get("/sweep/{sweep}", operation_id="sweepPage", response_class=HTMLResponse, include_in_schema=True,
            summary="The dashboard's page of one sweep: its tasks and failures (the same page, reading the API)")
def sweep_page(sweep: str = SweepName) -> HTMLResponse:
    return dashboard()


@router.get("/metrics", operation_id="metrics", dependencies=READ, summary="Prometheus metrics of master and API",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    ctx = context(request)
    try:
        master = ctx.link.call("metrics")["text"].encode()
    except ApiError:
        master = b"# the master did not answer: its metrics are missing from this scrape\n"
    return Response(master + request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(f"{API}/info", operation_id="getInfo", dependencies=READ, response_model=None,
            responses={200: {"model": models.Info}})
def info(request: Request) -> Json:
    ctx = context(request)
    return Json({"name": "ticketfarm", "version": ticketfarm.__version__, "protocol": protocol.VERSION,
                 "epoch": ctx.master.epoch, "started": ctx.master.started, "uptime": views.uptime(ctx),
                 "endpoint": ctx.master.endpoint, "http": ctx.url,
                 "auth": {"open_reads": ctx.open_reads, "tokens": len(ctx.tokens)}})


@router.get(f"{API}/status", operation_id="getStatus", dependencies=READ, response_model=None,
            responses={200: {"model": models.Status}}, summary="Sweeps and slave counts (cached http_cache_ttl)")
async def status(request: Request) -> Json:
    return await cached_json(request, lambda: views.status_json(context(request)))


@router.get(f"{API}/stats", operation_id="getStats", dependencies=READ, response_model=None,
            responses={200: {"model": models.Stats}}, summary="/status with slave rows, failures and the report")
async def stats(request: Request) -> Json:
    return await cached_json(request, lambda: views.stats_json(context(request)))


@router.get(f"{API}/sweeps", operation_id="listSweeps", dependencies=READ, response_model=None,
            responses={200: {"model": models.SweepList}})
async def list_sweeps(request: Request) -> Json:
    ctx = context(request)
    return await cached_json(request, lambda: {"sweeps": views.sweeps_json(ctx.store())})


@router.get(f"{API}/sweeps/{{sweep}}", operation_id="getSweep", dependencies=READ, response_model=None,
            responses={200: {"model": models.SweepDetail}, **models.error_responses(404)})
def get_sweep(request: Request, sweep: str = SweepName) -> Json:
    ctx = context(request)
    row = sweep_row(request, sweep)
    store = ctx.store()
    stats = sweep_stats(store, row.name)
    spec = row.sweep()
    live = views.live_slaves(ctx)
    d = views.sweep_json(stats, row)
    d["spec"] = {"command": spec.command, "argv": spec.argv, "timeout": spec.timeout,
                 "max_attempts": spec.max_attempts, "priority": spec.priority,
                 "parameters": store.param_names(row.name), "results": spec.results,
                 "collect": [asdict(c) for c in spec.collect], "slaves": spec.slaves}
    d["pin"] = pin_json(spec.slaves, d["queued"] if row.state in ("active", "paused") else 0, store, live)
    d["callback"] = store.callback(row.name) is not None
    d["results_removed"] = store.results_removed(row.name)
    return Json(d)


@router.get(f"{API}/sweeps/{{sweep}}/tasks", operation_id="listTasks", dependencies=READ, response_model=None,
            responses={200: {"model": models.TaskPage}, **models.error_responses(400, 404)})
def list_tasks(request: Request, sweep: str = SweepName, state: models.TaskState | None = None,
               offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=MAX_PAGE)) -> Json:
    store = context(request).store()
    row = sweep_row(request, sweep)
    counts = store.task_counts(row.name)
    total = counts.get(state, 0) if state else sum(counts.values())
    tasks = store.tasks_page(row.name, state, offset, limit)
    return Json({"sweep": row.name, "state": state, "offset": offset, "limit": limit, "total": total,
                 "next": offset + limit if offset + limit < total else None, "tasks": tasks})


@router.get(f"{API}/sweeps/{{sweep}}/tasks/{{task}}", operation_id="getTask", dependencies=READ,
            response_model=None, responses={200: {"model": models.TaskDetail}, **models.error_responses(400, 404)})
def get_task(request: Request, sweep: str = SweepName, task: int = TaskIndex) -> Json:
    store = context(request).store()
    row = sweep_row(request, sweep)
    found = store.task(row.name, task)
    if found is None:
        raise ApiError("not_found", f"sweep {row.name!r} has no task {task}")
    found["attempts_list"] = store.attempts_of(row.name, task)
    found["results"] = [{"name": o.name, "size": o.size,
                         "url": f"{API}/sweeps/{row.name}/tasks/{task}/results/{o.name}"}
                        for o in sorted(store.outputs(row.name, task).values(), key=lambda o: o.name)]
    return Json(found)


@router.get(f"{API}/throughput", operation_id="getThroughput", dependencies=READ, response_model=None,
            responses={200: {"model": models.Throughput}, **models.error_responses(400, 404)},
            summary="Tasks done and failed per interval, of every sweep or of one (cached http_cache_ttl)")
async def throughput(request: Request, sweep: str | None = None,
                     window: float = Query(600.0, ge=10, le=7 * 86400, description="seconds to look back"),
                     intervals: int = Query(60, ge=1, le=500, description="how many intervals"),
                     end: float | None = Query(None, description="the window's end (Unix time; default now), e.g. "
                                                                 "an ended sweep's `finished`")) -> Json:
    ctx = context(request)
    if sweep is not None:
        sweep_row(request, sweep)
    return await cached_json(request, lambda: views.throughput_json(ctx.store(), sweep, window, intervals,
                                                                    time.time() if end is None else end))


@router.get(f"{API}/sweeps/{{sweep}}/failures", operation_id="listFailures", dependencies=READ,
            response_model=None, responses={200: {"model": models.FailureList}, **models.error_responses(404)})
def failures(request: Request, sweep: str = SweepName) -> Json:
    row = sweep_row(request, sweep)
    return Json({"sweep": row.name, "failures": [{"task": i, "params": p, "reason": r}
                                                 for i, p, r in context(request).store().failed_tasks(row.name)]})


@router.get(f"{API}/tickets/{{ticket}}/progress", operation_id="getTicketProgress", dependencies=READ,
            response_model=None, responses={200: {"model": models.Progress}, **models.error_responses(400, 404)})
def progress(request: Request, ticket: int = Path(ge=0)) -> Json:
    ctx = context(request)
    row = ctx.store().ticket(ticket)
    if row is None:
        raise ApiError("not_found", f"no ticket {ticket}")
    output = ctx.link.call("progress", ticket=ticket)["output"] if row.state == "running" else ""
    return Json({"ticket": row.id, "sweep": row.sweep, "task": row.task, "slave": row.slave,
                 "state": row.state, "output": output})


@router.get(f"{API}/slaves", operation_id="listSlaves", dependencies=READ, response_model=None,
            responses={200: {"model": models.SlaveList}})
async def list_slaves(request: Request) -> Json:
    ctx = context(request)
    return await cached_json(request, lambda: {
        "slaves": views.slaves_json(ctx.store(), views.live_slaves(ctx)), "time": time.time()})
