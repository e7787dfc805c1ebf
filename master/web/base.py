"""What every route module shares: the API prefix, JSON answers, the request's context, the token check."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from master.web.context import WebContext
from master.web.errors import ApiError

API = "/api/v1"
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer TOKEN`")
_xkey = APIKeyHeader(name="X-Key", auto_error=False, description="`X-Key: TOKEN` (the same token)")


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


class Json(Response):
    """A JSON answer from ready-made bytes (cached answers are serialised once, not once per poller)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else json_bytes(content)


def context(request: HTTPConnection) -> WebContext:
    return request.app.state.ctx


def cache_key(scope: dict[str, Any]) -> str:
    """Where a pollable answer is cached: its path and query as sent (ApiMiddleware serves hits from there)."""
    return scope["path"] + "?" + scope["query_string"].decode("latin-1")


async def cached_json(request: Request, build: Callable[[], Any]) -> Json:
    """A pollable answer, built in a worker thread unless another request just did. ApiMiddleware answered from
    the cache when it could (and made this request the one that rebuilds a stale answer): no second look here."""
    return Json(await run_in_threadpool(context(request).cached, cache_key(request.scope),
                                        lambda: json_bytes(build())))


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token in `Authorization: Bearer TOKEN` or `X-Key: TOKEN`, if any."""
    authorization = headers.get("Authorization", "")
    return authorization[7:] if authorization.lower().startswith("bearer ") else headers.get("X-Key")


def token_scopes(ctx: WebContext, token: str | None, authorization: str, scope: str) -> set[str]:
    """The scopes of the presented token, which must include `scope` (reads need none on an open loopback bind)."""
    if token is None and authorization and not authorization.lower().startswith("bearer "):
        raise ApiError("unauthorized", "only bearer tokens are accepted")
    if token:
        scopes = ctx.tokens.scopes_of(token)
        if scopes is None:
            raise ApiError("unauthorized", "invalid API token")
        if scope not in scopes:
            raise ApiError("forbidden", f"this token's scopes ({', '.join(sorted(scopes))}) do not include "
                                        f"{scope!r}")
        return scopes
    if scope != "read" or not ctx.open_reads:
        hint = "" if len(ctx.tokens) else " (this master has no token: see `ticketfarm token`)"
        raise ApiError("unauthorized", "an API token is required: header 'Authorization: Bearer TOKEN' "
                                       f"or 'X-Key: TOKEN'{hint}")
    return {"read"}


def need(scope: str) -> Callable[..., set[str]]:
    """A dependency: the request's token has `scope` (see token_scopes); its scopes."""

    # async: checked on the event loop (a hash and a dict look-up), not handed to a thread per request
    async def check(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    xkey: str | None = Depends(_xkey)) -> set[str]:
        token = bearer.credentials if bearer is not None else xkey
        return token_scopes(context(request), token, request.headers.get("Authorization", ""), scope)

    return check
