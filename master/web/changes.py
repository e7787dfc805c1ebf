"""Routes that change something: each is one CONTROL message to the master (submit, cancel, pause, drain, ...)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool

from master.web import models
from master.web.base import API, Json, context, need
from master.web.errors import ApiError
from master.web.reads import SweepName, TaskIndex, sweep_row
from master.web.submission import TOML_TYPES, body_fields, parse_submission

router = APIRouter()
SUBMIT = [Depends(need("submit"))]
ADMIN = [Depends(need("admin"))]
CHANGE_ERRORS = models.error_responses(400, 401, 403, 404, 409, 503)


async def read_body(request: Request, limit: int, what: str = "http_max_body") -> bytes:
    """The request body, refused with 413 past `limit` bytes (announced or sent); `what` names the limit."""
    length = request.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError("too_large", f"request body of {length} bytes exceeds {what} ({limit})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError("too_large", f"request body exceeds {what} ({limit})")
    return bytes(body)


def _op(request: Request, op: str, **fields: Any) -> Json:
    reply = context(request).control(op, **fields)
    reply.pop("ok", None)
    return Json(reply)


@router.post(f"{API}/sweeps", operation_id="submitSweep", status_code=201, response_model=None,
             summary="Submit a sweep (201), or find the same one again (200)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}},
                 **{t: {"schema": {"type": "string", "description": "the spec as TOML"}} for t in TOML_TYPES}}}},
             responses={200: {"model": models.Submitted, "description": "the same spec was submitted before"},
                        201: {"model": models.Submitted, "description": "submitted; Location names it"},
                        **models.error_responses(400, 401, 403, 409, 413, 415, 503)})
async def submit(request: Request, scopes: set[str] = Depends(need("submit"))) -> Json:
    ctx = context(request)
    raw = await read_body(request, ctx.config.http_max_body)
    data = body_fields(request.headers.get("Content-Type") or "", raw)
    sweep, extra = await run_in_threadpool(parse_submission, data, ctx.config.http_allow_master_code,
                                           "admin" in scopes)
    reply = await run_in_threadpool(ctx.control, "submit", **sweep.submit_fields(), **extra)
    url = f"{API}/sweeps/{sweep.name}"
    body = {"sweep": sweep.name, "state": reply["state"], "tasks": len(sweep.params), "url": url}
    return Json(body, 201 if reply["state"] == "submitted" else 200, {"Location": url})


def _change(kind: str, path: str, operation_id: str, op: str) -> None:
    """POST .../{kind}s/{name}/`path`: CONTROL `op` on that sweep (submit scope) or slave (admin scope)."""

    def change(request: Request, name: str = Path(alias=kind, description=f"the {kind}'s name")) -> Json:
        return _op(request, op, **{kind: name})

    reply = models.StateReply if kind == "sweep" else models.Draining
    router.post(f"{API}/{kind}s/{{{kind}}}/{path}", operation_id=operation_id,
                dependencies=SUBMIT if kind == "sweep" else ADMIN, response_model=None,
                responses={200: {"model": reply}, **CHANGE_ERRORS})(change)


for _kind, _path, _operation, _control in (
        ("sweep", "cancel", "cancelSweep", "cancel_sweep"), ("sweep", "pause", "pauseSweep", "pause"),
        ("sweep", "resume", "resumeSweep", "resume"), ("slave", "drain", "drainSlave", "drain"),
        ("slave", "undrain", "undrainSlave", "undrain")):
    _change(_kind, _path, _operation, _control)


@router.post(f"{API}/sweeps/{{sweep}}/tasks/{{task}}/cancel", operation_id="cancelTask", dependencies=SUBMIT,
             response_model=None, responses={200: {"model": models.StateReply}, **CHANGE_ERRORS})
def cancel_task(request: Request, sweep: str = SweepName, task: int = TaskIndex) -> Json:
    return _op(request, "cancel_task", sweep=sweep, task=task)


@router.delete(f"{API}/sweeps/{{sweep}}/results", operation_id="removeResults", dependencies=SUBMIT,
               response_model=None, responses={200: {"model": models.Removed}, **CHANGE_ERRORS})
def remove_results(request: Request, sweep: str = SweepName) -> Json:
    row = sweep_row(request, sweep)
    if row.state not in ("finished", "cancelled"):
        raise ApiError("conflict", f"sweep {row.name!r} is {row.state}: results are removed only after it ended")
    return _op(request, "forget_results", sweep=row.name)


@router.post(f"{API}/shutdown", operation_id="shutdownMaster", dependencies=ADMIN, status_code=202,
             response_model=None, responses={202: {"model": models.StateReply}, **CHANGE_ERRORS},
             summary="Stop the master cleanly (as SIGTERM does): results committed and acknowledged, slaves told")
def shutdown(request: Request) -> Json:
    return Json({"state": context(request).control("shutdown")["state"]}, 202)
