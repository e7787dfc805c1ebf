"""Large result files stream through in chunks: bounded memory on master and slave, bytes intact."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psutil

from master.store import Store
from tests.conftest import write_spec

SIZE_MB = 200


def peak_rss(pids: dict[str, int], stop: threading.Event, peaks: dict[str, int]) -> None:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not stop.wait(0.02):
        for name, proc in procs.items():
            try:
                peaks[name] = max(peaks.get(name, 0), proc.memory_info().rss)
            except psutil.NoSuchProcess:
                pass


def test_200mb_result_streams_with_bounded_memory(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, f"""
        name = "big"
        command = "head -c {SIZE_MB}M /dev/zero | tr '\\\\0' 'x' > big.bin; echo small"
        timeout = 120
        [parameters.grid]
        n = [1]
        [results]
        big = "file:big.bin"
        note = "stdout"
    """)
    slave = start_slave("bulk", 1)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=({"master": master.proc.pid, "slave": slave.proc.pid},
                                                      stop, peaks))
    sampler.start()
    try:
        master.submit(tmp_path / "spec.toml")
        master.wait_finished("big", timeout=120)
    finally:
        stop.set()
        sampler.join()
    store = Store(master.state / "state.db", readonly=True)
    big = store.outputs("big", 0)["big"]
    assert big.size == SIZE_MB * 1024 * 1024 and big.data is None
    digest = hashlib.sha256()
    with open(master.state / big.path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == hashlib.sha256(b"x" * (SIZE_MB * 1024 * 1024)).hexdigest()
    print(f"\npeak RSS during {SIZE_MB} MB result: master {peaks['master'] / 2**20:.1f} MiB, "
          f"slave {peaks['slave'] / 2**20:.1f} MiB")
    assert peaks["master"] < 120 * 2**20
    assert peaks["slave"] < 120 * 2**20
