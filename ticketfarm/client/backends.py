"""Other libraries' parallel front ends running on a `Cluster`: a joblib backend (Dask takes the Cluster itself).

    import joblib
    from ticketfarm import Cluster
    from ticketfarm.client.backends import JoblibBackend

    with Cluster(local=2) as cluster, joblib.parallel_config(backend=JoblibBackend(cluster)):
        squares = joblib.Parallel(n_jobs=-1)(joblib.delayed(pow)(i, 2) for i in range(10))

Dask needs no adapter: `dask.compute(x, scheduler=cluster)`, or `dask.config.set(pool=cluster)` with the
threaded scheduler. joblib is imported here only: install it to use this module.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

from joblib.parallel import ParallelBackendBase

from ticketfarm.client.futures import Cluster


class JoblibBackend(ParallelBackendBase):
    """Each batch joblib makes is one task of the cluster; `n_jobs=-1` (or None) means every slot connected now."""

    supports_retrieve_callback = True

    def __init__(self, cluster: Cluster, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster = cluster

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs is None or n_jobs < 0:
            return max(1, self.cluster.slots())
        return max(1, n_jobs)

    def submit(self, func: Callable[[], Any], callback: Callable[[Future], None] | None = None) -> Future:
        future = self.cluster.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future) -> Any:
        return out.result()
