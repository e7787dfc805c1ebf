"""A task's sandbox over HTTP: upload files into it, list and download its files while it runs and after it ended.

An upload is kept on the master for every attempt of the task, and written into the running one's work dir.

After the end the work dir is gone (its slave removes it once the result is stored); what stays are the files its
`file:` results collected, at their paths in the work dir. Before it starts, the files uploaded so far.
"""
from __future__ import annotations

from pathlib import Path as FilePath
from typing import Any, Iterator

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from master.collect import output_chunks
from master.store import StoredOutput
from master.web import models
from master.web.base import API, Json, context, need
from master.web.changes import read_body
from master.web.context import WebContext
from master.web.errors import ApiError
from master.web.reads import SweepName, TaskIndex, sweep_row
from ticketfarm import template
from ticketfarm.errors import ProtocolError
from ticketfarm.messages.fields import relative_path
from ticketfarm.messages.relay import SANDBOX_CHUNK, SANDBOX_MAX_FILE
from ticketfarm.spec import Sweep

router = APIRouter()
BASE = f"{API}/sweeps/{{sweep}}/tasks/{{task}}/sandbox"
FilePathParam = Path(description="the file's path in the work dir (relative, no '..')")
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def checked_path(path: str) -> str:
    try:
        return relative_path("sandbox", "path", path)
    except ProtocolError as exc:
        raise ApiError("bad_request", str(exc), field="path") from None


def task_row(request: Request, sweep: str, task: int) -> tuple[Any, dict[str, Any]]:
    row = sweep_row(request, sweep)
    found = context(request).store().task(row.name, task)
    if found is None:
        raise ApiError("not_found", f"sweep {row.name!r} has no task {task}")
    return row, found


def relayed(ctx: WebContext, op: str, fields: dict[str, Any],
            payload: list[bytes] | None = None) -> tuple[dict[str, Any], list[bytes]]:
    """A sandbox op answered by the task's slave: waited for as long as the master waits for it, and a bit."""
    return ctx.link.exchange(op, fields, payload, ctx.config.relay_timeout + 5)


def staged_dir(ctx: WebContext, sweep: str, task: int) -> FilePath:
    return ctx.state_dir / "sandbox" / sweep / str(task)


def kept_files(spec: Sweep, task: dict[str, Any], outputs: dict[str, StoredOutput]) -> dict[str, StoredOutput]:
    """A settled task's stored results that came from files, by their path in its work dir."""
    values = {**task["params"], "task": task["task"], "sweep": spec.name, "ticket": task["ticket"]}
    out = {}
    for name, output in outputs.items():
        result, _, inside = name.partition("/")
        source = spec.results.get(result, "")
        if not source.startswith("file:"):
            continue
        try:
            out[inside or template.render(source[5:], values)] = output
        except (KeyError, ValueError):  # a path made of what only the slave knew ({workdir}, {attempt})
            continue
    return out


@router.put(f"{BASE}/{{path:path}}", operation_id="putSandboxFile", status_code=201, response_model=None,
            summary="Upload a file into a queued or running task's sandbox (the body is the file, ≤ 4 MiB)",
            openapi_extra={"requestBody": {"required": True, "content": BINARY}},
            responses={201: {"model": models.SandboxPut},
                       **models.error_responses(400, 401, 403, 404, 409, 413, 502, 503, 504)})
async def put_file(request: Request, sweep: str = SweepName, task: int = TaskIndex, path: str = FilePathParam,
                   scopes: set[str] = Depends(need("submit"))) -> Json:
    ctx = context(request)
    path = checked_path(path)
    row, _ = task_row(request, sweep, task)
    body = await read_body(request, SANDBOX_MAX_FILE, "the largest sandbox file")
    reply, _ = await run_in_threadpool(relayed, ctx, "sandbox_put", {"sweep": row.name, "task": task, "path": path},
                                       [body])
    return Json({"sweep": row.name, "task": task, "path": path, "size": len(body), "placed": reply["placed"]}, 201)


@router.get(BASE, operation_id="listSandbox", dependencies=[Depends(need("read"))], response_model=None,
            summary="A task's files: its work dir while it runs, its uploads before, its kept files after",
            responses={200: {"model": models.SandboxList}, **models.error_responses(400, 404, 409, 502, 503, 504)})
def list_files(request: Request, sweep: str = SweepName, task: int = TaskIndex) -> Json:
    ctx = context(request)
    row, found = task_row(request, sweep, task)
    state = found["state"]
    url = f"{API}/sweeps/{row.name}/tasks/{task}/sandbox/"
    if state == "running":
        files = relayed(ctx, "sandbox_list", {"sweep": row.name, "task": task})[0]["files"]
        where = "work dir"
    elif state in ("queued", "paused"):
        base = staged_dir(ctx, row.name, task)
        files = [{"path": p.relative_to(base).as_posix(), "size": p.stat().st_size, "mtime": p.stat().st_mtime}
                 for p in sorted(base.rglob("*")) if p.is_file()]
        where = "uploads"
    else:
        kept = kept_files(row.sweep(), found, ctx.store().outputs(row.name, task))
        files = [{"path": p, "size": o.size, "mtime": None} for p, o in sorted(kept.items())]
        where = "results"
    return Json({"sweep": row.name, "task": task, "state": state, "where": where,
                 "files": [{**f, "url": url + f["path"]} for f in files]})


@router.get(f"{BASE}/{{path:path}}", operation_id="getSandboxFile", dependencies=[Depends(need("read"))],
            response_class=StreamingResponse, summary="Download one of the task's files (see listSandbox)",
            responses={200: {"content": BINARY}, **models.error_responses(400, 404, 409, 502, 503, 504)})
def get_file(request: Request, sweep: str = SweepName, task: int = TaskIndex,
             path: str = FilePathParam) -> StreamingResponse:
    ctx = context(request)
    path = checked_path(path)
    row, found = task_row(request, sweep, task)
    state = found["state"]
    headers = {"Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1].replace(chr(34), "")}"'}
    if state == "running":
        fields = {"sweep": row.name, "task": task, "path": path, "offset": 0, "length": SANDBOX_CHUNK}
        first, payload = relayed(ctx, "sandbox_get", fields)
        return StreamingResponse(_live_chunks(ctx, fields, first["size"], payload[0]),
                                 media_type="application/octet-stream", headers=headers)
    if state in ("queued", "paused"):
        staged = staged_dir(ctx, row.name, task) / path
        if not staged.is_file():
            raise ApiError("not_found", f"no file {path!r} was uploaded into task {task} of {row.name!r}")
        return StreamingResponse(iter([staged.read_bytes()]), media_type="application/octet-stream", headers=headers)
    kept = kept_files(row.sweep(), found, ctx.store().outputs(row.name, task))
    if path not in kept:
        raise ApiError("not_found", f"task {task} of {row.name!r} is {state}: its work dir is gone, and no `file:` "
                                    f"result kept {path!r} (kept: {', '.join(sorted(kept)) or 'none'})")
    return StreamingResponse(output_chunks(ctx.state_dir, kept[path]), media_type="application/octet-stream",
                             headers={**headers, "Content-Length": str(kept[path].size)})


def _live_chunks(ctx: WebContext, fields: dict[str, Any], size: int, first: bytes) -> Iterator[bytes]:
    """A running task's file piece by piece, up to the size it had at the first piece."""
    yield first
    offset = len(first)
    while first and offset < size:
        _, payload = relayed(ctx, "sandbox_get", {**fields, "offset": offset})
        first = payload[0]
        offset += len(first)
        yield first
