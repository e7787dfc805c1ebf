"""Status callbacks against real local HTTP receivers: retry with back-off, give-up, one dead URL blocks no other."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from structlog.testing import capture_logs

from master.callbacks import CallbackSender, verify
from master.store import Store
from ticketfarm.spec import Sweep
from tests.conftest import free_port, wait_for

SECRET = "s3cret"


class Receiver:
    """A real HTTP server answering each POST with the next status of `statuses` (the last one repeats)."""

    def __init__(self, *statuses: int, delay: float = 0.0) -> None:
        self.statuses = list(statuses) or [204]
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.tries: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.tries.append(time.time())
                time.sleep(delay)
                status = outer.statuses[min(len(outer.tries) - 1, len(outer.statuses) - 1)]
                if 200 <= status < 300:
                    assert verify(SECRET, self.headers["X-Ticketfarm-Timestamp"], body,
                                  self.headers["X-Ticketfarm-Signature"])
                    outer.posts.append((time.time(), json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def add_sweep(store: Store, name: str, url: str, tasks: int = 3) -> None:
    store.add_sweep(Sweep(name=name, params=[{"x": i} for i in range(tasks)], command="true"))
    store.set_callback(name, url, SECRET)
    store.commit()


def sender(store: Store, **kw: Any) -> CallbackSender:
    s = CallbackSender(store.path, 0, poll=0.02, **kw)
    s.ensure_started()
    return s


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/nobody-listens"


def test_a_failing_receiver_is_retried_with_backoff_then_delivered(store: Store) -> None:
    receiver = Receiver(500, 500, 200)
    cb = sender(store, attempts=5, backoff=0.2)
    try:
        add_sweep(store, "retried", receiver.url)
        wait_for(lambda: cb.delivered == 1, 10, "the callback after two refusals")
        first, second, third = receiver.tries[:3]
        assert second - first >= 0.18 and third - second >= 0.38  # 0.2 s, then doubled
        assert len(receiver.tries) == 3 and receiver.posts[0][1]["state"] == "active" and cb.given_up == 0
    finally:
        cb.stop()
        receiver.close()


def test_a_dead_receiver_is_given_up_after_the_configured_attempts_with_a_log_line(store: Store) -> None:
    with capture_logs() as logs:
        cb = sender(store, attempts=3, backoff=0.05)
        try:
            add_sweep(store, "dead", dead_url())
            wait_for(lambda: cb.given_up == 1, 10, "the callback given up")
            time.sleep(0.3)  # no fourth attempt, no second give-up
            assert cb.given_up == 1 and cb.delivered == 0 and not cb.queues
        finally:
            cb.stop()
    given_up = [e for e in logs if e["event"] == "callback_given_up"]
    assert len(given_up) == 1 and given_up[0]["attempts"] == 3 and given_up[0]["sweep"] == "dead"
    assert len([e for e in logs if e["event"] == "callback_failed"]) == 3
    assert not [e for e in logs if e["event"] == "callback_loop_failed"]


def test_a_dead_or_hanging_receiver_never_delays_another_sweeps_callbacks(store: Store) -> None:
    hanging = socket.socket()  # accepts connections (backlog) and never answers
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)
    good = Receiver(204)
    cb = sender(store, attempts=50, backoff=0.05, timeout=30)
    try:
        add_sweep(store, "hangs", f"http://127.0.0.1:{hanging.getsockname()[1]}/hook")
        add_sweep(store, "dead", dead_url())
        time.sleep(0.2)  # both stuck sweeps are being tried
        t0 = time.time()
        add_sweep(store, "fine", good.url)
        store.set_sweep_state("fine", "finished")
        store.commit()
        wait_for(lambda: len(good.posts) == 2, 5, "both callbacks of the healthy sweep")
        assert good.posts[-1][0] - t0 < 1.0
        assert [p["state"] for _, p in good.posts] == ["active", "finished"]
    finally:
        cb.stop()
        good.close()
        hanging.close()


def test_callback_counts_are_those_at_the_event(store: Store) -> None:
    receiver = Receiver(204)
    add_sweep(store, "counted", receiver.url, tasks=4)
    store.cancel_tasks("counted")
    store.set_sweep_state("counted", "cancelled")
    store.commit()
    store.requeue_task("counted", 0)  # the task counts change after the event was written
    store.commit()
    cb = sender(store)
    try:
        wait_for(lambda: len(receiver.posts) == 2, 10, "two callbacks")
        submitted, cancelled = (p for _, p in receiver.posts)
        assert submitted["counts"] == {"queued": 4}
        assert cancelled["state"] == "cancelled" and cancelled["counts"] == {"cancelled": 4}
    finally:
        cb.stop()
        receiver.close()
