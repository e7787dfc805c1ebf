"""The HTTP API and dashboard: a server thread that reads the store and sends every change to the master as CONTROL."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
import zmq

import ticketfarm
from master.collect import DOWNLOAD_NAMES, FORMATS, MEDIA_TYPES, Collector, output_chunks
from master.config import MasterConfig
from master.events import SWEEP_END_KINDS
from master.metrics import Metrics
from master.stats import (
    SweepStats,
    all_sweep_stats,
    format_report,
    slave_stats,
    sweep_stats,
)
from master.store import Store
from ticketfarm import messages, protocol
from ticketfarm.errors import ConfigError
from ticketfarm.keys import dealer
from ticketfarm.spec import parse_spec

log = structlog.get_logger("ticketfarm.http")

API = "/api/v1"
TASK_STATES = ("queued", "paused", "running", "done", "failed", "cancelled")
#: Largest page of tasks one request returns.
MAX_PAGE = 1000
#: Seconds between two reads of the events table by one event stream.
SSE_POLL = 0.2
#: Seconds of silence after which an event stream sends a keep-alive comment.
SSE_KEEPALIVE = 10.0
#: Seconds the API waits for the master's loop to answer a CONTROL message.
CONTROL_TIMEOUT = 10.0
#: Seconds a client has to finish the TLS handshake (HTTPS only).
TLS_HANDSHAKE_TIMEOUT = 10.0
#: GIL switch interval (s) of a master serving HTTP (Python's default is 0.005).
SWITCH_INTERVAL = 0.0005
#: HTTP status of each error code the master's operations return.
STATUS_OF_CODE = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "method_not_allowed": 405,
                  "conflict": 409, "too_large": 413, "unsupported_media_type": 415, "internal": 500,
                  "unavailable": 503}


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", ...}} with the code's HTTP status."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_OF_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


# -- responses ------------------------------------------------------------------------------
@dataclass
class Response:
    """A whole body (JSON, HTML, text) with its status and headers."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


@dataclass
class Stream:
    """A body sent in chunks as the iterator yields them (downloads)."""

    chunks: Iterator[bytes]
    content_type: str
    headers: dict[str, str] | None = None
    length: int | None = None
    after: Callable[[], None] | None = None


@dataclass
class EventStream:
    """A server-sent-events stream of the events table."""

    after: int
    sweep: str | None
    until_end: bool


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":"), default=str).encode(), status, "application/json", headers)


# -- routes -----------------------------------------------------------------------------------
@dataclass
class Route:
    """One served path: method, template ({name} is one segment, {name:path} the rest), access, handler."""

    method: str
    template: str
    access: str  # "open" (static), "read" or "write" (token always required)
    handler: str
    regex: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", self.template)
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self.regex = re.compile(f"^{pattern}$")


