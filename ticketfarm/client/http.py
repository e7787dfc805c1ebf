"""HTTP API client used by the CLI: JSON requests with a token, streamed downloads, stable errors."""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from master.config import MasterConfig
from ticketfarm.errors import ApiRefused, MasterUnreachable

#: File in the state dir holding the CLI's own API token (written by `ticketfarm token`, mode 0600).
TOKEN_FILE = "http.token"


class ApiClient:
    """Talks to one master's HTTP API; never uses an HTTP proxy (the master is usually on loopback)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0, cafile: str | None = None):
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if cafile:  # trust this certificate (e.g. the master's own self-signed one) for HTTPS
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
        self._opener = urllib.request.build_opener(*handlers)

    def _open(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base + path, data=body, headers=headers, method=method)
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": raw.decode(errors="replace")[:200] or exc.reason}
            raise ApiRefused(exc.code, err.get("code", "?"), err.get("message", ""), err.get("field", "")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise MasterUnreachable(f"no HTTP API at {self.base}: {getattr(exc, 'reason', exc)}: start the master "
                                    "with http_bind set in master.toml (or `ticketfarm http`), or pass --http URL "
                                    "of a running one") from None

    def get(self, path: str) -> Any:
        with self._open("GET", path) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict[str, Any] | None = None, method: str = "POST") -> Any:
        body = json.dumps(data or {}).encode()
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def stream(self, path: str, data: dict[str, Any] | None = None) -> IO[bytes]:
        """The response to a GET (or, with data, a POST), to be read as it arrives; use it in a `with`."""
        body = None if data is None else json.dumps(data).encode()
        return self._open("GET" if data is None else "POST", path, body)


def api_url_from_config(config: MasterConfig) -> str | None:
    """Where a client on this machine reaches the master's HTTP API, or None when it has none."""
    if not config.http_bind:
        return None
    host, _, port = config.http_bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if config.http_tls_cert else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def find_token(state_dir: Path, explicit: str | None) -> str | None:
    """--token, else $TICKETFARM_TOKEN, else the state dir's http.token."""
    if explicit:
        return explicit
    if os.environ.get("TICKETFARM_TOKEN"):
        return os.environ["TICKETFARM_TOKEN"]
    path = state_dir / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
