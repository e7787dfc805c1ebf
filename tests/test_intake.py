"""Result intake and dispatch on a real store and a real inproc socket pair: ACK after commit, chunks, credit."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from master.store import Store
from tests.loopbench import SLAVE, Bench, open_bench
from ticketfarm import messages
from ticketfarm.errors import ProtocolError
from ticketfarm.messages import Ack, Chunk, Fetch, Request, Result, ResultEntry, ResultOutput
from ticketfarm.protocol import CHUNK_SIZE


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with open_bench(tmp_path) as b:
        yield b


def result(ticket: int, *outputs: ResultOutput) -> Result:
    return Result([ResultEntry(ticket, 0, 0.1, list(outputs or [ResultOutput("stdout", 2, b"ok")]))])


def test_a_result_is_acknowledged_only_after_the_commit_that_stores_it(bench: Bench) -> None:
    bench.add("s", 1)
    bench.store.commit()
    ticket = bench.issue(1)[0]
    bench.store.commit()
    bench.intake.on_result(SLAVE, result(ticket.id))
    reader = Store(bench.store.path, readonly=True)
    try:
        assert reader.task("s", 0)["state"] == "running"  # not committed yet
        assert bench.received() == []  # so not acknowledged either
        bench.commit()
        assert reader.task("s", 0)["state"] == "done"
        assert bench.received() == [Ack([ticket.id])]
    finally:
        reader.close()


def test_a_result_for_another_slaves_ticket_is_acknowledged_and_never_stored(bench: Bench) -> None:
    bench.add("s", 1)
    theirs = bench.issue(1, slave="slave-b")[0]
    bench.intake.on_result(SLAVE, result(theirs.id))
    bench.commit()
    assert bench.task(0) == "running"
    assert bench.received() == [Ack([theirs.id])]  # the slave may forget it: it can never count


def test_a_late_duplicate_is_acknowledged_and_the_first_result_stays(bench: Bench) -> None:
    bench.add("s", 1)
    given_up = bench.issue(1)[0]
    bench.lifecycle.lose(given_up, "lost: silent", "slave_silent")
    winner = bench.issue(1)[0]
    bench.intake.on_result(SLAVE, result(winner.id, ResultOutput("stdout", 5, b"first")))
    bench.intake.on_result(SLAVE, result(given_up.id, ResultOutput("stdout", 4, b"late")))
    bench.commit()
    assert bench.store.outputs("s", 0)["stdout"].data == b"first"
    assert bench.received() == [Ack([winner.id, given_up.id])]


def test_an_unsafe_output_name_drops_that_entry_only(bench: Bench) -> None:
    bench.add("s", 2)
    bad, good = bench.issue(2)
    bench.intake.on_result(SLAVE, Result([
        ResultEntry(bad.id, 0, 0.1, [ResultOutput("../escape", 1, b"x")]),
        ResultEntry(good.id, 0, 0.1, [ResultOutput("stdout", 2, b"ok")])]))
    assert bench.task(bad.task) == "running" and bench.task(good.task) == "done"


def test_a_large_output_is_pulled_within_the_window_and_stored_as_a_file(bench: Bench, tmp_path: Path) -> None:
    bench.add("s", 1)
    ticket = bench.issue(1)[0]
    size = 6 * CHUNK_SIZE + 10
    bench.intake.on_result(SLAVE, result(ticket.id, ResultOutput("stdout", size)))
    fetches = bench.received()
    assert fetches == [Fetch(ticket.id, "stdout", i * CHUNK_SIZE, CHUNK_SIZE) for i in range(4)]  # 4 chunks ahead
    data = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    offset = 0
    while offset < size:
        length = min(CHUNK_SIZE, size - offset)
        bench.intake.on_chunk(SLAVE, Chunk(ticket.id, "stdout", offset, data[offset:offset + length]))
        offset += length
    bench.commit()
    assert [m.offset for m in bench.received() if isinstance(m, Fetch)] == [4 * CHUNK_SIZE, 5 * CHUNK_SIZE,
                                                                             6 * CHUNK_SIZE]
    stored = bench.store.outputs("s", 0)["stdout"]
    assert stored.data is None and (tmp_path / stored.path).read_bytes() == data  # type: ignore[operator]
    assert bench.task(0) == "done" and not bench.intake.busy


def test_a_chunk_at_the_wrong_offset_aborts_the_transfer(bench: Bench, tmp_path: Path) -> None:
    bench.add("s", 1)
    ticket = bench.issue(1)[0]
    bench.intake.on_result(SLAVE, result(ticket.id, ResultOutput("stdout", 2 * CHUNK_SIZE)))
    with pytest.raises(ProtocolError, match="unexpected chunk"):
        bench.intake.on_chunk(SLAVE, Chunk(ticket.id, "stdout", CHUNK_SIZE, b"x" * CHUNK_SIZE))
    assert not bench.intake.busy and not (tmp_path / "incoming" / str(ticket.id)).exists()
    assert bench.task(0) == "running"  # the slave sends the RESULT again after a reconnect


def test_credit_is_spent_and_a_slave_with_credit_left_waits_for_work(bench: Bench) -> None:
    bench.add("s", 3)
    bench.received()
    bench.dispatch.on_request(SLAVE, Request(2))
    assert [len(m.tickets) for m in bench.received()] == [2]
    assert SLAVE not in bench.dispatch.hungry
    bench.dispatch.on_request(SLAVE, Request(5))
    assert [len(m.tickets) for m in bench.received()] == [1]
    assert bench.dispatch.hungry[SLAVE].credit == 4
    bench.add("t", 2)  # new work goes straight to the waiting slave
    sent = bench.received()
    assert [(m.sweep.sweep, len(m.tickets)) for m in sent] == [("t", 2)]
    assert bench.dispatch.hungry[SLAVE].credit == 2


def test_a_draining_slave_gets_nothing_and_does_not_wait(bench: Bench) -> None:
    bench.add("s", 3)
    bench.roster.draining.add("slave-a")
    bench.dispatch.on_request(SLAVE, Request(3))
    assert bench.received() == [] and SLAVE not in bench.dispatch.hungry


def test_tickets_of_a_command_sweep_travel_in_batches_sharing_one_header(bench: Bench) -> None:
    bench.add("s", 300)
    bench.dispatch.on_request(SLAVE, Request(300))
    sent = bench.received()
    assert [len(m.tickets) for m in sent] == [256, 44]
    assert all(isinstance(m, messages.Ticket) and m.sweep == sent[0].sweep for m in sent)
    assert [t.task for m in sent for t in m.tickets] == list(range(300))
