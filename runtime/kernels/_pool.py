"""Worker threads for work that runs outside Numba's parallel regions (BLAS calls).

numpy's BLAS is held to one thread (see ``pocketlm.kernels``), so prefill splits its matrix
products into tasks and runs them here, one BLAS call stream per core; numpy and our serial
kernels release the GIL. Tasks submitted from a worker run inline (no nested waiting).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

_pool: list = [None, 0]          # (executor, its worker count)
_lock = threading.Lock()
_local = threading.local()


def _mark_worker():
    _local.worker = True


def _executor(n: int) -> ThreadPoolExecutor:
    with _lock:
        if _pool[1] < n:
            old = _pool[0]
            _pool[0], _pool[1] = ThreadPoolExecutor(n, "pocketlm-worker",
                                                    initializer=_mark_worker), n
            if old is not None:
                old.shutdown(wait=False)
        return _pool[0]


def parallel_for(n_tasks: int, task) -> None:
    """Call task(i) for i in range(n_tasks) on up to ``numba.get_num_threads()`` threads (the
    calling one included); thread j takes tasks j, j + n, j + 2n, ... so that tasks of rising
    cost (causal attention tiles) spread evenly. Returns when all are done; the first error
    raised by a task is raised here."""
    n = min(numba.get_num_threads(), n_tasks)
    if n <= 1 or getattr(_local, "worker", False):
        for i in range(n_tasks):
            task(i)
        return

    def stripe(j):
        for i in range(j, n_tasks, n):
            task(i)
    ex = _executor(n - 1)
    futures = [ex.submit(stripe, j) for j in range(1, n)]
    try:
        stripe(0)
    finally:
        for f in futures:
            f.result()
