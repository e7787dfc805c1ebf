"""Streamed answers: a task's result file, a sweep's collection (every format), the event stream (SSE, websocket)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from master.collect import (DOWNLOAD_NAMES, FORMATS, MEDIA_TYPES, Collector, ResultsRemoved, ensure_not_removed,
                            output_chunks)
from master.events import SWEEP_END_KINDS
from master.store import Store
from master.web import models
from master.web.base import API, context, need, presented_token, token_scopes
from master.web.context import WebContext
from master.web.errors import ApiError
from master.web.reads import SweepName, TaskIndex, sweep_row
from master.web.submission import json_object

router = APIRouter()
#: Seconds between two reads of the events table by one event stream.
SSE_POLL = 0.2
#: Seconds of silence after which an event stream sends a keep-alive comment.
SSE_KEEPALIVE = 10.0
#: Every media type a collection answers, by format (the format picks one).
COLLECT_CONTENT = {MEDIA_TYPES[f].split(";")[0]: {"schema": {"type": "string", "format": "binary"}}
                   for f in FORMATS}
COLLECT_DOC = ("concat: application/octet-stream; blockwise: text/plain; csv and failed: text/csv; jsonl: "
               "application/x-ndjson; folders: application/x-tar (`<task>/params.json` and `<task>/<result>`). "
               "Table cells that are not UTF-8 text come as `base64:<data>` (CSV) or `{\"base64\": ...}` (JSON lines).")


def _closing(store: Store, chunks: Iterator[bytes], after: Callable[[], Any] | None = None) -> Iterator[bytes]:
    """The chunks, then `after` once all were made; the stream's own store is closed however it ends."""
    try:
        yield from chunks
        if after is not None:
            after()
    finally:
        store.close()


@router.get(f"{API}/sweeps/{{sweep}}/tasks/{{task}}/results/{{name:path}}", operation_id="getResultFile",
            dependencies=[Depends(need("read"))], response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}},
                       **models.error_responses(400, 404, 410)})
