"""The FastAPI application: its routers, JSON errors for every status, HEAD, request metrics, the document."""
from __future__ import annotations

import time
import uuid
from typing import Any, Awaitable, Callable

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

import ticketfarm
from master.web import allocations, changes, jobs, models, reads, relay, sandbox, streams
from master.web.base import cache_key, presented_token, token_scopes
from master.web.context import WebContext
from master.web.errors import CODE_OF_STATUS, ApiError
from master.web.metrics import WebMetrics

log = structlog.get_logger("ticketfarm.http")

def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="ticketfarm"'} if exc.code == "unauthorized" else None
    return JSONResponse(exc.body(), exc.status, headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        log.warning("http_error", path=request.url.path, code=exc.code, message=exc.message)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own answers (no such path, method not allowed, ...) as the same JSON errors."""
    assert isinstance(exc, StarletteHTTPException)
    code = CODE_OF_STATUS.get(exc.status_code, "bad_request")
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no endpoint {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    else:
        message = str(exc.detail)
    response = JSONResponse({"error": {"code": code, "message": message}}, exc.status_code, exc.headers)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A bad path or query parameter: 400 naming it (FastAPI's own would be 422 with a list)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else ""
    return error_response(ApiError("bad_request", f"{field}: {first.get('msg', 'invalid')}", field=field))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("http_internal_error", error_id=error_id, method=request.method, path=request.url.path,
              exc_info=exc)
    return JSONResponse(ApiError("internal", f"internal error (logged as {error_id})", id=error_id).body(), 500)


class _HeadDone(Exception):
    """A HEAD request's answer is complete once its headers went out."""


class ApiMiddleware:
    """ASGI middleware: HEAD answered as GET without the body; `Cache-Control: no-store` on every answer;
    duration and status by route, when the answer is complete; fresh cached answers served at once."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: WebMetrics, ctx: WebContext):
        self.app = app
        self.metrics = metrics
        self.ctx = ctx

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        head = scope["method"] == "HEAD"
        if scope["method"] in ("GET", "HEAD") and await self.send_cached(scope, send, head):
            self.metrics.observe(scope["path"], scope["method"], 200, time.perf_counter() - started)
            return
        inner = {**scope, "method": "GET"} if head else scope

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
            elif head:
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                route = inner.get("route")
                self.metrics.observe(getattr(route, "path", "unmatched"), scope["method"], status[0],
                                     time.perf_counter() - started)
                if head:
                    raise _HeadDone

        try:
            await self.app(inner, receive, sending)
        except* _HeadDone:  # a streamed answer raises it inside its task group
            pass

    async def send_cached(self, scope: dict[str, Any], send: Any, head: bool) -> bool:
        """Answer a poll from a fresh cached answer (see base.cached_json) for a token that may read, before
        routing and dependencies: what most of the cost of a poll was. False when the route must answer."""
        body = self.ctx.fresh(cache_key(scope))
        if body is None:
            return False
        headers = Headers(scope=scope)
        try:
            token_scopes(self.ctx, presented_token(headers), headers.get("Authorization", ""), "read")
        except ApiError:
            return False  # the route answers the refusal, as for any request
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return True


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(title="ticketfarm HTTP API", version=ticketfarm.__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", description=DESCRIPTION,
                  exception_handlers={ApiError: _api_error, StarletteHTTPException: _http_error,
                                      RequestValidationError: _validation_error, Exception: _internal_error})
    app.state.ctx = ctx
    app.state.metrics = WebMetrics(ctx)
    for module in (reads, streams, changes, jobs, allocations, sandbox, relay):
        app.include_router(module.router)
    app.add_middleware(ApiMiddleware, metrics=app.state.metrics, ctx=ctx)
    app.openapi = lambda: _document(app)  # type: ignore[method-assign]
    return app


def _document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the bodies routes read themselves and bad parameters answered 400, not 422."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc["components"]["schemas"]
        for model in (models.SubmitBody, models.CollectBody, models.Event):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        bad = models.error_responses(400)[400]
        for operations in doc["paths"].values():
            for op in operations.values():
                if op["responses"].pop("422", None) is not None:
                    op["responses"].setdefault("400", {"description": bad["description"], "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
        app.openapi_schema = doc
    return app.openapi_schema


DESCRIPTION = """The API of one ticketfarm master, served by a process of its own that reads the master's store and
sends every change to the master as a CONTROL message. Every error is JSON: `{"error": {"code", "message",
"field"?}}`. Reads need no token on a loopback bind (unless `http_open_reads = false`); every change needs a token
with the `submit` scope, slave changes the `admin` scope. See docs/HTTP.md."""
