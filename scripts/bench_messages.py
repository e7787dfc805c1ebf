#!/usr/bin/env python3
"""Benchmark: CPU time of the message codecs on the hot path, per task, in batches as the master and slaves send them.

    python scripts/bench_messages.py [--batch 256] [--repeat 9]

For each hot-path message (python and command TICKET, RESULT, NOTIFY) it times encode and decode
(`messages.decode`: framing, the nesting check, every field's check) and prints the best of
`--repeat` runs in µs per task, as CPU time of this process: unlike the end-to-end benchmarks it
barely moves when other processes share the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ticketfarm import messages  # noqa: E402
from ticketfarm.spec import PYTHON_RESULTS  # noqa: E402

SHA = "ab" * 32


def per_task(fn: Callable[[], object], batch: int, repeat: int, loops: int = 40) -> float:
    """Best CPU µs per task of `fn` (which handles one batch) over `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(loops):
            fn()
        best = min(best, (time.process_time() - started) / (loops * batch))
    return best * 1e6


def samples(batch: int) -> dict[str, messages.AnyMessage]:
    python = messages.TicketSweep("bench", 3600.0, dict(PYTHON_RESULTS), kind="python")
    command = messages.TicketSweep("bench", 3600.0, {"stdout": "stdout"}, command="echo {n} {name}",
                                   env={"LANG": "C"})
    return {
        "TICKET (python)": messages.Ticket(python, [messages.TicketEntry((7 << 32) + i, i, 1, fn=SHA, args=b"a" * 40)
                                                    for i in range(batch)]),
        "TICKET (command)": messages.Ticket(command, [messages.TicketEntry((7 << 32) + i, i, 1,
                                                                           {"n": i, "name": f"x{i}"})
                                                     for i in range(batch)]),
        "RESULT": messages.Result([messages.ResultEntry((7 << 32) + i, 0, 0.001,
                                                        [messages.ResultOutput("result", 20, b"r" * 20)])
                                   for i in range(batch)]),
        "NOTIFY": messages.Notify("bench", [messages.Settled(i, "done", "result", 20, b"r" * 20)
                                            for i in range(batch)]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="tasks per message (the senders' batch size)")
    parser.add_argument("--repeat", type=int, default=9, help="runs per figure; the best is printed")
    args = parser.parse_args()
    print(f"{'message':18s} {'encode µs/task':>15s} {'decode µs/task':>15s}")
    total = 0.0
    for name, msg in samples(args.batch).items():
        frames = msg.encode()
        assert messages.decode(frames) == msg
        encode = per_task(msg.encode, args.batch, args.repeat)
        decode = per_task(lambda: messages.decode(frames), args.batch, args.repeat)
        if name != "TICKET (command)":
            total += encode + decode
        print(f"{name:18s} {encode:15.2f} {decode:15.2f}")
    print(f"a python task's TICKET + RESULT + NOTIFY, encoded and decoded: {total:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
