"""Reader processes: the views that query DuckDB run here, one request at a time per process.

The server is one HTTP process (uvicorn, and every view that reads only what
was loaded at startup) and N readers, each of which opens the same files
read-only once. A view marked `reads_file` (views.py) is sent by name, with
its arguments, to the readers' queue, and the HTTP process awaits the body
(bytes). Why not N uvicorn workers:

- A worker keeps each keep-alive connection it accepted, and a burst of
  connections lands unevenly between workers. The crowded worker's requests
  then wait longer than the others', and the tail latency varies widely
  between identical runs (the measurements: see docs/performance.md).
- Within a worker, requests running at once in threads contend for the GIL,
  which is handed over in no fair order.

Here every request waits in one first-come-first-served queue for the next
free reader, whichever connection it came on, and a reader runs one request
at a time with nothing to contend with.
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

import duckdb

from gluscope.server.db import Database, open_databases
from gluscope.server.errors import ParameterError
from gluscope.server.render import token_spans

# This process's databases, when it is a reader (set by _open).
_registry: dict[str, Database] | None = None


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 quota (`docker run --cpus`)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 file, or one we do not understand: the affinity alone
    return max(cpus, 1)


def _exit_with_parent(parent: int) -> None:
    """A reader outlives a killed HTTP process (SIGKILL runs no shutdown): leave when it is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _open(paths: list[str]) -> None:
    global _registry
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()
    # No neuron table (large for a 7B model, see docs/performance.md): only the HTTP process uses it.
    _registry = open_databases(paths, neuron_table=False)
    for db in _registry.values():
        token_spans(db.vocab)  # built once here, not on a user's first fragment
        db.temp_table("neuron_facts")  # and the filter's table (queries.neuron_facts), not on its first request
        try:
            db.load_intervals()  # and every neuron's interval bounds (Database.neuron_intervals)
            db.load_extremes()  # and every list's first value (Database.top_example_value)
        except duckdb.Error:
            pass  # a damaged table: the views that need it answer 503 (views.run_view), as for any other table
    freeze_startup_objects()


def freeze_startup_objects() -> None:
    """Keep what was loaded at startup out of the garbage collector's full passes.

    Many objects (FastAPI, pydantic, the vocabulary) live as long as the
    process; a full collection walked them all, now and then in the middle of
    a request, and the neuron JSON's tail latency varied with it from run to
    run. Frozen, they are skipped (the measurements: see docs/performance.md).
    """
    gc.collect()
    gc.freeze()


def _ready() -> int:
    return os.getpid()


def _call(fn: Callable[..., bytes], args: tuple) -> bytes:
    assert _registry is not None, "not a reader process"
    return fn(_registry, *args)


class Readers:
    """`processes` reader processes over these files; `await run(fn, *args)` is fn(registry, *args) in one of them.

    fn must be a module-level function (it is sent by name) that returns
    something picklable; what it raises is raised here.
    """

    def __init__(self, paths: list[str | os.PathLike], processes: int) -> None:
        if processes < 1:
            raise ValueError("at least one reader process")
        self.processes = processes
        self._paths = [str(Path(p).resolve()) for p in paths]
        self._pool = self._start()
        self._restart = threading.Lock()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: DuckDB connections and threads do not survive a fork.
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_open, initargs=(self._paths,))
        # Start every reader now, so none opens the files on a user's first request.
        for ready in [pool.submit(_ready) for _ in range(self.processes)]:
            ready.result()
        return pool

    def pids(self) -> list[int]:
        return sorted(self._pool._processes)  # no public accessor; for tests and diagnostics

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _call, fn, args)
        except BrokenProcessPool:
            # A reader died (killed, out of memory): every later request would
            # fail the same way. Start new readers; this request is not retried,
            # in case it was the one that killed its reader.
            await asyncio.to_thread(self._replace, pool)
            raise ParameterError(503, None, "a reader process stopped while answering; it was restarted: "
                                            "try again", None) from None

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._restart:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
