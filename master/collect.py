"""Collection: each collect format (concat, blockwise, csv/jsonl table, folders, failed-tasks CSV) made once, as bytes.

The CLI writes these chunks to files and the HTTP API sends the very same chunks, so a download is byte for
byte what `ticketfarm collect` writes. Nothing is read whole: results stream from the store a block at a time.
A folders collection is a tree, not one file: it is made once as a stream of `Entry` (path, bytes) that the
CLI writes as files and HTTP sends as a tar archive (which the CLI, going through HTTP, writes as the same files).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import tarfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterable, Iterator

from master.store import Store, StoredOutput
from ticketfarm.errors import CollectionCollision, TicketfarmError
from ticketfarm.spec import CollectRule, Sweep

READ_SIZE = 1024 * 1024
#: In an output dir: which sweep each collected path (file or folder) came from, so no sweep overwrites another's.
LEDGER = ".ticketfarm-collections.json"
#: Results larger than this appear in tables as their stored file's path on the master, not their content.
TABLE_CELL_LIMIT = 64 * 1024
#: How a CSV table cell that holds bytes rather than UTF-8 text begins (the rest is base64).
BASE64_PREFIX = "base64:"
#: Every collection format: a collect rule's (table rules by their `format`), and the failed-tasks CSV.
FORMATS = ("concat", "blockwise", "csv", "jsonl", "folders", "failed")
#: Media type of each format when it is downloaded.
MEDIA_TYPES = {"concat": "application/octet-stream", "blockwise": "text/plain; charset=utf-8",
               "csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson",
               "folders": "application/x-tar", "failed": "text/csv; charset=utf-8"}
#: File name of each format when it is downloaded, given the sweep's name.
DOWNLOAD_NAMES = {"concat": "{}.out", "blockwise": "{}.txt", "csv": "{}.csv", "jsonl": "{}.jsonl",
                  "folders": "{}.tar", "failed": "{}-failed.csv"}


class CollectError(TicketfarmError):
    """An unknown format, a stored result that cannot be collected as recorded, or a folders archive that is not one."""


class ResultsRemoved(CollectError):
    """The sweep's results were removed after a collection: collecting them again would look like empty outputs."""

    def __init__(self, sweep: str, removed: float):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(removed))
        super().__init__(f"the results of sweep {sweep!r} were removed after collection ({when}); only its "
                         "failed-tasks list is still there (HTTP: format=failed)")
        self.removed = removed


def ensure_not_removed(store: Store, sweep: str) -> None:
    """Refuse to collect a sweep whose results were removed, rather than write empty outputs."""
    removed = store.results_removed(sweep)
    if removed is not None:
        raise ResultsRemoved(sweep, removed)


@dataclass
class Part:
    """One file (or folder, for "folders") of a sweep's collection: its path under the output dir, format, result."""

    path: str
    format: str
    result: str | None = None


@dataclass
class Entry:
    """One file of a folders collection: its path inside the folder, its size and its bytes (read when iterated)."""

    path: str
    size: int
    chunks: Iterator[bytes]


def parts(name: str, rules: Iterable[CollectRule], has_failures: bool) -> list[Part]:
    """What collecting a sweep writes: one part per collect rule, then `<name>-failed.csv` if any task failed."""
    out = [Part(r.path, r.format if r.mode == "table" else r.mode, r.result) for r in rules]
    if has_failures:
        out.append(Part(f"{name}-failed.csv", "failed"))
    return out


def output_chunks(state_dir: Path, output: StoredOutput) -> Iterator[bytes]:
    """The bytes of one stored output, a block at a time (large files are never read whole)."""
    if output.data is not None:
        yield output.data
        return
    assert output.path is not None
    with open(state_dir / output.path, "rb") as fh:
        while block := fh.read(READ_SIZE):
            yield block