def result_file(request: Request, sweep: str = SweepName, task: int = TaskIndex, name: str = ...) -> StreamingResponse:
    ctx = context(request)
    row = sweep_row(request, sweep)
    gone_after_removal(ctx.store(), row.name)
    output = ctx.store().outputs(row.name, task).get(name)
    if output is None:
        raise ApiError("not_found", f"task {task} of {row.name!r} has no stored result {name!r}")
    filename = name.replace("/", "_").replace('"', "")
    return StreamingResponse(output_chunks(ctx.state_dir, output), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Content-Length": str(output.size)})


def gone_after_removal(store: Store, sweep: str) -> None:
    """410 with the reason when the sweep's results were removed (a removing collect, DELETE)."""
    try:
        ensure_not_removed(store, sweep)
    except ResultsRemoved as exc:
        raise ApiError("gone", str(exc), removed=exc.removed) from None


def _collection(request: Request, sweep: str, fmt: str, result: str | None, remove: bool) -> StreamingResponse:
    ctx = context(request)
    row = sweep_row(request, sweep)
    spec = row.sweep()
    if fmt not in FORMATS:
        raise ApiError("bad_request", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", field="format")
    if result is not None and result not in spec.results:
        raise ApiError("bad_request", f"no result named {result!r} (known: {', '.join(spec.results)})",
                       field="result")
    if remove and row.state not in ("finished", "cancelled"):
        raise ApiError("conflict", f"sweep {row.name!r} is {row.state}: results are removed only after it ended")
    if fmt != "failed":
        gone_after_removal(ctx.store(), row.name)
    store = Store(ctx.db_path, readonly=True)
    after = (lambda: ctx.control("forget_results", sweep=row.name)) if remove else None
    chunks = _closing(store, Collector(store, ctx.state_dir, spec).chunks(fmt, result), after)
    return StreamingResponse(chunks, media_type=MEDIA_TYPES[fmt],
                             headers={"Content-Disposition": f'attachment; filename="{DOWNLOAD_NAMES[fmt].format(row.name)}"'})


@router.get(f"{API}/sweeps/{{sweep}}/collect", operation_id="collectSweep", dependencies=[Depends(need("read"))],
            response_class=StreamingResponse, description=COLLECT_DOC,
            responses={200: {"content": COLLECT_CONTENT}, **models.error_responses(400, 404, 410)})
def collect(request: Request, sweep: str = SweepName, format: str = Query("csv", json_schema_extra={"enum": list(FORMATS)}),
            result: str | None = None) -> StreamingResponse:
    return _collection(request, sweep, format, result, False)


@router.post(f"{API}/sweeps/{{sweep}}/collect", operation_id="collectSweepAndRemove",
             dependencies=[Depends(need("submit"))], response_class=StreamingResponse,
             description=COLLECT_DOC + " With remove: the results are removed once the whole answer was sent.",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/CollectBody"}}}}},
             responses={200: {"content": COLLECT_CONTENT}, **models.error_responses(400, 401, 403, 404, 409, 410)})
async def collect_remove(request: Request, sweep: str = SweepName) -> StreamingResponse:
    try:
        body = models.CollectBody.model_validate(json_object(await request.body()), strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ApiError("bad_request", f"field {field!r}: {first['msg']}", field=field) from None
    return _collection(request, sweep, body.format, body.result, body.remove)


@router.get(f"{API}/events", operation_id="streamEvents", dependencies=[Depends(need("read"))],
            response_class=StreamingResponse,
            description="Server-sent events: `id:` the event id, `event:` its kind, `data:` an Event (JSON). With "
                        "`sweep`, from that sweep's first event; else from the newest. `Last-Event-ID` or `after` "
                        "resume; `until_end=1` (needs `sweep`) closes the stream after the sweep ended. The same "
                        "events, one JSON text message each, on the websocket `/api/v1/events/ws` (same query).",
            responses={200: {"content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}}},
                       **models.error_responses(400, 404)})
async def events(request: Request, sweep: str | None = None, after: int | None = Query(None, ge=0),
                 until_end: bool = False,
                 last_event_id: str | None = Header(None, alias="Last-Event-ID")) -> StreamingResponse:
    store, cursor = _open_events(context(request), sweep, after, until_end, last_event_id)
    # The content type as a header: Starlette would add "; charset=utf-8" to a text/* media type.
    return StreamingResponse(_sse(_events_after(context(request), store, cursor, sweep, until_end)),
                             headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})


@router.websocket(f"{API}/events/ws")
async def events_ws(websocket: WebSocket, sweep: str | None = None, after: int | None = Query(None, ge=0),
                    until_end: bool = False, token: str | None = None) -> None:
    """The event stream as websocket text messages, one Event (JSON) each; a refusal is one `{"error": ...}`
    message and close code 1008. The token: Authorization or X-Key header, or `token=` (browsers set no header)."""
    ctx = context(websocket)
    await websocket.accept()
    try:
        token_scopes(ctx, token or presented_token(websocket.headers), websocket.headers.get("Authorization", ""),
                     "read")
        store, cursor = _open_events(ctx, sweep, after, until_end, None)
    except ApiError as exc:
        await websocket.send_text(json.dumps(exc.body()))
        await websocket.close(1008, exc.message[:120])
        return
    sender = asyncio.create_task(_send_events(websocket, _events_after(ctx, store, cursor, sweep, until_end)))
    receiver = asyncio.create_task(_until_disconnect(websocket))
    await asyncio.wait((sender, receiver), return_when=asyncio.FIRST_COMPLETED)
    for task in (sender, receiver):
        task.cancel()
    if sender.done() and not sender.cancelled() and sender.exception() is None:
        await websocket.close(1000, "sweep ended" if until_end else "master stopping")


async def _send_events(websocket: WebSocket, events: AsyncIterator[dict[str, Any] | None]) -> None:
    async for event in events:
        if event is not None:  # keep-alive: uvicorn pings websockets itself
            await websocket.send_text(json.dumps(event, separators=(",", ":")))


async def _until_disconnect(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


def _open_events(ctx: WebContext, sweep: str | None, after: int | None, until_end: bool,
                 last_event_id: str | None) -> tuple[Store, int]:
    """A store for one event stream and the id it starts after; ApiError for a bad request."""
    store = Store(ctx.db_path, readonly=True)
    try:
        if sweep is not None and store.sweep(sweep) is None:
            raise ApiError("not_found", f"no sweep named {sweep!r}")
        if until_end and sweep is None:
            raise ApiError("bad_request", "until_end needs a sweep", field="until_end")
        if after is None:
            # A client waiting on one sweep gets its whole history (so it cannot miss the end); others what's new.
            after = int(last_event_id) if last_event_id and last_event_id.isdigit() else \
                0 if sweep else store.last_event_id()
    except BaseException:
        store.close()
        raise
    return store, after


async def _sse(events: AsyncIterator[dict[str, Any] | None]) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    async for event in events:
        if event is None:
            yield b": keep-alive\n\n"
        else:
            data = json.dumps(event, separators=(",", ":"))
            yield f"id: {event['id']}\nevent: {event['kind']}\ndata: {data}\n\n".encode()


async def _events_after(ctx: WebContext, store: Store, cursor: int, sweep: str | None,
                        until_end: bool) -> AsyncIterator[dict[str, Any] | None]:
    """Events after `cursor` as they are stored, None after SSE_KEEPALIVE of silence; closes the store."""
    loop = asyncio.get_running_loop()
    try:
        last_write = loop.time()
        while not ctx.stopping.is_set():
            ended = False
            for event in store.events_of(cursor, sweep, limit=500):
                cursor = event["id"]
                yield event
                ended |= event["kind"] in SWEEP_END_KINDS
                last_write = loop.time()
            if ended and until_end:
                return
            if loop.time() - last_write > SSE_KEEPALIVE:
                yield None
                last_write = loop.time()
            await asyncio.sleep(SSE_POLL)
    finally:
        store.close()
