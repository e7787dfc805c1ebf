"""Collection: assembling stored results into files (concat, blockwise, table, folders), streamed."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from master.store import Store, StoredOutput
from ticketfarm.spec import CollectRule, Sweep

READ_SIZE = 1024 * 1024
#: Results larger than this appear in tables as their stored path, not their content.
TABLE_CELL_LIMIT = 64 * 1024


def output_chunks(state_dir: Path, output: StoredOutput) -> Iterator[bytes]:
    """The bytes of one stored output, a block at a time (large files are never read whole)."""
    if output.data is not None:
        yield output.data
        return
    assert output.path is not None
    with open(state_dir / output.path, "rb") as fh:
        while block := fh.read(READ_SIZE):
            yield block


def collect(store: Store, state_dir: Path, sweep: Sweep, out_dir: Path) -> list[Path]:
    """Write every collection rule of the sweep under out_dir; returns the files/folders written."""
    written = []
    for rule in sweep.collect:
        target = out_dir / rule.path
        target.parent.mkdir(parents=True, exist_ok=True)
        COLLECTORS[rule.mode](store, state_dir, sweep, rule, target)
        written.append(target)
    failed = store.failed_tasks(sweep.name)
    if failed:
        target = out_dir / f"{sweep.name}-failed.csv"
        write_failed(failed, sweep.param_names, target)
        written.append(target)
    return written


def _concat(store: Store, state_dir: Path, sweep: Sweep, rule: CollectRule, target: Path) -> None:
    with open(target, "wb") as out:
        for idx, _params in store.done_tasks(sweep.name):
            for name, output in _outputs_of(store, sweep.name, idx, rule.result):
                _copy(state_dir, output, out)


def _blockwise(store: Store, state_dir: Path, sweep: Sweep, rule: CollectRule, target: Path) -> None:
    with open(target, "wb") as out:
        for idx, params in store.done_tasks(sweep.name):
            header = " ".join(f"{k}={v}" for k, v in params.items())
            out.write(f"# task={idx} {header}\n".encode())
            for _name, output in _outputs_of(store, sweep.name, idx, rule.result):
                last = _copy(state_dir, output, out)
                if last and not last.endswith(b"\n"):
                    out.write(b"\n")


def _table(store: Store, state_dir: Path, sweep: Sweep, rule: CollectRule, target: Path) -> None:
    names = [rule.result] if rule.result else list(sweep.results)
    with open(target, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out) if rule.format == "csv" else None
        if writer:
            writer.writerow(["task", *sweep.param_names, *names])
        for idx, params in store.done_tasks(sweep.name):
            outputs = store.outputs(sweep.name, idx)
            row = {name: _cell(state_dir, outputs, name) for name in names}
            if writer:
                writer.writerow([idx, *(params.get(p) for p in sweep.param_names), *row.values()])
            else:
                out.write(json.dumps({"task": idx, "params": params, "results": row}) + "\n")


def _folders(store: Store, state_dir: Path, sweep: Sweep, rule: CollectRule, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for idx, params in store.done_tasks(sweep.name):
        folder = target / str(idx)
        folder.mkdir(exist_ok=True)
        (folder / "params.json").write_text(json.dumps(params))
        for name, output in _outputs_of(store, sweep.name, idx, rule.result):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                _copy(state_dir, output, out)


COLLECTORS = {"concat": _concat, "blockwise": _blockwise, "table": _table, "folders": _folders}


def _outputs_of(store: Store, sweep: str, idx: int, result: str | None) -> list[tuple[str, StoredOutput]]:
    """A task's outputs of one result (a glob result has several), or all of them, in name order."""
    outputs = store.outputs(sweep, idx)
    return sorted((n, o) for n, o in outputs.items()
                  if result is None or n == result or n.startswith(result + "/"))


def _copy(state_dir: Path, output: StoredOutput, out: IO[bytes]) -> bytes:
    """Copy an output into `out`; returns its last block (to know whether it ended with a newline)."""
    last = b""
    for block in output_chunks(state_dir, output):
        out.write(block)
        last = block
    return last


def _cell(state_dir: Path, outputs: dict[str, StoredOutput], name: str) -> Any:
    output = outputs.get(name)
    if output is None:
        matches = sorted(n for n in outputs if n.startswith(name + "/"))
        return " ".join(m.partition("/")[2] for m in matches)
    if output.size > TABLE_CELL_LIMIT:
        return str(state_dir / output.path) if output.path else f"<{output.size} bytes>"
    data = output.data if output.data is not None else b"".join(output_chunks(state_dir, output))
    return data.decode(errors="replace").strip()


def write_failed(failed: list[tuple[int, dict[str, Any], str]], param_names: list[str], target: Path) -> None:
    with open(target, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["task", *param_names, "reason"])
        for idx, params, reason in failed:
            writer.writerow([idx, *(params.get(p) for p in param_names), reason])


def remove_collected(store: Store, state_dir: Path, sweep: str) -> None:
    """Forget a sweep's results after collection (`collect --remove`)."""
    store.remove_results(sweep)
    store.commit()
    shutil.rmtree(state_dir / "results" / sweep, ignore_errors=True)
