"""Admission of the requests that read DuckDB: a few at a time per process, first come first served.

FastAPI runs sync views in a thread pool of 40 threads, so under load every
waiting request of a worker runs at once. They then contend for the GIL,
which is handed over in no fair order: some requests wait far longer than
others, and the switching itself costs CPU. Measured with the OLMo-7B-shaped
file, 16 clients asking random examples fragments, 2 workers on 2 cores
(`python benchmarks/bench_server.py --db FILE --workers 2 --only random`):

    slots per worker   p50 ms   p99 ms   req/s
    unlimited            50      122      296
    1                    45       62      348
    2                    47       90      314

and with 1 worker: unlimited 95 / 190 ms at 162 req/s, 2 slots 79 / 104 ms
at 199 req/s. One slot per core over all workers is the default: a worker's
Python runs on one core at a time, and a second slot lets one request's
DuckDB scan (which releases the GIL) overlap another's rendering.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import anyio
from starlette.concurrency import run_in_threadpool

from gluscope.errors import UserError

SLOTS_ENV = "GLUSCOPE_QUERY_SLOTS"


def cpu_count() -> int:
    """Cores this process may run on (a container's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_slots(workers: int = 1) -> int:
    return max(1, math.ceil(cpu_count() / max(workers, 1)))


def slots_from_env() -> int:
    """$GLUSCOPE_QUERY_SLOTS (set by `gluscope serve` for its workers), else default_slots()."""
    value = os.environ.get(SLOTS_ENV, "").strip()
    if not value:
        return default_slots()
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"${SLOTS_ENV} must be a whole number of at least 1, not {value!r}")
    return int(value)


class QueryGate:
    """At most `slots` gated views of this process run at once; the others wait in arrival order."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a query gate needs at least one slot")
        self.slots = slots
        # anyio's semaphore is FIFO and, unlike asyncio's, not bound to the
        # event loop it first waited in (the test client runs several loops).
        self._semaphore = anyio.Semaphore(slots)

    def __call__(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """`view` (a sync function) as an async view that takes a slot, then runs it in the thread pool."""

        @functools.wraps(view)  # FastAPI reads the parameters through __wrapped__
        async def gated(*args: Any, **kwargs: Any) -> Any:
            async with self._semaphore:
                return await run_in_threadpool(view, *args, **kwargs)

        return gated
