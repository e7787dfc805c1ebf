"""Routes of the allocation queues (slaves as batch jobs): each is one `alloc` CONTROL message to the master."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from master.web import models
from master.web.base import API, Json, context, need

router = APIRouter()
READ = [Depends(need("read"))]
ADMIN = [Depends(need("admin"))]
ERRORS = models.error_responses(400, 401, 403, 404, 409, 503)


def _alloc(request: Request, action: str, **fields: Any) -> Json:
    reply = context(request).control("alloc", action=action, **fields)
    reply.pop("ok", None)
    return Json(reply)


@router.get(f"{API}/allocations", operation_id="listAllocations", dependencies=READ, response_model=None,
            summary="Allocation queues: settings, last refused submission, jobs with state, exit code and reason",
            responses=models.error_responses(401, 403, 503))
def list_allocations(request: Request) -> Json:
    return _alloc(request, "list")


@router.post(f"{API}/allocations", operation_id="addAllocation", dependencies=ADMIN, response_model=None,
             summary="Add an allocation queue (the fields of master.toml's [alloc.NAME], with name)", responses=ERRORS)
def add_allocation(request: Request, queue: dict[str, Any] = Body(...)) -> Json:  # noqa: B008 - FastAPI's way
    return _alloc(request, "add", queue=queue)


@router.post(f"{API}/allocations/{{queue}}/pause", operation_id="pauseAllocation", dependencies=ADMIN,
             response_model=None, summary="Submit no more jobs from this queue", responses=ERRORS)
def pause_allocation(request: Request, queue: str) -> Json:
    return _alloc(request, "pause", queue=queue)


@router.post(f"{API}/allocations/{{queue}}/resume", operation_id="resumeAllocation", dependencies=ADMIN,
             response_model=None, summary="Submit jobs from this queue again", responses=ERRORS)
def resume_allocation(request: Request, queue: str) -> Json:
    return _alloc(request, "resume", queue=queue)


@router.delete(f"{API}/allocations/{{queue}}", operation_id="removeAllocation", dependencies=ADMIN,
               response_model=None, summary="Cancel every job of the queue and remove it", responses=ERRORS)
def remove_allocation(request: Request, queue: str) -> Json:
    return _alloc(request, "remove", queue=queue)
