"""The job view the seed job servers' clients expect: one state word and an exit code per task, and DELETE."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from master.web import models
from master.web.base import API, Json, context, need
from master.web.errors import ApiError
from master.web.reads import MAX_PAGE, SweepName, sweep_row

router = APIRouter()
#: A task's state as a job server names it (a paused task waits like a queued one; cancelled = killed).
JOB_STATE = {"queued": "QUEUED", "paused": "QUEUED", "running": "RUNNING", "done": "DONE", "failed": "FAILED",
             "cancelled": "KILLED"}


def job_state(sweep_state: str, counts: dict[str, int]) -> str:
    """The whole job's state: KILLED if cancelled, FAILED if any task failed, else its furthest-behind task's."""
    if sweep_state == "cancelled":
        return "KILLED"
    if sweep_state == "finished":
        return "FAILED" if counts.get("failed") else "DONE"
    return "RUNNING" if counts.get("running") or counts.get("done") or counts.get("failed") else "QUEUED"


@router.get(f"{API}/sweeps/{{sweep}}/status", operation_id="getJobStatus", dependencies=[Depends(need("read"))],
            response_model=None, responses={200: {"model": models.JobStatus}, **models.error_responses(400, 404)},
            summary="The job's state and each task's state and exit code (QUEUED, RUNNING, DONE, FAILED, KILLED)")
def job_status(request: Request, sweep: str = SweepName, offset: int = Query(0, ge=0),
               limit: int = Query(100, ge=1, le=MAX_PAGE)) -> Json:
    store = context(request).store()
    row = sweep_row(request, sweep)
    counts = store.task_counts(row.name)
    total = sum(counts.values())
    tasks = store.tasks_page(row.name, None, offset, limit)
    codes = store.exit_codes(row.name, offset, offset + limit - 1)
    state = job_state(row.state, counts)
    return Json({"sweep": row.name, "state": state,
                 "exit_code": codes.get(0) if total == 1 else None,  # a single job's is the job's
                 "counts": {word: sum(n for s, n in counts.items() if JOB_STATE[s] == word)
                            for word in ("QUEUED", "RUNNING", "DONE", "FAILED", "KILLED")},
                 "offset": offset, "limit": limit, "total": total,
                 "next": offset + limit if offset + limit < total else None,
                 "tasks": [{"task": t["task"], "state": JOB_STATE[t["state"]], "exit_code": codes.get(t["task"]),
                            "attempts": t["attempts"], "reason": t["reason"]} for t in tasks]})


@router.delete(f"{API}/sweeps/{{sweep}}", operation_id="deleteSweep", dependencies=[Depends(need("submit"))],
               response_model=None, responses={200: {"model": models.Deleted},
                                               **models.error_responses(400, 401, 403, 404, 503)},
               summary="Cancel the sweep (if it still runs) and remove its results")
async def delete_sweep(request: Request, sweep: str = SweepName) -> Json:
    ctx = context(request)
    row = sweep_row(request, sweep)
    cancelled = False
    if row.state not in ("finished", "cancelled"):
        try:
            await run_in_threadpool(ctx.control, "cancel_sweep", sweep=row.name)
            cancelled = True
        except ApiError as exc:
            if exc.code != "conflict":  # it ended meanwhile: its results go all the same
                raise
    await run_in_threadpool(ctx.control, "forget_results", sweep=row.name)
    state = sweep_row(request, row.name).state
    return Json({"sweep": row.name, "state": state, "cancelled": cancelled, "results_removed": True})
