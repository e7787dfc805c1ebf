"""A warm Python worker process (one per slot): calls cloudpickled functions its slave sends over a pipe.

Started by slave/pypool.py as `python -m slave.pyworker READ_FD WRITE_FD`. Each request is a pickled
list of tasks `(ticket, fn_hash, fn_body_or_None, pickled_args, result_dir)`, run in order; functions
are cached by hash, so a body crosses the pipe once per worker. Answers go back as pickled lists of
`(ticket, "result"|"error", data_or_None, path_or_None, size, elapsed, printed)`, in task order: a value
larger than INLINE_LIMIT is written to `result_dir/<name>` instead of travelling through the pipe;
`printed` maps "stdout"/"stderr" to what the task wrote to sys.stdout/sys.stderr (only streams it wrote
to, the last PRINTED_LIMIT bytes of each).
Answers are sent when the request's last task is done, or as soon as FLUSH_AFTER seconds have passed
since the last answer, so a slow task's answer never waits for the tasks behind it.
"""
from __future__ import annotations

import io
import pickle
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import cloudpickle

from ticketfarm import pickles
from ticketfarm.errors import RemoteError
from ticketfarm.protocol import INLINE_LIMIT

#: Answers are held back at most this long while more tasks of the same request run.
FLUSH_AFTER = 0.001
#: What a task printed is kept up to this size per stream (the end of it: that is where errors are),
#: small enough to travel inline in a RESULT.
PRINTED_LIMIT = INLINE_LIMIT - 1024

Answer = tuple[int, str, "bytes | None", "str | None", int, float, dict[str, bytes]]


def call(functions: dict[str, Callable[..., Any]], digest: str, body: bytes | None, args: bytes) -> tuple[str, bytes]:
    """Run one task; ("result", pickled value) or ("error", pickled (exception, traceback text))."""
    try:
        if body is not None and digest not in functions:
            functions[digest] = cloudpickle.loads(body)
        fn = functions[digest]
        posargs, kwargs = cloudpickle.loads(args)
        value = fn(*posargs, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a task is the task's error, not ours
        tb = "".join(traceback.format_exception(exc))
        try:
            return "error", cloudpickle.dumps((exc, tb))
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled still reports its text
            return "error", cloudpickle.dumps((RemoteError(f"{type(exc).__qualname__}: {exc}"), tb))
    try:
        return "result", pickles.dumps(value)
    except Exception as exc:  # noqa: BLE001
        tb = "".join(traceback.format_exception(exc))
        return "error", cloudpickle.dumps((RemoteError(f"result cannot be pickled: {exc}"), tb))


class Printed:
    """sys.stdout and sys.stderr while a task runs, into buffers reused from task to task."""

    def __init__(self) -> None:
        self.streams = (("stdout", io.StringIO()), ("stderr", io.StringIO()))

    def __enter__(self) -> "Printed":
        sys.stdout, sys.stderr = self.streams[0][1], self.streams[1][1]
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

    def take(self) -> dict[str, bytes]:
        """What the task printed, per stream it wrote to; the buffers are empty again."""
        out = {}
        for name, buf in self.streams:
            if buf.tell():
                out[name] = tail(buf.getvalue())
                buf.seek(0)
                buf.truncate()
        return out


def run_one(functions: dict[str, Callable[..., Any]], printed: Printed,
            task: tuple[int, str, bytes | None, bytes, str]) -> Answer:
    ticket, digest, body, args, result_dir = task
    started = time.perf_counter()
    with printed:
        name, data = call(functions, digest, body, args)
    elapsed = time.perf_counter() - started
    size = len(data)
    if size <= INLINE_LIMIT:
        return ticket, name, data, None, size, elapsed, printed.take()
    path = Path(result_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ticket, name, None, str(path), size, elapsed, printed.take()


def tail(text: str) -> bytes:
    """A stream's text as UTF-8, cut to its last PRINTED_LIMIT bytes with a note of what was cut."""
    data = text.encode(errors="replace")
    if len(data) <= PRINTED_LIMIT:
        return data
    cut = len(data) - PRINTED_LIMIT
    return f"[... {cut} bytes cut ...]\n".encode() + data[cut:]


def serve(rx: Connection, tx: Connection) -> int:
    functions: dict[str, Callable[..., Any]] = {}
    printed = Printed()
    while True:
        try:
            raw = rx.recv_bytes()
        except EOFError:  # the slave went away
            return 0
        answers: list[Answer] = []
        last_sent = time.monotonic()
        for task in pickle.loads(raw):
            answers.append(run_one(functions, printed, task))
            if time.monotonic() - last_sent >= FLUSH_AFTER:
                tx.send_bytes(pickle.dumps(answers, protocol=pickle.HIGHEST_PROTOCOL))
                answers, last_sent = [], time.monotonic()
        if answers:
            tx.send_bytes(pickle.dumps(answers, protocol=pickle.HIGHEST_PROTOCOL))


def main(argv: list[str]) -> int:
    rx = Connection(int(argv[0]), writable=False)
    tx = Connection(int(argv[1]), readable=False)
    return serve(rx, tx)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
