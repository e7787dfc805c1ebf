"""`Cluster` as a `concurrent.futures.Executor`, used the way the standard library uses executors; arguments the
master cannot take fail at once; array arguments are described, not rendered."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from master.store import Store
from tests import fixtures_tasks as tasks
from tests.conftest import HEARTBEAT
from tests.walkthrough import ROOT, walkthroughs
from ticketfarm import Cluster
from ticketfarm.errors import ArgumentTooLarge


@pytest.fixture(scope="module")
def executor():
    with Cluster(local=2, heartbeat=HEARTBEAT, durability="normal", max_attempts=1) as ex:
        ex.wait_for_slaves(2, timeout=20)
        yield ex


def test_it_is_an_executor_whose_map_takes_chunksize_and_a_wait_timeout(executor: Cluster) -> None:
    assert isinstance(executor, concurrent.futures.Executor)
    assert list(executor.map(pow, range(6), range(6), chunksize=4)) == [pow(i, i) for i in range(6)]
    assert list(executor.map(tasks.square, [], timeout=1)) == []
    started = time.monotonic()
    results = executor.map(tasks.sleep_for, [0.0, 20.0], timeout=2.0)
    assert next(results) == 0.0
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert time.monotonic() - started < 10  # the wait was bounded, counted from the call
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(tasks.square, [1], chunksize=0)


def test_the_stdlib_patterns_wait_as_completed_and_run_in_executor(executor: Cluster) -> None:
    futures = [executor.submit(tasks.add, i, 1, offset=10) for i in range(5)]
    done, not_done = concurrent.futures.wait(futures, timeout=60, return_when=concurrent.futures.ALL_COMPLETED)
    assert not not_done and sorted(f.result() for f in done) == [11, 12, 13, 14, 15]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60)) == [11, 12, 13, 14, 15]

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(executor, tasks.square, i) for i in range(4))))

    assert asyncio.run(main()) == [0, 1, 4, 9]


def test_an_argument_over_the_message_limit_fails_at_once_and_the_next_submit_works(executor: Cluster) -> None:
    huge = b"x" * (9 * 1024 * 1024)
    started = time.monotonic()
    future = executor.submit(len, huge)
    with pytest.raises(ArgumentTooLarge, match="over the master's max_message_size of 8388608 bytes"):
        future.result(timeout=5)
    assert time.monotonic() - started < 5
    assert executor.submit(tasks.square, 12).result(timeout=60) == 144
    mixed = list(executor.sweep(len, [b"ab", huge, b"abc"]).futures)
    assert isinstance(mixed[1].exception(timeout=5), ArgumentTooLarge)
    assert [mixed[0].result(timeout=60), mixed[2].result(timeout=60)] == [2, 3]


def test_shutdown_cancels_pending_futures_and_refuses_new_ones(tmp_path: Path) -> None:
    ex = Cluster(local=1, heartbeat=HEARTBEAT, durability="normal")
    try:
        ex.wait_for_slaves(1, timeout=20)
        futures = [ex.submit(tasks.sleep_for, 30.0) for _ in range(3)]
        started = time.monotonic()
        ex.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - started < 20
        assert all(f.cancelled() for f in futures)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(tasks.square, 1)
    finally:
        ex.close()


def test_with_waits_for_every_future_as_executors_do() -> None:
    with Cluster(local=1, heartbeat=HEARTBEAT, durability="normal") as ex:
        futures = [ex.submit(tasks.slow_square, i, 0.3) for i in range(3)]
    assert [f.result(timeout=0) for f in futures] == [0, 1, 4]


def test_array_arguments_are_described_by_shape_and_dtype_not_rendered(tmp_path: Path) -> None:
    arrays = [np.arange(1000, dtype=np.float64) + i for i in range(3)]
    with Cluster(local=1, heartbeat=HEARTBEAT, durability="normal", state_dir=tmp_path / "st") as ex:
        assert list(ex.map(np.sum, arrays, name="arrays")) == [a.sum() for a in arrays]
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        shown = [store.params("arrays", i)["repr"] for i in range(3)]
    finally:
        store.close()
    assert shown == ["(<ndarray shape=(1000,) dtype=float64>,)"] * 3


def test_joblib_runs_its_batches_on_the_cluster_through_a_backend(executor: Cluster) -> None:
    joblib = pytest.importorskip("joblib")
    from ticketfarm.client.backends import JoblibBackend

    with joblib.parallel_config(backend=JoblibBackend(executor)):
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(tasks.square)(i) for i in range(20)) == \
            [i * i for i in range(20)]
        pids = joblib.Parallel(n_jobs=2, batch_size=1)(joblib.delayed(tasks.pid_of_worker)(i) for i in range(6))
        with pytest.raises(ValueError, match="joblib task 3 failed"):  # the task's own exception
            joblib.Parallel(n_jobs=2)(joblib.delayed(tasks.fail_with)(f"joblib task {i} failed") if i == 3
                                      else joblib.delayed(tasks.square)(i) for i in range(5))
    assert os.getpid() not in pids and set(pids) <= set(worker_pids(executor))


def test_dask_takes_the_cluster_as_its_scheduler_or_as_the_threaded_schedulers_pool(executor: Cluster) -> None:
    dask = pytest.importorskip("dask")

    total = dask.delayed(sum)([dask.delayed(tasks.square)(i) for i in range(10)])
    assert total.compute(scheduler=executor) == 285
    with dask.config.set(pool=executor):
        assert dask.compute(total, scheduler="threads") == (285,)
    with pytest.raises(ValueError, match="dask task failed"):  # the task's own exception
        dask.delayed(tasks.fail_with)("dask task failed").compute(scheduler=executor)
    pids = dask.compute(*[dask.delayed(tasks.pid_of_worker)(i) for i in range(4)], scheduler=executor)
    assert os.getpid() not in pids and set(pids) <= set(worker_pids(executor))


def worker_pids(executor: Cluster) -> list[int]:
    """The warm python workers of the local slaves (children of the slave processes)."""
    return [child.pid for pid in executor.local_slaves for child in psutil.Process(pid).children(recursive=True)]


def test_the_dask_and_joblib_example_of_the_python_docs_runs_as_written(tmp_path: Path) -> None:
    example = walkthroughs(ROOT / "docs" / "PYTHON-API.md")["dask-joblib"]
    run = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