ROUTES = [
    Route("GET", "/", "open", "dashboard"),
    Route("GET", "/openapi.json", "open", "openapi"),
    Route("GET", "/metrics", "read", "metrics"),
    Route("GET", f"{API}/info", "read", "info"),
    Route("GET", f"{API}/status", "read", "status"),
    Route("GET", f"{API}/stats", "read", "stats"),
    Route("GET", f"{API}/events", "read", "events"),
    Route("GET", f"{API}/sweeps", "read", "list_sweeps"),
    Route("POST", f"{API}/sweeps", "write", "submit"),
    Route("GET", f"{API}/sweeps/{{sweep}}", "read", "get_sweep"),
    Route("POST", f"{API}/sweeps/{{sweep}}/cancel", "write", "cancel_sweep"),
    Route("POST", f"{API}/sweeps/{{sweep}}/pause", "write", "pause"),
    Route("POST", f"{API}/sweeps/{{sweep}}/resume", "write", "resume"),
    Route("GET", f"{API}/sweeps/{{sweep}}/tasks", "read", "list_tasks"),
    Route("GET", f"{API}/sweeps/{{sweep}}/tasks/{{task}}", "read", "get_task"),
    Route("POST", f"{API}/sweeps/{{sweep}}/tasks/{{task}}/cancel", "write", "cancel_task"),
    Route("GET", f"{API}/sweeps/{{sweep}}/tasks/{{task}}/results/{{name:path}}", "read", "result_file"),
    Route("GET", f"{API}/sweeps/{{sweep}}/failures", "read", "failures"),
    Route("GET", f"{API}/sweeps/{{sweep}}/collect", "read", "collect"),
    Route("POST", f"{API}/sweeps/{{sweep}}/collect", "write", "collect_remove"),
    Route("DELETE", f"{API}/sweeps/{{sweep}}/results", "write", "remove_results"),
    Route("GET", f"{API}/tickets/{{ticket}}/progress", "read", "progress"),
    Route("GET", f"{API}/slaves", "read", "list_slaves"),
    Route("POST", f"{API}/slaves/{{slave}}/drain", "write", "drain"),
    Route("POST", f"{API}/slaves/{{slave}}/undrain", "write", "undrain"),
    Route("GET", f"{API}/allocations", "read", "list_allocations"),
    Route("POST", f"{API}/allocations", "write", "add_allocation"),
    Route("POST", f"{API}/allocations/{{queue}}/pause", "write", "pause_allocation"),
    Route("POST", f"{API}/allocations/{{queue}}/resume", "write", "resume_allocation"),
    Route("DELETE", f"{API}/allocations/{{queue}}", "write", "remove_allocation"),
]


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route serving a request, or 404 (no such path) / 405 (path served for other methods)."""
    methods = []
    for route in ROUTES:
        m = route.regex.match(path)  # type: ignore[union-attr]
        if m:
            if route.method == method:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}
            methods.append(route.method)
    if methods:
        raise ApiError("method_not_allowed", f"{method} is not allowed on {path} (allowed: {', '.join(methods)})")
    raise ApiError("not_found", f"no endpoint {path}")


# -- auth ---------------------------------------------------------------------------------------
def hash_token(token: str) -> str:
    """What master.toml's http_token_hash holds for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"http_bind must be HOST:PORT, got {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the server -------------------------------------------------------------------------------------
