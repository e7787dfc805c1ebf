"""Python functions as tickets: `Cluster` gives futures (submit, map, as_completed, attach) over a ticketfarm master.

    from ticketfarm import Cluster
    with Cluster(local=2) as cluster:
        print(list(cluster.map(pow, range(10), [2] * 10)))

Functions and arguments travel cloudpickled; a function is sent once per
cluster connection and cached by hash on the master and on each slave. One
background thread per `Cluster` owns the ZeroMQ socket: it batches submitted
tasks into `py_add` messages, receives the master's NOTIFY pushes (sent only
after the results are committed) and resolves the futures. See
docs/PYTHON-API.md; the wire ops are described in master/pysweep.py and docs/PROTOCOL.md.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import itertools
import json
import os
import pickle
import reprlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cloudpickle
import zmq

from ticketfarm.client import shipping

from master.config import MasterConfig
from ticketfarm import messages, pickles
from ticketfarm.errors import (
    ArgumentTooLarge,
    ClusterClosed,
    ConfigError,
    MasterRefused,
    MasterUnreachable,
    NotEnoughSlaves,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    TaskCancelled,
    TaskFailed,
)
from ticketfarm.keys import client_keys_for, dealer
from ticketfarm.protocol import FETCH_MAX
from ticketfarm.spec import PYTHON_RESULTS, Sweep

__all__ = ["Cluster", "SweepHandle", "TaskFuture", "TaskFailed", "TaskCancelled", "RemoteError", "as_completed"]

#: Tasks per py_add message at most (and about MAX_ADD_BYTES of arguments).
ADD_BATCH = 2000
MAX_ADD_BYTES = 4 * 1024 * 1024
#: Bytes per py_fetch request for a large result, and requests kept in flight.
FETCH_PIECE = FETCH_MAX
FETCH_WINDOW = 4
#: Seconds between the client's pings (they also keep its watches alive on the master).
PING_INTERVAL = 1.0
#: Seconds a Ctrl-C'd `with Cluster(...)` block waits for tasks being submitted to be stored (the master may be
#: stopping too: a terminal's Ctrl-C reaches a local cluster's master and slaves as well).
INTERRUPTED_CLOSE = 2.0
#: Bytes of a py_add message besides the pickled arguments and functions (header, reprs, the sweep's spec).
MESSAGE_HEADROOM = 64 * 1024


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, except that array-likes (numpy, torch, ...) are described, never rendered whole."""

    def repr1(self, x: Any, level: int) -> str:
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is not None and dtype is not None and not isinstance(x, type):
            return f"<{type(x).__name__} shape={tuple(shape)} dtype={dtype}>"
        return super().repr1(x, level)


_short = _ShortRepr()
_short.maxstring, _short.maxother, _short.maxlevel = 40, 40, 2


def _pickled(call: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[bytes, str]:
    """A call's pickled (args, kwargs) and its short repr; plain arguments take the C pickler and plain repr."""
    args, kwargs = call
    if pickles.is_plain(args) and (not kwargs or pickles.is_plain(kwargs)):
        text = repr(args)
        if len(text) > 40:
            text = _short.repr(args)[:200]
        return pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL), text
    return cloudpickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL), _short.repr(args)[:200]


@dataclass
class _Queued:
    """Submitted tasks first.. of one sweep and function, waiting for the client thread to send them (py_add)."""

    name: str
    first: int
    digest: str
    args: list[bytes]
    reprs: list[str]
    spec: Sweep


class TaskFuture(Future):
    """A `concurrent.futures.Future` for one task; cancel() also stops the task on the cluster."""

    def __init__(self, cluster: "Cluster", sweep: str, task: int):
        super().__init__()
        self.cluster, self.sweep, self.task = cluster, sweep, task

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if self.cancel_here():
            self.cluster.send_cancel(self.sweep, [self.task])
            return True
        return False

    def cancel_here(self) -> bool:
        """Cancel this future only (not the task on the cluster), notifying `wait` and `as_completed` at once:
        no executor thread will ever pick it up to do so, as in the standard library's executors."""
        if self.done() or not Future.cancel(self):
            return False
        self.set_running_or_notify_cancel()
        return True

    def __repr__(self) -> str:
        return f"<TaskFuture {self.sweep}[{self.task}] {self._state.lower()}>"


