"""A running task's own HTTP and websocket server, reached through the API at .../tasks/{task}/http/{path}.

Any method, and websockets: relayed to the master, which relays it to the task's slave, which connects to
127.0.0.1 on the port the task announced. Needs the submit scope; the API's own token never reaches the task.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

import zmq
import zmq.asyncio
from fastapi import APIRouter, Depends, Path, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from master.web import models
from master.web.base import API, context, need, token_scopes
from master.web.changes import read_body
from master.web.context import WebContext
from master.web.errors import ApiError
from master.web.link import refusal_checked
from master.web.reads import SweepName, TaskIndex
from ticketfarm import messages
from ticketfarm.errors import ProtocolError
from ticketfarm.messages.relay import RELAY_MAX_BODY

router = APIRouter()
ROUTE = f"{API}/sweeps/{{sweep}}/tasks/{{task}}/http/{{path:path}}"
#: Relayed methods (HEAD is answered as GET without the body, as on every route).
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: Request headers that are the API's own (its token) or one hop's: never relayed to the task.
NOT_RELAYED = {"authorization", "x-key", "host", "connection", "keep-alive", "upgrade", "te", "trailer",
               "transfer-encoding", "content-length", "proxy-authorization"}
#: Response headers the API sets itself.
NOT_RETURNED = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
#: Close codes that may not be sent in a close frame (RFC 6455 §7.4.1): the relayed close says 1000 instead.
UNSENDABLE = {0, 1005, 1006, 1015}
PathParam = Path(description="the path on the task's server (with the request's query string)")


def target(path: str, query: str, drop_token: bool = False) -> str:
    """The path and query as the task's server sees them (`token=`, the API's own, taken out when it was used)."""
    if drop_token:
        query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"])
    return "/" + path + (f"?{query}" if query else "")


def request_headers(headers: Any) -> list[list[str]]:
    return [[k, v] for k, v in headers.items() if k.lower() not in NOT_RELAYED]


async def relay_http(request: Request, sweep: str = SweepName, task: int = TaskIndex, path: str = PathParam,
                     scopes: set[str] = Depends(need("submit"))) -> Response:
    ctx = context(request)
    body = await read_body(request, RELAY_MAX_BODY, "the largest relayed body")
    fields = {"sweep": sweep, "task": task, "method": request.method, "path": target(path, request.url.query),
              "headers": request_headers(request.headers)}
    reply, payload = await run_in_threadpool(ctx.link.exchange, "relay_http", fields, [body],
                                             ctx.config.relay_timeout + 5)
    response = Response(payload[0] if payload else b"", reply["status"])
    response.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply["headers"]
                             if k.lower() not in NOT_RETURNED]
    return response


for _method in METHODS:
    router.add_api_route(ROUTE, relay_http, methods=[_method], operation_id=f"relayTaskHttp{_method.title()}",
                         response_class=Response, summary=f"{_method} on the running task's own HTTP server",
                         description="Relayed to the task's slave and there to 127.0.0.1 on the port the task wrote "
                                     "to $TICKETFARM_HTTP_PORT_FILE; the answer is the task's. Websockets: the same "
                                     "path.",
                         responses={200: {"description": "the task's own answer (any status)"},
                                    **models.error_responses(400, 401, 403, 404, 409, 413, 502, 503, 504)})


@router.websocket(ROUTE)
async def relay_ws(websocket: WebSocket, sweep: str, task: int, path: str, token: str | None = None) -> None:
    """A websocket to the running task's server; a refusal before it opened is the JSON error with its status
    (HTTP, not a websocket). The token: Authorization or X-Key header, or `token=` (taken out of the query)."""
    ctx = context(websocket)
    bearer = websocket.headers.get("Authorization", "")
    sock = ctx.link.async_socket()
    try:
        try:
            presented = token or websocket.headers.get("X-Key") or \
                (bearer[7:] if bearer.lower().startswith("bearer ") else None)
            token_scopes(ctx, presented, bearer, "submit")
            channel = await _open(ctx, sock, sweep, task, target(path, websocket.url.query, token is not None),
                                  request_headers(websocket.headers))
        except ApiError as exc:
            await websocket.send_denial_response(JSONResponse(exc.body(), exc.status))
            return
        await websocket.accept()
        up = asyncio.create_task(_client_to_task(websocket, sock, channel))
        down = asyncio.create_task(_task_to_client(ctx, websocket, sock))
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        for part in (up, down):
            part.cancel()
        if up.done() and not up.cancelled():  # the client left: the task's websocket is closed too
            await sock.send_multipart(messages.Control("relay_ws_close", {"channel": channel}).encode())
    finally:
        sock.close(linger=100)


async def _open(ctx: WebContext, sock: zmq.asyncio.Socket, sweep: str, task: int, path: str,
                headers: list[list[str]]) -> int:
    fields = {"sweep": sweep, "task": task, "path": path, "headers": headers}
    await sock.send_multipart(messages.Control("relay_ws_open", fields, 1).encode())
    reply = await _next_reply(ctx, sock, ctx.config.relay_timeout + 5)
    if reply is None:
        raise ApiError("unavailable", "the master did not answer relay_ws_open in time")
    return int(refusal_checked("relay_ws_open", reply)["channel"])


async def _next_reply(ctx: WebContext, sock: zmq.asyncio.Socket, timeout: float | None) -> messages.Reply | None:
    """The next REPLY of this websocket's socket (None after `timeout` seconds, or when the API stops)."""
    while not ctx.stopping.is_set():
        if not await sock.poll(int(1000 * min(timeout or 1.0, 1.0))):
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    return None
            continue
        try:
            answer = messages.decode(await sock.recv_multipart())
        except ProtocolError:
            continue
        if isinstance(answer, messages.Reply):
            return answer
    return None


async def _client_to_task(websocket: WebSocket, sock: zmq.asyncio.Socket, channel: int) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            data = text.encode() if text is not None else message.get("bytes") or b""
            await sock.send_multipart(messages.Control("relay_ws_send", {"channel": channel, "text": text is not None},
                                                       payload=[data]).encode())
    except WebSocketDisconnect:
        return


async def _task_to_client(ctx: WebContext, websocket: WebSocket, sock: zmq.asyncio.Socket) -> None:
    """The task's messages to the client, until its websocket closed (its code and reason passed on)."""
    while True:
        reply = await _next_reply(ctx, sock, None)
        if reply is None:
            await websocket.close(1001, "the API is stopping")
            return
        fields = reply.fields
        if not reply.ok:
            await websocket.close(1011, reply.error[:120])
            return
        if fields.get("event") == "closed":
            status = fields.get("status") or 1000
            await websocket.close(1000 if status in UNSENDABLE else status, str(fields.get("error") or "")[:120])
            return
        data = reply.payload[0] if reply.payload else b""
        if fields.get("text"):
            await websocket.send_text(data.decode(errors="replace"))
        else:
            await websocket.send_bytes(data)