class HttpApi:
    """Everything the request threads share: settings, paths, the master's inproc endpoint. No master objects."""

    def __init__(self, config: MasterConfig, state_dir: Path, context: zmq.Context, control_endpoint: str,
                 master_endpoint: str, epoch: int, started: float, metrics: Metrics):
        self.config = config
        self.state_dir = state_dir
        self.db_path = state_dir / "state.db"
        self.context = context
        self.control_endpoint = control_endpoint
        self.master_endpoint = master_endpoint
        self.epoch = epoch
        self.started = started
        self.metrics = metrics
        self.token_hashes = [h.strip().lower().removeprefix("sha256:")
                             for h in config.http_token_hash.split(",") if h.strip()]
        host, port = parse_bind(config.http_bind)
        self.loopback = is_loopback(host)
        if not self.loopback and not self.token_hashes:
            raise ConfigError(f"http_bind {config.http_bind!r} is not loopback: set http_token_hash "
                              "(`ticketfarm token` makes a token) before serving HTTP beyond this machine")
        self.open_reads = config.http_open_reads and self.loopback
        self.stopping = threading.Event()
        self._cache: dict[str, tuple[float, Response]] = {}
        self._cache_lock = threading.Lock()
        self.server = _Server((host, port), Handler)
        self.server.api = self
        self.server.tls = tls_context(config, state_dir)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ticketfarm-http", daemon=True)

    def start(self) -> None:
        # Request threads share the GIL with the event loop: hand it back sooner than the default 5 ms,
        # so the loop never waits long behind a burst of requests (measured by scripts/bench_http.py).
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread.start()
        log.info("http_listening", url=self.url)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        scheme = "https" if self.server.tls is not None else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(2)

    # -- helpers shared by handlers ------------------------------------------------------------------
    def token_ok(self, token: str) -> bool:
        digest = hash_token(token)
        ok = False
        for h in self.token_hashes:  # compare with every hash: no early exit
            ok |= hmac.compare_digest(digest, h)
        return ok

    def control(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one CONTROL message to the master's loop and wait for its REPLY."""
        sock = dealer(self.context, self.control_endpoint, None)
        try:
            sock.send_multipart(messages.Control(op, fields).encode())
            if not sock.poll(int(CONTROL_TIMEOUT * 1000)):
                raise ApiError("unavailable", f"the master did not answer {op!r} within {CONTROL_TIMEOUT:g}s")
            answer = messages.decode(sock.recv_multipart())
            if not isinstance(answer, messages.Reply):
                raise ApiError("unavailable", f"the master answered {op!r} with {answer.COMMAND.name}")
            reply = answer.as_dict()
        finally:
            sock.close()
        if not reply.get("ok"):
            code = reply.get("code", "bad_request")
            raise ApiError(code if code in STATUS_OF_CODE else "bad_request", str(reply.get("error", f"{op} refused")))
        self.invalidate()
        return reply

    def cached(self, key: str, build: Callable[[], Response]) -> Response:
        """Serve the same answer to every poller for http_cache_ttl seconds."""
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit and now - hit[0] < self.config.http_cache_ttl:
            return hit[1]
        response = build()
        with self._cache_lock:
            self._cache[key] = (now, response)
        return response

    def invalidate(self) -> None:
        with self._cache_lock:
            self._cache.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    api: HttpApi
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake runs in the request's own thread (a slow client never blocks accept)."""
        if self.tls is not None:
            request.settimeout(TLS_HANDSHAKE_TIMEOUT)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("tls_handshake_failed", peer=str(client_address[0]), error=str(exc))
                return
            request.settimeout(None)
        super().finish_request(request, client_address)
        if self.tls is not None:
            _close_gently(request)


def _close_gently(sock: Any) -> None:
    """Half-close, then read what the client still sends (e.g. the unread body of a refused request) until
    it closes: closing with unread bytes would reset the connection and lose the answer already sent."""
    try:
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + TLS_HANDSHAKE_TIMEOUT
        while sock.recv(65536) and time.monotonic() < deadline:
            pass
    except (OSError, ValueError):
        pass


def tls_context(config: MasterConfig, state_dir: Path) -> ssl.SSLContext | None:
    """HTTPS when http_tls_cert and http_tls_key are set (paths relative to the state dir)."""
    if not config.http_tls_cert and not config.http_tls_key:
        return None
    if not (config.http_tls_cert and config.http_tls_key):
        raise ConfigError("http_tls_cert and http_tls_key go together: set both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(state_dir / config.http_tls_cert, state_dir / config.http_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"http_tls_cert/http_tls_key: cannot load: {exc}") from None
    return ctx


class Request:
    """What a handler sees: path parameters, query, headers, body, and a read-only store opened on demand."""

    def __init__(self, handler: "Handler", params: dict[str, str], query: dict[str, list[str]]):
        self.handler = handler
        self.api = handler.server.api
        self.params = params
        self.query = query
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.api.db_path, readonly=True)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def int_arg(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.arg(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError("bad_request", f"query parameter {name!r} must be an integer, got {raw!r}",
                           field=name) from None
        if not low <= value <= high:
            raise ApiError("bad_request", f"query parameter {name!r} must be between {low} and {high}", field=name)
        return value

    def body(self) -> bytes:
        length = self.handler.headers.get("Content-Length")
        if length is None:
            if self.handler.headers.get("Transfer-Encoding"):
                raise ApiError("bad_request", "send a Content-Length (chunked request bodies are not supported)")
            return b""
        try:
            n = int(length)
        except ValueError:
            raise ApiError("bad_request", "bad Content-Length") from None
        if n > self.api.config.http_max_body:
            self.handler.close_connection = True
            raise ApiError("too_large", f"request body of {n} bytes exceeds http_max_body "
                                        f"({self.api.config.http_max_body})")
        return self.handler.rfile.read(n)

    def json_body(self) -> dict[str, Any]:
        raw = self.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError("bad_request", f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError("bad_request", "request body must be a JSON object")
        return data

    def sweep_row(self) -> Any:
        row = self.store.sweep(self.params["sweep"])
        if row is None:
            raise ApiError("not_found", f"no sweep named {self.params['sweep']!r}")
        return row

    def task_index(self) -> int:
        raw = self.params["task"]
        if not raw.isdigit():
            raise ApiError("bad_request", f"task must be a task index (an integer), got {raw!r}", field="task")
        return int(raw)


class Handler(BaseHTTPRequestHandler):
    """Routes a request, checks its token, runs the handler, writes JSON / a stream / server-sent events."""

    protocol_version = "HTTP/1.1"
    server_version = "ticketfarm"
    timeout = 60
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http_request", peer=self.client_address[0], line=format % args)

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        request = None
        try:
            route, params = match(method, url.path)
            self._authorize(route.access)
            request = Request(self, params, parse_qs(url.query))
            result = getattr(Endpoints, route.handler)(request)
            if isinstance(result, Response):
                self._send(result)
            elif isinstance(result, Stream):
                self._send_stream(result)
            else:
                self._send_events(request, result)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning("http_error", path=url.path, code=exc.code, message=exc.message)
            self._send(json_response(exc.body(), exc.status, self._auth_header(exc)))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - answer 500 with an id that names the logged traceback
            error_id = uuid.uuid4().hex[:12]
            log.exception("http_internal_error", error_id=error_id, method=method, path=url.path)
            err = ApiError("internal", f"internal error (logged as {error_id})", id=error_id)
            try:
                self._send(json_response(err.body(), 500))
            except OSError:
                self.close_connection = True
        finally:
            if request is not None:
                request.close()

    @staticmethod
    def _auth_header(exc: ApiError) -> dict[str, str] | None:
        return {"WWW-Authenticate": 'Bearer realm="ticketfarm"'} if exc.code == "unauthorized" else None

    def _authorize(self, access: str) -> None:
        """Writes always need a token; reads need one unless open reads are on (loopback binds only)."""
        if access == "open":
            return
        api = self.server.api
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else self.headers.get("X-Key")
        if token:
            if not api.token_ok(token):
                raise ApiError("unauthorized", "invalid API token")
            return
        if access == "write" or not api.open_reads:
            hint = "" if api.token_hashes else " (this master has no token configured: see `ticketfarm token`)"
            raise ApiError("unauthorized", "an API token is required: header 'Authorization: Bearer TOKEN' "
                                           f"or 'X-Key: TOKEN'{hint}")

    def _send(self, r: Response) -> None:
        self.server.api.metrics.http_requests.labels(str(r.status)).inc()
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (r.headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(r.body)

    def _send_stream(self, s: Stream) -> None:
        self.server.api.metrics.http_requests.labels("200").inc()
        self.send_response(200)
        self.send_header("Content-Type", s.content_type)
        self.send_header("Cache-Control", "no-store")
        for k, v in (s.headers or {}).items():
            self.send_header(k, v)
        if s.length is not None:
            self.send_header("Content-Length", str(s.length))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for block in s.chunks:
                if block:
                    self._write_chunk(block, s.length is None)
        except Exception:
            # The status line is gone: cut the connection so the client sees a truncated download.
            self.close_connection = True
            raise
        if s.length is None:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if s.after is not None:
            s.after()

    def _write_chunk(self, data: bytes, chunked: bool) -> None:
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _send_events(self, request: Request, es: EventStream) -> None:
        api = self.server.api
        api.metrics.http_requests.labels("200").inc()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self._write_chunk(b"retry: 2000\n\n", True)
        self.wfile.flush()
        cursor, last_write = es.after, time.monotonic()
        store = request.store
        while not api.stopping.is_set():
            ended = False
            for event in store.events_of(cursor, es.sweep, limit=500):
                cursor = event["id"]
                data = json.dumps(event, separators=(",", ":"))
                self._write_chunk(f"id: {cursor}\nevent: {event['kind']}\ndata: {data}\n\n".encode(), True)
                ended |= event["kind"] in SWEEP_END_KINDS
                last_write = time.monotonic()
            if ended and es.until_end:
                break
            if time.monotonic() - last_write > SSE_KEEPALIVE:
                self._write_chunk(b": keep-alive\n\n", True)
                last_write = time.monotonic()
            self.wfile.flush()
            api.stopping.wait(SSE_POLL)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True


# -- endpoints -------------------------------------------------------------------------------------
def _sweep_json(s: SweepStats, row: Any = None) -> dict[str, Any]:
    d = asdict(s)
    d["progress"] = round(s.settled / s.total, 4) if s.total else 1.0
    d["url"] = f"{API}/sweeps/{s.name}"
    if row is not None:
        d["created"], d["finished"] = row.created, row.finished
    return d


def _slaves_json(req: Request, live: dict[str, Any] | None) -> list[dict[str, Any]]:
    stored = {s["name"]: s for s in req.store.slaves()}
    running = req.store.running_by_slave()
    out = []
    for s in slave_stats(req.store):
        row = stored.get(s.name, {})
        d = asdict(s)
        d.update(version=row.get("version"), first_seen=row.get("first_seen"), last_seen=row.get("last_seen"),
                 running=running.get(s.name, 0), disk=row.get("info", {}).get("disk"))
        if live is not None:
            now = live.get(s.name)
            d["connected"] = now is not None
            d["draining"] = s.name in live.get("__draining__", ())
            if now is not None:
                d["last_heard"] = now["last_heard"]
                d["seconds_since_heard"] = now["seconds_since_heard"]
                hb = now.get("heartbeat") or {}
                d["load"] = hb.get("load", d["load"])
                d["memory"] = hb.get("memory", d["memory"])
                d["disk"] = hb.get("disk", d["disk"])
        out.append(d)
    return out


def _live(req: Request) -> dict[str, Any] | None:
    try:
        reply = req.api.control("live_slaves")
    except ApiError:
        return None
    live = dict(reply["slaves"])
    live["__draining__"] = reply.get("draining", [])
    return live


def _submission(req: Request) -> tuple[Any, dict[str, Any]]:
    """The sweep a POST /sweeps describes: a TOML text or a spec object, plus the files it names."""
    ctype = (req.handler.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
    if ctype in ("application/toml", "text/toml", "text/plain"):
        raw = req.body()
        try:
            data: dict[str, Any] = {"toml": raw.decode()}
        except UnicodeDecodeError:
            raise ApiError("bad_request", "TOML body is not UTF-8") from None
    elif ctype == "application/json":
        data = req.json_body()
    else:
        raise ApiError("unsupported_media_type", f"send application/json or application/toml, not {ctype}")
    unknown = set(data) - {"spec", "toml", "files", "status_callback_url", "status_callback_secret"}
    if unknown:
        raise ApiError("bad_request", f"unknown field {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    if ("spec" in data) == ("toml" in data):
        raise ApiError("bad_request", "exactly one of 'spec' (an object) or 'toml' (a string) is required",
                       field="spec")
    if "toml" in data:
        import tomllib
        if not isinstance(data["toml"], str):
            raise ApiError("bad_request", "field 'toml' must be a string", field="toml")
        try:
            spec = tomllib.loads(data["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise ApiError("bad_request", f"toml: {exc}", field="toml") from None
    else:
        spec = data["spec"]
        if not isinstance(spec, dict):
            raise ApiError("bad_request", "field 'spec' must be an object", field="spec")
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise ApiError("bad_request", "field 'files' must map file names to contents", field="files")
    for key in ("status_callback_url", "status_callback_secret"):
        if key in data and not isinstance(data[key], str):
            raise ApiError("bad_request", f"field {key!r} must be a string", field=key)
    extra = {k: data[k] for k in ("status_callback_url", "status_callback_secret") if data.get(k)}
    with tempfile.TemporaryDirectory(prefix="ticketfarm-submit-") as tmp:
        base = Path(tmp)
        for name, content in files.items():
            _write_submitted_file(base, name, content)
        _check_file_references(spec, files)
        try:
            sweep = parse_spec(spec, base, "spec")
        except ConfigError as exc:
            # Files named in the message are the client's names, not paths in the master's temporary dir.
            message = str(exc).replace(f"{base}/", "")
            raise ApiError("bad_request", message, **({"field": exc.field} if exc.field else {})) from None
    return sweep, extra


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\\" not in name and "\x00" not in name


def _write_submitted_file(base: Path, name: Any, content: Any) -> None:
    if not isinstance(name, str) or not _safe_name(name):
        raise ApiError("bad_request", f"files: unsafe file name {name!r}", field="files")
    if isinstance(content, str):
        data = content.encode()
    elif isinstance(content, dict) and isinstance(content.get("base64"), str):
        try:
            data = base64.b64decode(content["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("bad_request", f"files.{name}: not base64", field="files") from None
    else:
        raise ApiError("bad_request", f"files.{name} must be a string or {{\"base64\": ...}}", field="files")
    path = base / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_file_references(spec: dict[str, Any], files: dict[str, Any]) -> None:
    """Every file a spec names must come with the request: the master's own files are never read."""
    refs = []
    params = spec.get("parameters")
    if isinstance(params, dict):
        refs += [("parameters." + k, params[k]) for k in ("csv", "jsonl") if k in params]
    for n, item in enumerate(spec.get("inputs") or []):
        if isinstance(item, dict):
            refs += [(f"inputs[{n}].{k}", item[k]) for k in ("source", "template_file") if k in item]
    for where, name in refs:
        if isinstance(name, str) and name not in files:  # a name of the wrong type is parse_spec's to report
            raise ApiError("bad_request", f"{where}: file {name!r} must be sent in 'files'", field=where)


class Endpoints:
    """One static method per route (ROUTES names them); each takes the Request."""

    @staticmethod
    def dashboard(req: Request) -> Response:
        html = resources.files("master").joinpath("dashboard.html").read_bytes()
        return Response(html, content_type="text/html; charset=utf-8")

    @staticmethod
    def openapi(req: Request) -> Response:
        from master.openapi import document
        return json_response(document())

    @staticmethod
    def metrics(req: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(req.api.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    @staticmethod
    def info(req: Request) -> Response:
        api = req.api
        return json_response({
            "name": "ticketfarm", "version": ticketfarm.__version__, "protocol": protocol.VERSION, "epoch": api.epoch,
            "started": api.started, "uptime": round(time.time() - api.started, 3), "endpoint": api.master_endpoint,
            "http": api.url, "auth": {"open_reads": api.open_reads, "tokens": len(api.token_hashes)},
        })

    @staticmethod
    def status(req: Request) -> Response:
        def build() -> Response:
            store = req.store
            rows = {r.name: r for r in store.sweeps()}
            slaves = store.slaves()
            running = store.running_by_slave()
            states: dict[str, int] = {}
            for s in slaves:
                states[s["state"]] = states.get(s["state"], 0) + 1
            return json_response({
                "time": time.time(), "uptime": round(time.time() - req.api.started, 3),
                "sweeps": [_sweep_json(s, rows.get(s.name)) for s in all_sweep_stats(store)],
                "slaves": {"alive": states.get("alive", 0), "draining": states.get("draining", 0),
                           "gone": states.get("gone", 0),
                           "slots": sum(s["slots"] or 0 for s in slaves if s["state"] in ("alive", "draining")),
                           "busy": sum(running.values())},
                "last_event": store.last_event_id(),
            })
        return req.api.cached("status", build)

    @staticmethod
    def stats(req: Request) -> Response:
        def build() -> Response:
            store = req.store
            sweeps = all_sweep_stats(store)
            return json_response({
                "sweeps": [_sweep_json(s) for s in sweeps],
                "slaves": _slaves_json(req, None),
                "failures": {s.name: [{"task": i, "params": p, "reason": r}
                                      for i, p, r in store.failed_tasks(s.name)[:100]] for s in sweeps if s.failed},
                "report": format_report(store),
            })
        return req.api.cached("stats", build)

    @staticmethod
    def events(req: Request) -> EventStream:
        sweep = req.arg("sweep")
        last = req.handler.headers.get("Last-Event-ID")
        if req.arg("after") is not None:
            after = req.int_arg("after", 0, 0, 2**62)
        elif last is not None and last.isdigit():
            after = int(last)
        else:
            # A client waiting on one sweep gets its whole history (so it cannot miss the end); others get what's new.
            after = 0 if sweep else req.store.last_event_id()
        if sweep is not None and req.store.sweep(sweep) is None:
            raise ApiError("not_found", f"no sweep named {sweep!r}")
        until_end = req.arg("until_end", "0") in ("1", "true", "yes")
        if until_end and sweep is None:
            raise ApiError("bad_request", "until_end needs a sweep", field="until_end")
        return EventStream(after, sweep, until_end)

    @staticmethod
    def list_sweeps(req: Request) -> Response:
        def build() -> Response:
            rows = {r.name: r for r in req.store.sweeps()}
            return json_response({"sweeps": [_sweep_json(s, rows.get(s.name)) for s in all_sweep_stats(req.store)]})
        return req.api.cached("sweeps", build)

    @staticmethod
    def submit(req: Request) -> Response:
        sweep, extra = _submission(req)
        reply = req.api.control("submit", sweep=sweep.to_json(), **extra)
        url = f"{API}/sweeps/{sweep.name}"
        body = {"sweep": sweep.name, "state": reply["state"], "tasks": len(sweep.params), "url": url}
        return json_response(body, 201 if reply["state"] == "submitted" else 200, {"Location": url})

    @staticmethod
    def get_sweep(req: Request) -> Response:
        row = req.sweep_row()
        stats = sweep_stats(req.store, row.name)
        sweep = row.sweep()
        d = _sweep_json(stats, row)
        d["spec"] = {"command": sweep.command, "argv": sweep.argv, "timeout": sweep.timeout,
                     "max_attempts": sweep.max_attempts, "priority": sweep.priority,
                     "parameters": sweep.param_names, "results": sweep.results,
                     "collect": [asdict(c) for c in sweep.collect]}
        d["callback"] = req.store.callback(row.name) is not None
        return json_response(d)

    @staticmethod
    def _op(req: Request, op: str, **fields: Any) -> Response:
        reply = req.api.control(op, **fields)
        reply.pop("ok", None)
        return json_response(reply)

    # -- allocation queues (master/allocation.py): every answer comes from the loop, with live job states
    @staticmethod
    def list_allocations(req: Request) -> Response:
        return Endpoints._op(req, "alloc", action="list")

    @staticmethod
    def add_allocation(req: Request) -> Response:
        return Endpoints._op(req, "alloc", action="add", queue=req.json_body())

    @staticmethod
    def pause_allocation(req: Request) -> Response:
        return Endpoints._op(req, "alloc", action="pause", queue=req.params["queue"])

    @staticmethod
    def resume_allocation(req: Request) -> Response:
        return Endpoints._op(req, "alloc", action="resume", queue=req.params["queue"])

    @staticmethod
    def remove_allocation(req: Request) -> Response:
        return Endpoints._op(req, "alloc", action="remove", queue=req.params["queue"])

    @staticmethod
    def cancel_sweep(req: Request) -> Response:
        return Endpoints._op(req, "cancel_sweep", sweep=req.params["sweep"])

    @staticmethod
    def pause(req: Request) -> Response:
        return Endpoints._op(req, "pause", sweep=req.params["sweep"])

    @staticmethod
    def resume(req: Request) -> Response:
        return Endpoints._op(req, "resume", sweep=req.params["sweep"])

    @staticmethod
    def list_tasks(req: Request) -> Response:
        row = req.sweep_row()
        state = req.arg("state")
        if state is not None and state not in TASK_STATES:
            raise ApiError("bad_request", f"state must be one of {', '.join(TASK_STATES)}, got {state!r}",
                           field="state")
        offset = req.int_arg("offset", 0, 0, 2**62)
        limit = req.int_arg("limit", 100, 1, MAX_PAGE)
        counts = req.store.task_counts(row.name)
        total = counts.get(state, 0) if state else sum(counts.values())
        tasks = req.store.tasks_page(row.name, state, offset, limit)
        return json_response({"sweep": row.name, "state": state, "offset": offset, "limit": limit, "total": total,
                              "next": offset + limit if offset + limit < total else None, "tasks": tasks})

    @staticmethod
    def get_task(req: Request) -> Response:
        row = req.sweep_row()
        idx = req.task_index()
        task = req.store.task(row.name, idx)
        if task is None:
            raise ApiError("not_found", f"sweep {row.name!r} has no task {idx}")
        task["attempts_list"] = req.store.attempts_of(row.name, idx)
        task["results"] = [{"name": o.name, "size": o.size,
                            "url": f"{API}/sweeps/{row.name}/tasks/{idx}/results/{o.name}"}
                           for o in sorted(req.store.outputs(row.name, idx).values(), key=lambda o: o.name)]
        return json_response(task)

    @staticmethod
    def cancel_task(req: Request) -> Response:
        return Endpoints._op(req, "cancel_task", sweep=req.params["sweep"], task=req.task_index())

    @staticmethod
    def result_file(req: Request) -> Stream:
        row = req.sweep_row()
        idx = req.task_index()
        output = req.store.outputs(row.name, idx).get(req.params["name"])
        if output is None:
            raise ApiError("not_found", f"task {idx} of {row.name!r} has no stored result {req.params['name']!r}")
        filename = req.params["name"].replace("/", "_").replace('"', "")
        return Stream(output_chunks(req.api.state_dir, output), "application/octet-stream",
                      {"Content-Disposition": f'attachment; filename="{filename}"'}, length=output.size)

    @staticmethod
    def failures(req: Request) -> Response:
        row = req.sweep_row()
        return json_response({"sweep": row.name, "failures": [
            {"task": i, "params": p, "reason": r} for i, p, r in req.store.failed_tasks(row.name)]})

    @staticmethod
    def _collect_stream(req: Request, fmt: Any, result: Any, after: Callable[[], None] | None) -> Stream:
        row = req.sweep_row()
        sweep = row.sweep()
        if fmt not in FORMATS:
            raise ApiError("bad_request", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", field="format")
        if result is not None and result not in sweep.results:
            raise ApiError("bad_request", f"no result named {result!r} (known: {', '.join(sweep.results)})",
                           field="result")
        filename = DOWNLOAD_NAMES[fmt].format(row.name)
        return Stream(Collector(req.store, req.api.state_dir, sweep).chunks(fmt, result), MEDIA_TYPES[fmt],
                      {"Content-Disposition": f'attachment; filename="{filename}"'}, after=after)

    @staticmethod
    def collect(req: Request) -> Stream:
        return Endpoints._collect_stream(req, req.arg("format", "csv"), req.arg("result"), None)

    @staticmethod
    def collect_remove(req: Request) -> Stream:
        body = req.json_body()
        remove = body.get("remove", False)
        if not isinstance(remove, bool):
            raise ApiError("bad_request", "field 'remove' must be true or false", field="remove")
        row = req.sweep_row()
        if remove and row.state not in ("finished", "cancelled"):
            raise ApiError("conflict", f"sweep {row.name!r} is {row.state}: results are removed only after it ended")
        after = (lambda: req.api.control("forget_results", sweep=row.name)) if remove else None
        return Endpoints._collect_stream(req, body.get("format", "csv"), body.get("result"), after)

    @staticmethod
    def remove_results(req: Request) -> Response:
        row = req.sweep_row()
        if row.state not in ("finished", "cancelled"):
            raise ApiError("conflict", f"sweep {row.name!r} is {row.state}: results are removed only after it ended")
        return Endpoints._op(req, "forget_results", sweep=row.name)

    @staticmethod
    def progress(req: Request) -> Response:
        raw = req.params["ticket"]
        if not raw.isdigit():
            raise ApiError("bad_request", f"ticket must be a ticket id (an integer), got {raw!r}", field="ticket")
        ticket = req.store.ticket(int(raw))
        if ticket is None:
            raise ApiError("not_found", f"no ticket {raw}")
        output = req.api.control("progress", ticket=int(raw))["output"] if ticket.state == "running" else ""
        return json_response({"ticket": ticket.id, "sweep": ticket.sweep, "task": ticket.task, "slave": ticket.slave,
                              "state": ticket.state, "output": output})

    @staticmethod
    def list_slaves(req: Request) -> Response:
        return req.api.cached("slaves", lambda: json_response({"slaves": _slaves_json(req, _live(req))}))

    @staticmethod
    def drain(req: Request) -> Response:
        return Endpoints._op(req, "drain", slave=req.params["slave"])

    @staticmethod
    def undrain(req: Request) -> Response:
        return Endpoints._op(req, "undrain", slave=req.params["slave"])
