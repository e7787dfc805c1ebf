"""Collected output and single result files as byte streams for HTTP downloads (never a whole file in memory)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from master.collect import _cell, _outputs_of, output_chunks
from master.store import Store
from ticketfarm.spec import Sweep

#: Download formats: the collection modes that produce one file.
FORMATS = ("concat", "blockwise", "csv", "jsonl")
#: Media type of each download format.
MEDIA_TYPES = {"concat": "application/octet-stream", "blockwise": "text/plain; charset=utf-8",
               "csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def collected(store: Store, state_dir: Path, sweep: Sweep, fmt: str, result: str | None) -> Iterator[bytes]:
    """The sweep's done tasks in task order, assembled as `fmt`; `result` picks one result (default: the first)."""
    if fmt in ("concat", "blockwise"):
        result = result or next(iter(sweep.results))
    if fmt == "concat":
        for idx, _params in store.done_tasks(sweep.name):
            for _name, output in _outputs_of(store, sweep.name, idx, result):
                yield from output_chunks(state_dir, output)
    elif fmt == "blockwise":
        for idx, params in store.done_tasks(sweep.name):
            header = " ".join(f"{k}={v}" for k, v in params.items())
            yield f"# task={idx} {header}\n".encode()
            last = b""
            for _name, output in _outputs_of(store, sweep.name, idx, result):
                for block in output_chunks(state_dir, output):
                    yield block
                    last = block or last
            if last and not last.endswith(b"\n"):
                yield b"\n"
    else:
        names = [result] if result else list(sweep.results)
        if fmt == "csv":
            yield _csv_line(["task", *sweep.param_names, *names])
        for idx, params in store.done_tasks(sweep.name):
            outputs = store.outputs(sweep.name, idx)
            row = {name: _cell(state_dir, outputs, name) for name in names}
            if fmt == "csv":
                yield _csv_line([idx, *params.values(), *row.values()])
            else:
                yield (json.dumps({"task": idx, "params": params, "results": row}) + "\n").encode()


def _csv_line(cells: list[object]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue().encode()
