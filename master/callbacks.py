"""Status callbacks: a background thread POSTs each sweep state change to the sweep's URL, HMAC-signed, with retries."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from master.store import Store

log = structlog.get_logger("ticketfarm.callbacks")

#: Header carrying "sha256=<hex>" of HMAC-SHA256(secret, timestamp + "." + body).
SIGNATURE_HEADER = "X-Ticketfarm-Signature"
#: Header carrying the Unix time (integer seconds) that is part of the signed text.
TIMESTAMP_HEADER = "X-Ticketfarm-Timestamp"
#: Header carrying the event id (the same id the SSE stream uses): receivers can drop duplicates with it.
EVENT_HEADER = "X-Ticketfarm-Event"
#: The sweep state each sweep event kind announces.
STATE_OF_EVENT = {"sweep_submitted": "active", "sweep_active": "active", "sweep_paused": "paused",
                  "sweep_finished": "finished", "sweep_cancelled": "cancelled"}
#: Longest wait between two attempts of one delivery.
MAX_BACKOFF = 60.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for a body sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, refuse stale timestamps."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class Delivery:
    """One signed POST still to be made."""

    event_id: int
    url: str
    secret: str
    body: bytes
    attempt: int = 0
    due: float = 0.0


def body_of(event: dict[str, Any], state: str, counts: dict[str, int]) -> bytes:
    """The JSON a receiver gets: the event, the sweep's state it announces and the task counts at that moment."""
    return json.dumps({"id": event["id"], "event": event["kind"], "sweep": event["sweep"], "state": state,
                       "ts": event["ts"], "counts": counts}, sort_keys=True).encode()


class CallbackSender:
    """Tails the events table through its own read-only connection; never touches the master's objects.

    Each sweep has its own queue (its callbacks arrive in order) and at most one POST in flight, made by a
    small pool of threads: a receiver that is down or slow delays only its own sweep's callbacks.
    """

    def __init__(self, db_path: Path, after: int, attempts: int = 8, backoff: float = 0.5,
                 timeout: float = 5.0, poll: float = 0.2, senders: int = 4):
        self.db_path = db_path
        self.cursor = after
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.poll = poll
        self.queues: dict[str, deque[Delivery]] = {}
        self.in_flight: dict[str, Future[bool]] = {}
        self.delivered = 0
        self.given_up = 0
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="ticketfarm-callback")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ticketfarm-callbacks", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        store = Store(self.db_path, readonly=True)
        try:
            while not self._stop.is_set():
                try:
                    self._read_events(store)
                    self._settle_finished(time.time())
                    self._start_due(time.time())
                except Exception:  # noqa: BLE001 - the sender must outlive any one bad event or receiver
                    log.exception("callback_loop_failed")
                self._stop.wait(self.poll)
        finally:
            store.close()

    def _read_events(self, store: Store) -> None:
        for event in store.events_of(self.cursor):
            self.cursor = event["id"]
            state = STATE_OF_EVENT.get(event["kind"])
            if state is None or event["sweep"] is None:
                continue
            target = store.callback(event["sweep"])
            if target is None:
                continue
            # Counts as the master wrote them with the event; an event from before they were recorded: now.
            counts = event["detail"].get("counts")
            if counts is None:
                counts = store.task_counts(event["sweep"])
            body = body_of(event, state, counts)
            self.queues.setdefault(event["sweep"], deque()).append(Delivery(event["id"], target[0], target[1], body))

    def _start_due(self, now: float) -> None:
        """Hand the head delivery of each sweep whose time has come, and with none in flight, to a sender."""
        for sweep, queue in self.queues.items():
            if sweep not in self.in_flight and queue and queue[0].due <= now:
                self.in_flight[sweep] = self._pool.submit(self._post, queue[0])

    def _settle_finished(self, now: float) -> None:
        """Delivered: next one. Failed: back off (doubling, capped), or give up after `attempts` tries."""
        for sweep, future in list(self.in_flight.items()):
            if not future.done():
                continue
            del self.in_flight[sweep]
            queue = self.queues[sweep]
            d = queue[0]
            if not future.cancelled() and future.exception() is None and future.result():
                queue.popleft()
                self.delivered += 1
            else:
                d.attempt += 1
                if d.attempt >= self.attempts:
                    log.warning("callback_given_up", sweep=sweep, url=d.url, event_id=d.event_id, attempts=d.attempt)
                    queue.popleft()
                    self.given_up += 1
                else:
                    d.due = now + min(MAX_BACKOFF, self.backoff * 2 ** (d.attempt - 1))
            if not queue:
                del self.queues[sweep]

    def _post(self, d: Delivery) -> bool:
        timestamp = str(int(time.time()))
        headers: dict[str, Any] = {
            "Content-Type": "application/json", "User-Agent": "ticketfarm-callbacks",
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(d.secret, timestamp, d.body),
            EVENT_HEADER: str(d.event_id),
        }
        request = urllib.request.Request(d.url, data=d.body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.info("callback_failed", url=d.url, event_id=d.event_id, attempt=d.attempt + 1, error=str(exc))
            return False


#: Callbacks go straight to their URL: a proxy from the master's environment is not the receiver's network.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