class _SweepState:
    """What the client knows of one sweep: its futures by task index, and whether it is watched."""

    def __init__(self, cluster: "Cluster", name: str):
        self.cluster, self.name = cluster, name
        self.futures: dict[int, TaskFuture] = {}
        self.next_index = 0
        self.watched = False

    def future(self, idx: int) -> TaskFuture:
        fut = self.futures.get(idx)
        if fut is None:
            fut = self.futures[idx] = TaskFuture(self.cluster, self.name, idx)
        return fut


class SweepHandle:
    """A named python sweep: its futures in task order, results in order, cancel; re-attachable by name."""

    def __init__(self, cluster: "Cluster", name: str, futures: list[TaskFuture]):
        self.cluster, self.name, self.futures = cluster, name, futures

    def __len__(self) -> int:
        return len(self.futures)

    def __iter__(self) -> Iterator[Any]:
        return self.results()

    def results(self, timeout: float | None = None) -> Iterator[Any]:
        """Each task's value in task order; a task's exception is raised when its turn comes; `timeout` bounds
        the whole wait, counted from this call (TimeoutError)."""
        return _in_order(self.futures, None if timeout is None else time.monotonic() + timeout)

    def as_completed(self, timeout: float | None = None) -> Iterator[TaskFuture]:
        return as_completed(self.futures, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every task has settled; True if they all did within `timeout`."""
        _, pending = concurrent.futures.wait(self.futures, timeout)
        return not pending

    def cancel(self) -> None:
        """Cancel the whole sweep: queued tasks dropped, running ones killed on their slaves."""
        self.cluster.cancel(self.name)

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "done": 0, "error": 0, "cancelled": 0}
        for f in self.futures:
            key = "pending" if not f.done() else "cancelled" if f.cancelled() else \
                "error" if f.exception() is not None else "done"
            out[key] += 1
        return out


def _in_order(futures: list[TaskFuture], deadline: float | None) -> Iterator[Any]:
    for fut in futures:
        yield fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))


class Cluster(concurrent.futures.Executor):
    """A connection to a ticketfarm master for running Python functions; or a private local cluster.

    A `concurrent.futures.Executor`: `submit`, `map(fn, *iterables, timeout=None, chunksize=1)`, `shutdown(wait,
    cancel_futures)`, and `with` (which shuts down waiting for every future, as executors do).

    Cluster(address="tcp://host:5555")  connect to a running master (`ticketfarm master`); CURVE keys from
                                        `keys=DIR` (master.key + client.key_secret), $TICKETFARM_KEYS,
                                        or $TICKETFARM_STATE/keys (plain TCP when none: insecure masters).
    Cluster(local=2, slots=1)           start a master and 2 local slaves in a child process
                                        (state in `state_dir`, or a temporary dir removed at close).
    `timeout` (s a task may run) and `max_attempts` are the defaults for submit(); map() may override them.
    """

    def __init__(self, address: str | None = None, *, local: int | None = None, slots: int = 1,
                 state_dir: str | os.PathLike[str] | None = None, heartbeat: float = 1.0, liveness: int = 5,
                 timeout: float = 3600.0, max_attempts: int = 3, prefetch: int = 64, durability: str = "full",
                 connect_timeout: float = 30.0, log_level: str = "warning",
                 keys: str | os.PathLike[str] | None = None):
        if (address is None) == (local is None):
            raise ConfigError("give exactly one of address= (a running master) or local=N (start one)",
                              field="address")
        self.timeout, self.max_attempts = float(timeout), int(max_attempts)
        self.session = uuid.uuid4().hex[:8]
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None
        self.local_slaves: list[int] = []
        if local is not None:
            address, keys = self._start_local(local, slots, state_dir, heartbeat, liveness, prefetch, durability,
                                              connect_timeout, log_level)
            self._keys = client_keys_for(None, keys) if keys else None
        else:
            self._keys = client_keys_for(Path(os.environ.get("TICKETFARM_STATE", ".ticketfarm")), keys)
        assert address is not None
        self.address = address
        self._lock = threading.Lock()
        self._sweeps: dict[str, _SweepState] = {}
        self._adds: deque[_Queued] = deque()
        self._outgoing: deque[list[bytes]] = deque()
        self._inflight: dict[int, list[bytes]] = {}
        self._replies: dict[int, Callable[[dict[str, Any], list[bytes]], None]] = {}
        self._rids = itertools.count(1)
        self._fn_cache: "weakref.WeakKeyDictionary[Any, tuple[str, bytes]]" = weakref.WeakKeyDictionary()
        self._fn_sent: set[str] = set()
        self._fn_bodies: dict[str, bytes] = {}
        self._last_fn: tuple[Callable[[], Any], tuple[str, bytes]] = (lambda: None, ("", b""))
        self._submit_specs: dict[tuple[float, int], Sweep] = {}
        self._wake_pending = False
        self._deferred: list[list[bytes]] = []
        self._fetches: dict[tuple[str, int], dict[str, Any]] = {}
        self._epoch: int | None = None
        self._closed = False
        self._shut_down = False
        self._message_limit = MasterConfig.max_message_size
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._context = zmq.Context()
        self._thread = threading.Thread(target=self._io_loop, name="ticketfarm-client", daemon=True)
        self._thread.start()
        # The epoch is known from the start: a master restarted before the first periodic ping is noticed too.
        hello = self._call("py_ping", {}, timeout=connect_timeout)
        self._epoch = hello.get("epoch")
        self._message_limit = int(hello.get("max_message_size", self._message_limit))
        atexit.register(self.close)

    # -- local cluster -------------------------------------------------------------------------
    def _start_local(self, n: int, slots: int, state_dir: Any, heartbeat: float, liveness: int, prefetch: int,
                     durability: str, connect_timeout: float, log_level: str) -> tuple[str, str | None]:
        if state_dir is None:
            state_dir = self._tmp = tempfile.mkdtemp(prefix="ticketfarm-")
        env = dict(os.environ)
        # Local slaves see the modules this process sees, so functions pickled by reference import there.
        paths = [str(Path(p or ".").resolve()) for p in sys.path if p == "" or Path(p).is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        cmd = [sys.executable, "-m", "ticketfarm.client.pylocal", "--state", str(state_dir), "--slaves", str(n),
               "--slots", str(slots), "--prefetch", str(prefetch), "--heartbeat", str(heartbeat),
               "--liveness", str(liveness), "--durability", durability, "--log-level", log_level]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(connect_timeout)
            raise MasterUnreachable(f"local ticketfarm master did not start (exit code {code})")
        info = json.loads(line)
        self.local_slaves = list(info["slaves"])
        return str(info["endpoint"]), info.get("keys")

    # -- public API --------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) on the cluster; returns its future (tasks join this client's submit sweep)."""
        key = (self.timeout, self.max_attempts)
        spec = self._submit_specs.get(key)
        if spec is None:
            spec = self._submit_specs[key] = self._spec(f"py-{self.session}", *key)
        return self._add(spec, fn, [(args, kwargs)])[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, task_timeout: float | None = None, max_attempts: int | None = None,
            name: str | None = None) -> Iterator[Any]:
        """Executor.map: fn over the zipped iterables as one sweep; yields results in input order.

        `timeout` bounds the wait in seconds, counted from this call (TimeoutError), as in Executor.map;
        `chunksize` is accepted for compatibility (tasks travel in batches anyway). `task_timeout` is each
        task's run-time limit, `max_attempts` how often a task whose worker died or timed out is tried;
        `name` names the sweep so another process can attach() to it. Unfinished tasks are cancelled when
        the iterator is closed early or raises, as Executor.map does.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        handle = self.sweep(fn, *iterables, timeout=task_timeout, max_attempts=max_attempts, name=name)
        return self._map_results(handle, deadline)

    def _map_results(self, handle: SweepHandle, deadline: float | None) -> Iterator[Any]:
        try:
            yield from _in_order(handle.futures, deadline)
        finally:
            self._cancel_unsettled(handle.futures, wait=False)

    def _cancel_unsettled(self, futures: Iterable[TaskFuture], wait: bool) -> None:
        """Cancel the futures not settled yet, with one py_cancel per sweep (waited for with `wait`)."""
        by_sweep: dict[str, list[int]] = {}
        for fut in futures:
            if fut.task >= 0 and fut.cancel_here():
                by_sweep.setdefault(fut.sweep, []).append(fut.task)
        for name, tasks in by_sweep.items():
            if wait:
                self._call("py_cancel", {"sweep": name, "tasks": tasks})
            else:
                self.send_cancel(name, tasks)

    def sweep(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
              max_attempts: int | None = None, name: str | None = None) -> SweepHandle:
        """Like map(), but returns the `SweepHandle` (futures, cancel, name) instead of an iterator."""
        name = name or f"py-{self.session}-{uuid.uuid4().hex[:6]}"
        spec = self._spec(name, timeout if timeout is not None else self.timeout,
                          max_attempts if max_attempts is not None else self.max_attempts)
        futures = self._add(spec, fn, [(args, {}) for args in zip(*iterables)])
        return SweepHandle(self, name, futures)

    def attach(self, name: str, timeout: float = 30.0) -> SweepHandle:
        """A sweep submitted earlier (by any process) by name: futures for all its tasks, settled ones resolved."""
        state = self._state(name)
        reply = self._call("py_watch", {"sweep": name}, timeout=timeout)
        state.watched = True
        with self._lock:
            futures = [state.future(i) for i in range(int(reply["ntasks"]))]
        return SweepHandle(self, name, futures)

    @staticmethod
    def as_completed(fs: Iterable[Future], timeout: float | None = None) -> Iterator[Future]:
        return as_completed(fs, timeout)

    def cancel(self, name: str) -> bool:
        """Cancel a whole sweep by name."""
        reply = self._call("py_cancel", {"sweep": name})
        state = self._sweeps.get(name)
        if state is not None:
            for fut in list(state.futures.values()):
                fut.cancel_here()
        return bool(reply.get("ok"))

    def status(self) -> dict[str, Any]:
        """The master's status: sweeps with their counts (as `ticketfarm status --json`)."""
        return self._call("status", {})

    def slots(self) -> int:
        """Slots of the slaves connected now: how many tasks run at once."""
        return int(self._call("ping", {}).get("slots", 0))

    @property
    def _max_workers(self) -> int:
        # What Dask reads from an executor to size its batches (dask.compute(scheduler=cluster), and
        # dask.config.set(pool=cluster) for the threaded scheduler), as it does from the stdlib's executors.
        return max(1, self.slots())

    def wait_for_slaves(self, n: int, timeout: float = 30.0) -> None:
        """Block until at least n slaves are connected to the master."""
        deadline = time.monotonic() + timeout
        while self._call("ping", {}).get("slaves", 0) < n:
            if time.monotonic() > deadline:
                raise NotEnoughSlaves(f"fewer than {n} slaves connected after {timeout:g}s")
            time.sleep(0.05)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """As Executor's (wait for every future), but Ctrl-C leaves at once: a local cluster stops, what its slaves
        ran or held goes back without an attempt charged, and every result stored stays in its state dir."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._shut_down = True
            try:
                self.close(timeout=INTERRUPTED_CLOSE)
            except MasterUnreachable:  # the user stopped it: what was not stored yet is theirs to submit again
                pass
        else:
            self.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor.shutdown: no new tasks; `cancel_futures` cancels every unsettled one on the cluster, `wait`
        blocks until every future of this client has settled; then close(). After close() it does nothing: no
        future settles any more."""
        if self._closed:
            return
        self._shut_down = True
        with self._lock:
            futures = [f for state in self._sweeps.values() for f in state.futures.values()]
        if cancel_futures and not self._closed:
            self._cancel_unsettled(futures, wait=True)
        if wait:
            concurrent.futures.wait(futures)
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the client thread once the master has stored every submitted task.

        It waits as long as the master keeps storing them; after `timeout` s in which none was stored it gives
        up and raises MasterUnreachable with the number of tasks the master never stored (nothing is dropped
        unsaid). A local cluster's master and slaves are stopped and its temporary state removed; tasks on a
        remote master keep running and can be collected later with attach().
        """
        if self._closed:
            return
        self._wait_until_stored(timeout)
        waiting, unanswered = self._unsent(), len(self._inflight)
        self._shut_client()
        if waiting or unanswered:
            raise MasterUnreachable(f"the master at {self.address} stored nothing more within {timeout:g}s: "
                                    f"{waiting} task(s) not sent and {unanswered} batch(es) unconfirmed may not be "
                                    "submitted; attach() shows what was stored: submit the rest again")

    def _wait_until_stored(self, timeout: float) -> None:
        """Wait while tasks wait to be stored, as long as the master stores some every `timeout` s."""
        def pending() -> int:
            return self._unsent() + len(self._inflight)

        left, deadline = pending(), time.monotonic() + timeout
        while pending() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
            if pending() < left:  # progress: the master is storing them, give it time for the rest
                left, deadline = pending(), time.monotonic() + timeout

    def _shut_client(self) -> None:
        self._closed = True
        atexit.unregister(self.close)
        self._wake()
        self._thread.join(5)
        self._context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                self._proc.wait(5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- submitting --------------------------------------------------------------------------------
    def _spec(self, name: str, timeout: float, max_attempts: int) -> Sweep:
        if timeout <= 0 or max_attempts < 1:
            raise ConfigError(f"timeout must be > 0 and max_attempts >= 1, got {timeout!r} and {max_attempts!r}",
                              field="timeout" if timeout <= 0 else "max_attempts")
        return Sweep(name=name, params=[], kind="python", timeout=float(timeout), max_attempts=int(max_attempts),
                     results=dict(PYTHON_RESULTS))

    def _function(self, fn: Callable[..., Any]) -> tuple[str, bytes]:
        last, cached = self._last_fn
        if last() is fn:  # a loop of submit() calls: no weak reference made per call
            return cached
        try:
            cached = self._fn_cache.get(fn)
        except TypeError:  # not weak-referenceable (a builtin): pickle it each time
            cached = None
        if cached is None:
            shipping.by_value_if_own(fn)
            body = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
            cached = (hashlib.sha256(body).hexdigest(), body)
            try:
                self._fn_cache[fn] = cached
            except TypeError:
                return cached
        self._last_fn = (weakref.ref(fn), cached)
        return cached

    def _add(self, spec: Sweep, fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
             ) -> list[TaskFuture]:
        if self._closed or self._shut_down:
            raise ClusterClosed("cannot schedule new futures after shutdown: open a new Cluster to submit more work")
        digest, body = self._function(fn)
        pickled = [_pickled(c) for c in calls]
        refused = {i: self._too_large(fn, len(p), len(body)) for i, (p, _) in enumerate(pickled)
                   if len(p) + len(body) + MESSAGE_HEADROOM > self._message_limit}
        if refused:
            pickled = [p for i, p in enumerate(pickled) if i not in refused]
        with self._lock:
            state = self._state(spec.name)
            first = state.next_index
            state.next_index += len(pickled)
            indices = iter(range(first, first + len(pickled)))
            # A refused call takes no task index: the next ones stay contiguous, as the master requires.
            futures = [refused[i] if i in refused else state.future(next(indices)) for i in range(len(calls))]
            if not state.watched:
                state.watched = True
                watch = True
            else:
                watch = False
            if pickled:
                self._adds.append(_Queued(spec.name, first, digest, [p for p, _ in pickled],
                                          [text for _, text in pickled], spec))
            self._fn_bodies[digest] = body
        if watch:
            # Queued after the adds (the thread flushes adds first), so the sweep exists when watched.
            self._request_async("py_watch", {"sweep": spec.name}, defer=True)
        self._wake()
        return futures

    def _too_large(self, fn: Callable[..., Any], size: int, body: int) -> TaskFuture:
        """A future failed at once: these arguments could never reach the master (it drops larger messages)."""
        fut = TaskFuture(self, "", -1)
        fut.set_exception(ArgumentTooLarge(
            f"the arguments of {getattr(fn, '__qualname__', fn)!r} pickle to {size} bytes ({body} more for the "
            f"function): over the master's max_message_size of {self._message_limit} bytes; pass large data by "
            f"path (a file the workers can read) or raise max_message_size in master.toml"))
        return fut

    def _state(self, name: str) -> _SweepState:
        state = self._sweeps.get(name)
        if state is None:
            state = self._sweeps[name] = _SweepState(self, name)
        return state

    def send_cancel(self, sweep: str, tasks: list[int]) -> None:
        """Ask the master to cancel these tasks; the reply is not waited for (Future.cancel)."""
        self._request_async("py_cancel", {"sweep": sweep, "tasks": tasks})

    # -- requests -----------------------------------------------------------------------------------
    def _frames(self, op: str, header: dict[str, Any]) -> tuple[int, list[bytes]]:
        rid = next(self._rids)
        return rid, messages.Control(op, header, rid).encode()

    def _request_async(self, op: str, header: dict[str, Any],
                       on_reply: Callable[[dict[str, Any], list[bytes]], None] | None = None,
                       defer: bool = False) -> None:
        rid, frames = self._frames(op, header)
        with self._lock:
            if on_reply is not None:
                self._replies[rid] = on_reply
            if defer:
                self._deferred.append(frames)
            else:
                self._outgoing.append(frames)
        self._wake()

    def _call(self, op: str, header: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one request from a user thread and wait for its reply."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking call from the client thread")
        done = threading.Event()
        box: list[dict[str, Any]] = []

        def on_reply(reply: dict[str, Any], payload: list[bytes]) -> None:
            box.append(reply)
            done.set()

        self._request_async(op, header, on_reply)
        if not done.wait(timeout):
            raise MasterUnreachable(f"no answer from the master at {self.address} to {op!r} within {timeout:g}s")
        reply = box[0]
        if not reply.get("ok", False) and op not in ("py_cancel",):
            raise MasterRefused(f"master refused {op!r}: {reply.get('error', reply)}")
        return reply

    def _wake(self) -> None:
        """Wake the client thread, unless a wake-up is pending already: what it flushes then takes this too. (A
        write per submit() also handed the GIL to the client thread at each call.)"""
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the client thread ---------------------------------------------------------------------------
    def _io_loop(self) -> None:
        sock = dealer(self._context, self.address, self._keys, hwm=0)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_ping = time.monotonic() + PING_INTERVAL
        try:
            while not self._closed:
                ready = dict(poller.poll(int(PING_INTERVAL * 250)))
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if sock in ready:
                    self._receive(sock)
                self._wake_pending = False  # before the flush: a task queued after it wakes this thread again
                self._flush(sock)
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + PING_INTERVAL
                    self._ping()
                    self._flush(sock)
        finally:
            sock.close(linger=0)

    def _flush(self, sock: zmq.Socket) -> None:
        with self._lock:
            adds = self._take_adds()
            outgoing, self._outgoing = self._outgoing, deque()
            deferred, self._deferred = self._deferred, []
        for rid, frames in adds:
            self._inflight[rid] = frames
            sock.send_multipart(frames)
        for frames in itertools.chain(deferred, outgoing):
            sock.send_multipart(frames)

    def _take_adds(self) -> list[tuple[int, list[bytes]]]:
        """Group queued tasks into py_add messages (per sweep, in order); called with the lock held."""
        out = []
        while self._adds:
            name, first, spec = self._adds[0].name, self._adds[0].first, self._adds[0].spec
            calls: list[messages.PyCall] = []
            new_fns: list[str] = []
            size = 0
            while self._adds and self._adds[0].name == name and len(calls) < ADD_BATCH:
                queued = self._adds[0]
                if queued.digest not in self._fn_sent and queued.digest not in new_fns:
                    new_fns.append(queued.digest)
                    size += len(self._fn_bodies[queued.digest])
                taken = 0
                for arg in queued.args[:ADD_BATCH - len(calls)]:
                    if (calls or taken) and size + len(arg) > MAX_ADD_BYTES:
                        break  # the next message takes it: each stays within what the master accepts
                    size += len(arg)
                    taken += 1
                calls += map(messages.PyCall, itertools.repeat(queued.digest, taken), queued.args[:taken],
                             queued.reprs[:taken])
                if taken < len(queued.args):
                    queued.first += taken
                    del queued.args[:taken], queued.reprs[:taken]
                    break
                self._adds.popleft()
            self._fn_sent.update(new_fns)
            rid = next(self._rids)
            frames = messages.PyAdd(name, first, calls, {d: self._fn_bodies[d] for d in new_fns},
                                    spec.to_json()).control(rid).encode()
            self._replies[rid] = self._on_added(name, first, len(calls))
            out.append((rid, frames))
        return out

    def _unsent(self) -> int:
        """Tasks submitted and not sent to the master yet."""
        return sum(len(queued.args) for queued in self._adds)

    def _on_added(self, name: str, first: int, count: int) -> Callable[[dict[str, Any], list[bytes]], None]:
        def on_reply(reply: dict[str, Any], payload: list[bytes]) -> None:
            if not reply.get("ok"):
                error = MasterRefused(f"master refused tasks of {name!r}: {reply.get('error')}")
                state = self._sweeps[name]
                for idx in range(first, first + count):
                    fut = state.futures.get(idx)
                    if fut is not None and not fut.done():
                        fut.set_exception(error)
        return on_reply

    def _ping(self) -> None:
        def on_reply(reply: dict[str, Any], payload: list[bytes]) -> None:
            epoch = reply.get("epoch")
            if self._epoch is not None and epoch != self._epoch:
                self._master_restarted()
            self._epoch = epoch
        rid, frames = self._frames("py_ping", {})
        self._replies[rid] = on_reply
        self._outgoing.append(frames)

    def _master_restarted(self) -> None:
        """A new master epoch: send unanswered adds again (they are idempotent) and watch again."""
        for frames in list(self._inflight.values()):
            self._outgoing.append(frames)
        for state in self._sweeps.values():
            if state.watched:
                _, frames = self._frames("py_watch", {"sweep": state.name})
                self._outgoing.append(frames)

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                # A malformed NOTIFY is dropped whole: resolving from it could give a future another task's bytes.
                msg = messages.decode(frames)
            except ProtocolError:
                continue
            if isinstance(msg, messages.Notify):
                self._on_notify(msg)
            elif isinstance(msg, messages.Reply):
                self._inflight.pop(msg.rid, None)
                callback = self._replies.pop(msg.rid, None)
                if callback is not None:
                    callback(msg.as_dict(), msg.payload)

    def _on_notify(self, msg: messages.Notify) -> None:
        name = msg.sweep
        with self._lock:
            state = self._state(name)
            pairs = [(task, state.future(task.task)) for task in msg.tasks]
        for task, fut in pairs:
            if fut.done():
                continue
            if task.data is not None:
                _resolve(fut, task.output, task.data)
            elif task.state == "done":
                self._start_fetch(fut, task.output, task.size)
            elif task.state == "cancelled":
                fut.cancel_here()
            else:
                fut.set_exception(TaskFailed(task.reason or task.state, name, fut.task))

    def _start_fetch(self, fut: TaskFuture, output: str, size: int) -> None:
        key = (fut.sweep, fut.task)
        if key in self._fetches:
            return
        self._fetches[key] = {"fut": fut, "output": output, "size": size, "buf": bytearray(size), "next": 0,
                              "got": 0}
        for _ in range(FETCH_WINDOW):
            self._fetch_next(key)

    def _fetch_next(self, key: tuple[str, int]) -> None:
        f = self._fetches[key]
        if f["next"] >= f["size"]:
            return
        offset = f["next"]
        length = min(FETCH_PIECE, f["size"] - offset)
        f["next"] += length
        rid, frames = self._frames("py_fetch", {"sweep": key[0], "task": key[1], "name": f["output"],
                                                "offset": offset, "length": length})

        def on_reply(reply: dict[str, Any], payload: list[bytes]) -> None:
            if key not in self._fetches:
                return
            if not reply.get("ok") or not payload:
                del self._fetches[key]
                f["fut"].set_exception(RemoteError(f"cannot fetch result: {reply.get('error')}"))
                return
            piece = payload[0]
            f["buf"][offset:offset + len(piece)] = piece
            f["got"] += len(piece)
            if len(piece) != length:
                del self._fetches[key]
                f["fut"].set_exception(RemoteError(f"result of {key[0]}[{key[1]}] changed while fetched"))
            elif f["got"] >= f["size"]:
                del self._fetches[key]
                buf = f.pop("buf")
                _resolve(f["fut"], f["output"], buf)
            else:
                self._fetch_next(key)

        self._replies[rid] = on_reply
        self._outgoing.append(frames)


def _resolve(fut: TaskFuture, output: str, data: bytes | bytearray) -> None:
    """Unpickle a task's stored result (or exception) into its future."""
    try:
        value = cloudpickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - e.g. a class this process cannot import
        fut.set_exception(RemoteError(f"cannot unpickle the {output} of {fut.sweep}[{fut.task}]: {exc!r}"))
        return
    if output == "result":
        fut.set_result(value)
        return
    exc, tb = value
    if isinstance(exc, BaseException):
        tb = shipping.named_traceback(tb)
        exc.__cause__ = RemoteTraceback(tb)
        try:
            exc.add_note(f"remote traceback (task {fut.sweep}[{fut.task}]):\n{tb}")
        except AttributeError:  # pragma: no cover - Python < 3.11
            pass
        fut.set_exception(exc)
    else:
        fut.set_exception(RemoteError(f"{exc!r}\n{tb}"))
