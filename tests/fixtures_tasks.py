"""Module-level task functions for tests/test_python_api.py (importable, so they pickle by reference)."""
from __future__ import annotations

import os
import time


def square(x: int) -> int:
    return x * x


def add(x: int, y: int, offset: int = 0) -> int:
    return x + y + offset


def fail_with(message: str) -> None:
    inner_helper_that_raises(message)


def inner_helper_that_raises(message: str) -> None:
    raise ValueError(message)


def exit_hard(code: int) -> None:
    os._exit(code)


def slow_square(x: int, seconds: float = 0.02) -> int:
    time.sleep(seconds)
    return x * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def blob(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"!" * (size % 256)


def pid_of_worker(_: object = None) -> int:
    return os.getpid()


def square_or_exit(x: int, bad: int, runs: str) -> int:
    """Squares x, noting each run in `runs`/x; the worker process dies on x == bad."""
    with open(os.path.join(runs, str(x)), "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if x == bad:
        os._exit(3)
    return x * x


def square_or_hang(x: int, bad: int) -> int:
    if x == bad:
        time.sleep(60)
    return x * x


def chatty(x: int) -> int:
    import sys

    print(f"working on {x}")
    print(f"warning about {x}", file=sys.stderr)
    return x + 1