@dataclass
class Collector:
    """Every collection format of one sweep, read from its store; each method yields the format's bytes."""

    store: Store
    state_dir: Path
    sweep: Sweep

    @cached_property
    def columns(self) -> list[str]:
        """Parameter columns, in the sweep's parameter order (a python sweep's: the call, as `repr`)."""
        return ["repr"] if self.sweep.kind == "python" else self.store.param_names(self.sweep.name)

    def chunks(self, fmt: str, result: str | None = None) -> Iterator[bytes]:
        """The bytes of format `fmt` (one of FORMATS); `result` picks one result (concat/blockwise: the first)."""
        if fmt in ("concat", "blockwise"):
            result = result or next(iter(self.sweep.results))
        if fmt == "concat":
            return self.concat(result)
        if fmt == "blockwise":
            return self.blockwise(result)
        if fmt == "csv":
            return self.table_csv(result)
        if fmt == "jsonl":
            return self.table_jsonl(result)
        if fmt == "folders":
            return tar_stream(self.folder_entries(result))
        if fmt == "failed":
            return self.failed_csv()
        raise CollectError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def concat(self, result: str | None) -> Iterator[bytes]:
        """The result of every done task in task order, as stored (a glob result's files in name order)."""
        for idx, _params in self.store.done_tasks(self.sweep.name):
            for _name, output in self._outputs_of(idx, result):
                yield from output_chunks(self.state_dir, output)

    def blockwise(self, result: str | None) -> Iterator[bytes]:
        """Per done task a `# task=N a=.. b=..` line, then each of its files, each ending with a newline."""
        for idx, params in self.store.done_tasks(self.sweep.name):
            header = " ".join([f"task={idx}", *(f"{c}={params.get(c)}" for c in self.columns)])
            yield f"# {header}\n".encode()
            for _name, output in self._outputs_of(idx, result):
                last = b""
                for block in output_chunks(self.state_dir, output):
                    yield block
                    last = block or last
                if last and not last.endswith(b"\n"):
                    yield b"\n"

    def table_csv(self, result: str | None) -> Iterator[bytes]:
        """A header `task,<parameters>,<results>`, then a row per done task (cells under their header's name)."""
        names = self._table_results(result)
        yield _csv_line(["task", *self.columns, *names])
        for idx, params in self.store.done_tasks(self.sweep.name):
            outputs = self.store.outputs(self.sweep.name, idx)
            yield _csv_line([idx, *(params.get(c) for c in self.columns),
                             *(csv_cell(self._cell(outputs, n)) for n in names)])

    def table_jsonl(self, result: str | None) -> Iterator[bytes]:
        """A line `{"task", "params", "results"}` per done task, parameters in the sweep's order."""
        names = self._table_results(result)
        for idx, params in self.store.done_tasks(self.sweep.name):
            outputs = self.store.outputs(self.sweep.name, idx)
            line = {"task": idx, "params": self._ordered(params),
                    "results": {n: json_cell(self._cell(outputs, n)) for n in names}}
            yield (json.dumps(line) + "\n").encode()

    def folder_entries(self, result: str | None) -> Iterator[Entry]:
        """Per done task `<task>/params.json` and `<task>/<output name>` for each output (of `result`, or all)."""
        for idx, params in self.store.done_tasks(self.sweep.name):
            call = json.dumps(self._ordered(params)).encode()
            yield Entry(f"{idx}/params.json", len(call), iter([call]))
            for name, output in self._outputs_of(idx, result):
                yield Entry(f"{idx}/{name}", output.size, output_chunks(self.state_dir, output))

    def failed_csv(self) -> Iterator[bytes]:
        """A header `task,<parameters>,reason`, then a row per failed task with its reason."""
        yield _csv_line(["task", *self.columns, "reason"])
        for idx, params, reason in self.store.failed_tasks(self.sweep.name):
            yield _csv_line([idx, *(params.get(c) for c in self.columns), reason])

    def _table_results(self, result: str | None) -> list[str]:
        return [result] if result else list(self.sweep.results)

    def _ordered(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters in the sweep's order, whatever order a JSON-lines row gave them in."""
        first = {c: params[c] for c in self.columns if c in params}
        return {**first, **{k: v for k, v in params.items() if k not in first}}

    def _outputs_of(self, idx: int, result: str | None) -> list[tuple[str, StoredOutput]]:
        """A task's outputs of one result (a glob result has several), or all of them, in name order."""
        outputs = self.store.outputs(self.sweep.name, idx)
        return sorted((n, o) for n, o in outputs.items()
                      if result is None or n == result or n.startswith(result + "/"))

    def _cell(self, outputs: dict[str, StoredOutput], name: str) -> str | bytes:
        """A result as a table cell: its text (or its bytes when not UTF-8), its file's path when large, a glob
        result's matched paths."""
        output = outputs.get(name)
        if output is None:
            matches = sorted(n for n in outputs if n.startswith(name + "/"))
            return " ".join(m.partition("/")[2] for m in matches)
        if output.size > TABLE_CELL_LIMIT:
            return str((self.state_dir / output.path).resolve()) if output.path else f"<{output.size} bytes>"
        data = b"".join(output_chunks(self.state_dir, output))
        try:
            return data.decode().strip()
        except UnicodeDecodeError:
            return data  # a pickle, an image: written base64-encoded, never with bytes replaced


def csv_cell(value: str | bytes) -> str:
    """A CSV cell: text as it is; bytes that are not UTF-8 (and text that starts with the prefix) as
    `base64:<data>`, so every cell decodes back to exactly what the task wrote."""
    if isinstance(value, str) and not value.startswith(BASE64_PREFIX):
        return value
    raw = value if isinstance(value, bytes) else value.encode()
    return BASE64_PREFIX + base64.b64encode(raw).decode()


def json_cell(value: str | bytes) -> str | dict[str, str]:
    """A JSON-lines cell: text as a string, bytes that are not UTF-8 as {"base64": "<data>"}."""
    return value if isinstance(value, str) else {"base64": base64.b64encode(value).decode()}


def _csv_line(cells: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue().encode()


# -- writing a collection to files ---------------------------------------------------------------------------
def check_claims(out_dir: Path, sweep: str, paths: Iterable[str]) -> dict[str, str]:
    """The output dir's ledger, after checking that no path of `paths` holds another sweep's collection."""
    ledger = out_dir / LEDGER
    owners: dict[str, str] = json.loads(ledger.read_text()) if ledger.exists() else {}
    for path in paths:
        other = owners.get(path)
        if other is not None and other != sweep:
            raise CollectionCollision(
                f"{out_dir / path} holds the collection of sweep {other!r}; sweep {sweep!r} collects to the same "
                f"path: give its [[collect]] another path, or collect to another --out DIR")
    return owners


def claim(out_dir: Path, sweep: str, paths: list[str]) -> None:
    """Record `sweep` as the source of `paths` under out_dir (refused when another sweep's collection is there);
    a folders collection of this sweep written before is removed, so the new one holds nothing stale."""
    owners = check_claims(out_dir, sweep, paths)
    for path in paths:
        if owners.get(path) == sweep and (out_dir / path).is_dir():
            shutil.rmtree(out_dir / path)
    owners.update(dict.fromkeys(paths, sweep))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (LEDGER + ".tmp")
    tmp.write_text(json.dumps(owners, indent=1, sort_keys=True))
    tmp.replace(out_dir / LEDGER)


def collect(store: Store, state_dir: Path, sweep: Sweep, out_dir: Path) -> list[Path]:
    """Write every collection rule of the sweep under out_dir (and the failed-tasks CSV); returns what was written."""
    ensure_not_removed(store, sweep.name)
    collector = Collector(store, state_dir, sweep)
    written = []
    todo = parts(sweep.name, sweep.collect, store.task_counts(sweep.name).get("failed", 0) > 0)
    claim(out_dir, sweep.name, [part.path for part in todo])
    for part in todo:
        target = out_dir / part.path
        if part.format == "folders":
            write_entries(target, collector.folder_entries(part.result))
        else:
            write_chunks(target, collector.chunks(part.format, part.result))
        written.append(target)
    return written


def write_chunks(target: Path, chunks: Iterable[bytes]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for block in chunks:
            out.write(block)


def write_entries(target: Path, entries: Iterable[Entry]) -> None:
    """A folders collection as files under target (made even when there is no entry)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        write_chunks(target / _relative(entry.path), entry.chunks)


def _relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or any(p in ("", ".", "..") for p in path.split("/")) or "\\" in path:
        raise CollectError(f"unsafe path {path!r} in a folders collection")
    return rel


# -- folders as a tar stream -----------------------------------------------------------------------------------
def tar_stream(entries: Iterable[Entry]) -> Iterator[bytes]:
    """A POSIX (pax) tar archive of the entries, made as it is sent: each file's bytes pass through in blocks."""
    mtime = int(time.time())
    total = 0
    for entry in entries:
        info = tarfile.TarInfo(entry.path)
        info.size, info.mode, info.mtime = entry.size, 0o644, mtime
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        yield header
        sent = 0
        for block in entry.chunks:
            sent += len(block)
            if sent > entry.size:
                raise CollectError(f"{entry.path}: more than the {entry.size} bytes recorded")
            yield block
        if sent != entry.size:
            raise CollectError(f"{entry.path}: {sent} bytes, but {entry.size} recorded")
        padding = -entry.size % tarfile.BLOCKSIZE
        yield b"\0" * padding
        total += len(header) + entry.size + padding
    end = 2 * tarfile.BLOCKSIZE  # two zero blocks, padded to a whole record as tar(1) writes it
    yield b"\0" * (end + -(total + end) % tarfile.RECORDSIZE)


def tar_entries(stream: IO[bytes]) -> Iterator[Entry]:
    """The entries of a folders archive read from a stream (each entry's bytes must be read before the next)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                fh = archive.extractfile(member) if member.isfile() else None
                if fh is None:
                    raise CollectError(f"{member.name!r} in a folders archive is not a file")
                yield Entry(member.name, member.size, iter(lambda fh=fh: fh.read(READ_SIZE), b""))
    except tarfile.TarError as exc:
        raise CollectError(f"not a folders archive: {exc}") from None


def remove_results(store: Store, state_dir: Path, sweep: str) -> None:
    """Forget a sweep's stored results after their collection; the master's commit makes it durable."""
    for path in store.remove_results(sweep):
        (state_dir / path).unlink(missing_ok=True)
    shutil.rmtree(state_dir / "results" / sweep, ignore_errors=True)
    store.event("results_removed", sweep=sweep)
