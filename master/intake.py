"""Result intake: RESULT, FAILURE, PROGRESS and CHUNK from slaves, large outputs pulled in chunks, validation."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from master.lifecycle import Completion, Lifecycle
from master.link import Link
from master.metrics import Metrics
from master.peerlog import PeerLog
from master.roster import Roster, SlaveSession
from master.store import Store, StoredOutput
from master.validate import Validator
from ticketfarm import messages, protocol
from ticketfarm.errors import ProtocolError

log = structlog.get_logger("ticketfarm.master")

#: Chunks of one large output requested ahead of the one being written (flow-control window).
FETCH_WINDOW = 4


@dataclass
class IncomingFile:
    """One large output being pulled from a slave in chunks, written straight to disk."""

    name: str
    size: int
    path: Path
    requested: int = 0
    received: int = 0


@dataclass
class Transfer:
    """A finished ticket whose outputs are arriving, or waiting for their validator's verdict."""

    ticket_id: int
    sweep: str
    task: int
    identity: bytes
    exit_code: int | None
    elapsed: float | None
    outputs: list[StoredOutput]
    files: dict[str, IncomingFile]
    warning: str = ""


class Intake:
    """Takes answers from slaves and hands each task's first valid result to the lifecycle; ACKs wait for the commit."""

    def __init__(self, lifecycle: Lifecycle, roster: Roster, link: Link, store: Store, state_dir: Path,
                 validator: Validator[Transfer], progress_bytes: int, peer_log: PeerLog, metrics: Metrics):
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.peer_log = peer_log
        self.roster = roster
        self.link = link
        self.store = store
        self.state_dir = state_dir
        self.results_dir = state_dir / "results"
        self.incoming_dir = state_dir / "incoming"
        shutil.rmtree(self.incoming_dir, ignore_errors=True)
        self.incoming_dir.mkdir()
        self.validator = validator
        self.progress_bytes = progress_bytes
        self.transfers: dict[int, Transfer] = {}
        #: The latest output of running tickets (the last `progress_bytes` of it), for the "progress" op.
        self.progress: dict[int, bytearray] = {}

    @property
    def busy(self) -> bool:
        """Results are still arriving or waiting for a verdict."""
        return bool(self.transfers or self.validator.pending)

    # -- failures and progress ------------------------------------------------------------------------
    def on_failure(self, identity: bytes, msg: messages.Failure) -> None:
        session = self.roster.by_identity[identity]
        tid, reason = msg.ticket, msg.reason
        ticket = self.lifecycle.in_flight(tid)
        if ticket is not None and ticket.slave == session.name and msg.handback:
            self.lifecycle.release(ticket, reason, "returned")
        elif ticket is not None and ticket.slave == session.name:
            state = "timeout" if reason.startswith("timeout") else "failed"
            cause = "refused" if msg.final else "timeout" if state == "timeout" else "worker_failed"
            self.lifecycle.fail(ticket, state, reason, cause, msg.exit_code, msg.elapsed, final=msg.final)
        elif self.store.ticket(tid) is None:
            self.peer_log.warn("foreign_ticket", session.name, ticket=tid, command="FAILURE")
        self.link.ack(identity, tid)

    def on_progress(self, identity: bytes, msg: messages.Progress) -> None:
        tid = msg.ticket
        ticket = self.lifecycle.in_flight(tid)
        if ticket is None or ticket.slave != self.roster.by_identity[identity].name:
            return
        buf = self.progress.setdefault(tid, bytearray())
        buf += msg.data
        if len(buf) > self.progress_bytes:
            del buf[: len(buf) - self.progress_bytes]

    def output_so_far(self, ticket: int) -> str:
        return bytes(self.progress.get(ticket, b"")).decode(errors="replace")

    def ticket_ended(self, ticket: int) -> None:
        self.progress.pop(ticket, None)

    # -- results ---------------------------------------------------------------------------------------
    def on_result(self, identity: bytes, msg: messages.Result) -> None:
        """A batch of finished tickets; an entry with a refused output name is dropped, the others are taken."""
        session = self.roster.by_identity[identity]
        for entry in msg.results:
            try:
                self.take(session, entry)
            except ProtocolError as exc:
                self.peer_log.warn("dropped_message", identity.hex(), reason=str(exc))

    def take(self, session: SlaveSession, entry: messages.ResultEntry) -> None:
        tid = entry.ticket
        if tid in self.transfers:
            return  # already being fetched (the slave re-sent it after a reconnect)
        row = self.lifecycle.in_flight(tid) or self.store.ticket(tid)
        if row is None or row.slave != session.name:
            self.peer_log.warn("foreign_ticket", session.name, ticket=tid, command="RESULT")
            self.link.ack(session.identity, tid)  # the slave may forget it: it can never count
            return
        # A ticket still in flight belongs to an unsettled task; only late answers need the store's word.
        if self.lifecycle.is_late_duplicate(tid, row.sweep, row.task):
            self.duplicate(session.identity, tid, row.sweep, row.task)
            return
        outputs, files = self.parse_outputs(entry, row.sweep, tid)
        transfer = Transfer(tid, row.sweep, row.task, session.identity, entry.exit_code, entry.elapsed, outputs, files,
                            entry.warning)
        if files:
            self.transfers[tid] = transfer
            for f in files.values():
                self.request_chunks(transfer, f)
        else:
            self.accept(transfer)

    def duplicate(self, identity: bytes, tid: int, sweep: str, task: int) -> None:
        log.info("duplicate_result", ticket=tid, sweep=sweep, task=task)
        self.metrics.duplicates_suppressed.inc()
        self.link.ack(identity, tid)

    def parse_outputs(self, entry: messages.ResultEntry, sweep: str,
                      tid: int) -> tuple[list[StoredOutput], dict[str, IncomingFile]]:
        active = self.lifecycle.active(sweep)
        result_names = active.sweep.results if active is not None else {}
        outputs: list[StoredOutput] = []
        files: dict[str, IncomingFile] = {}
        for out in entry.outputs:
            check_output_name(out.name, result_names)
            if out.data is not None:
                outputs.append(StoredOutput(out.name, out.size, out.data, None))
            else:
                files[out.name] = IncomingFile(out.name, out.size, self.incoming_dir / str(tid) / out.name)
        return outputs, files

    # -- large outputs, chunk by chunk --------------------------------------------------------------------
    def request_chunks(self, transfer: Transfer, f: IncomingFile) -> None:
        while f.requested < f.size and f.requested - f.received < FETCH_WINDOW * protocol.CHUNK_SIZE:
            length = min(protocol.CHUNK_SIZE, f.size - f.requested)
            self.link.send(transfer.identity, messages.Fetch(transfer.ticket_id, f.name, f.requested, length))
            f.requested += length
        if f.size == 0:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            f.path.touch()
            self.file_complete(transfer)

    def on_chunk(self, identity: bytes, msg: messages.Chunk) -> None:
        tid = msg.ticket
        transfer = self.transfers.get(tid)
        if transfer is None or transfer.identity != identity:
            return  # a chunk for a transfer that was aborted; harmless
        name, offset, data = msg.name, msg.offset, msg.data
        f = transfer.files.get(name)
        if f is None or offset != f.received:
            self.abort(tid)
            raise ProtocolError(f"CHUNK: unexpected chunk {name!r}@{offset} for ticket {tid}")
        if f.received + len(data) > f.size:
            self.abort(tid)
            raise ProtocolError(f"CHUNK: {name!r} longer than its declared size")
        f.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f.path, "r+b" if offset else "wb") as fh:
            fh.seek(offset)
            fh.write(data)
        f.received += len(data)
        if f.received == f.size:
            self.file_complete(transfer)
        else:
            self.request_chunks(transfer, f)

    def file_complete(self, transfer: Transfer) -> None:
        if all(f.received == f.size for f in transfer.files.values()):
            del self.transfers[transfer.ticket_id]
            self.accept(transfer)

    def abort(self, tid: int) -> None:
        self.transfers.pop(tid, None)
        shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)

    def session_left(self, session: SlaveSession) -> None:
        """Transfers from a slave that is gone can never complete."""
        for tid in [t for t, tr in self.transfers.items() if tr.identity == session.identity]:
            self.abort(tid)

    # -- a complete result -------------------------------------------------------------------------------
    def accept(self, transfer: Transfer, validated: bool = False) -> None:
        """A complete result: validated first when its sweep says so, then stored as the task's one result."""
        sweep, task, tid = transfer.sweep, transfer.task, transfer.ticket_id
        if self.lifecycle.is_late_duplicate(tid, sweep, task, settled=("done", "cancelled")):
            shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)
            self.duplicate(transfer.identity, tid, sweep, task)
            return
        if not validated and self.validate(transfer):
            return  # back in `apply_verdicts` once the validator has spoken
        outputs = list(transfer.outputs)
        for f in transfer.files.values():
            final = self.results_dir / sweep / str(task) / f.name
            final.parent.mkdir(parents=True, exist_ok=True)
            f.path.replace(final)
            outputs.append(StoredOutput(f.name, f.size, None, str(final.relative_to(self.state_dir))))
        if transfer.files:  # only fetched outputs ever had an incoming dir
            shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)
        self.lifecycle.complete(Completion(tid, sweep, task, transfer.exit_code, transfer.elapsed, outputs,
                                           transfer.warning))
        self.link.ack(transfer.identity, tid)

    def validate(self, transfer: Transfer) -> bool:
        """Hand a result to its sweep's validator; False when the sweep has none."""
        tid = transfer.ticket_id
        active = self.lifecycle.active(transfer.sweep)
        if active is None or active.sweep.validate is None:
            return False
        if tid in self.validator.pending:
            return True  # the slave sent it again while its verdict is pending
        folder = self.incoming_dir / str(tid)
        results = lay_out(transfer, folder, list(active.sweep.results))
        params = self.store.params(transfer.sweep, transfer.task)
        ticket = self.lifecycle.in_flight(tid)
        values = {**params, "task": transfer.task, "ticket": tid, "sweep": transfer.sweep,
                  "attempt": ticket.attempt if ticket is not None else 0, "workdir": str(folder),
                  "results": str(folder)}
        self.validator.check(tid, transfer, active.sweep.validate, params, results, values, folder)
        return True

    def apply_verdicts(self) -> None:
        for transfer, (ok, reason) in self.validator.verdicts():
            if ok:
                self.accept(transfer, validated=True)
            else:
                self.reject(transfer, reason)

    def reject(self, transfer: Transfer, reason: str) -> None:
        tid = transfer.ticket_id
        shutil.rmtree(self.incoming_dir / str(tid), ignore_errors=True)
        reason = f"rejected: {reason}"
        self.store.event("result_rejected", sweep=transfer.sweep, task=transfer.task, ticket=tid,
                         detail={"reason": reason})
        log.info("result_rejected", sweep=transfer.sweep, task=transfer.task, ticket=tid, reason=reason)
        self.lifecycle.reject(tid, reason, transfer.exit_code, transfer.elapsed)
        self.link.ack(transfer.identity, tid)


def lay_out(transfer: Transfer, folder: Path, names: list[str]) -> dict[str, Path]:
    """One file per result in `folder` for its validator (large ones are already there, written chunk by chunk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for out in transfer.outputs:
        if out.data is not None:
            path = folder / out.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(out.data)
    return {name: folder / name for name in names}


def check_output_name(name: str, result_names: dict[str, str]) -> None:
    """An output is `result` or `result/relative/path` (for globs); nothing may escape its folder."""
    head = name.partition("/")[0]
    if result_names and head not in result_names:
        raise ProtocolError(f"RESULT: {name!r} is not a result of this sweep")
    if any(p in ("", ".", "..") for p in name.split("/")) or "\\" in name or "\x00" in name:
        raise ProtocolError(f"RESULT: unsafe output name {name!r}")
