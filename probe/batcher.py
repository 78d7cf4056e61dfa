"""One queue per device in front of the model: bounded, with a deadline per request, batching what waits.

The HTTP handlers submit a Plan and await its body; one worker thread runs
the passes. When it takes the next request it also takes every waiting one
of the same model whose rows fit one pass (padded tokens within the batch
budget, and at most half of them padding), runs them all in one forward
pass and hands each its own rows' results. A full queue is refused at once
with a Retry-After estimate; a request past its deadline is answered with a
timeout and dropped if it has not started.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gluscope.probe.answers import Plan
from gluscope.probe.forward import Passes
from gluscope.probe_protocol import BATCH_TOKENS, QUEUE_SIZE, TIMEOUT_S
from gluscope.server.errors import ParameterError

log = logging.getLogger("gluscope.probe")


class QueueFull(ParameterError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(503, None, f"the probe is busy (its queue is full); try again in {retry_after} s")
        self.retry_after = retry_after

    def __reduce__(self):
        return type(self), (self.retry_after,)


@dataclass
class Job:
    passes: Passes
    plan: Plan
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False

    @property
    def tokens(self) -> int:
        return sum(len(r.ids) for r in self.plan.rows)


@dataclass
class Stats:
    passes: int = 0
    requests: int = 0
    batched: int = 0            # requests that shared a pass with an earlier one
    pass_s: float = 0.0         # a running mean of a pass's seconds, for Retry-After
    sizes: collections.Counter = field(default_factory=collections.Counter)


class Batcher:
    def __init__(self, queue_size: int = QUEUE_SIZE, timeout_s: float = TIMEOUT_S,
                 batch_tokens: int = BATCH_TOKENS) -> None:
        self.queue_size, self.timeout_s, self.batch_tokens = queue_size, timeout_s, batch_tokens
        self.waiting: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.stats = Stats()
        self.thread = threading.Thread(target=self._work, name="gluscope-probe-passes", daemon=True)
        self.thread.start()

    async def answer(self, passes: Passes, plan: Plan) -> dict[str, Any]:
        """The body of `plan`'s results, once its turn has come; QueueFull or a 504 ParameterError otherwise."""
        loop = asyncio.get_running_loop()
        job = Job(passes, plan, loop, loop.create_future())
        with self.cv:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(max(1, math.ceil(self.stats.pass_s * (len(self.waiting) + 1))))
            self.waiting.append(job)
            self.cv.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ParameterError(504, None, f"the probe did not answer within {self.timeout_s:g} s (its "
                                 "per-request limit); try a shorter text or fewer neurons") from None

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=5)

    # --- the worker --------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        with self.cv:
            while not self.waiting and not self.closed:
                self.cv.wait()
            if self.closed:
                return None
            first = self.waiting.popleft()
            jobs = [first]
            width = max(len(r.ids) for r in first.plan.rows)
            rows, real = len(first.plan.rows), first.tokens
            for job in list(self.waiting):
                if job.cancelled or job.passes is not first.passes:
                    continue
                w = max(width, *(len(r.ids) for r in job.plan.rows))
                n = rows + len(job.plan.rows)
                if n * w > self.batch_tokens or n * w > 2 * (real + job.tokens):
                    continue
                self.waiting.remove(job)
                jobs.append(job)
                width, rows, real = w, n, real + job.tokens
            return [j for j in jobs if not j.cancelled]

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if not jobs:
                continue
            rows = [r for job in jobs for r in job.plan.rows]
            began = time.perf_counter()
            try:
                results = jobs[0].passes.run(rows)
            except Exception as e:  # noqa: BLE001 - a failed pass must answer its requests, not kill the worker
                log.exception("a forward pass failed")
                for job in jobs:
                    self._settle(job, exc=ParameterError(503, None, f"the model failed on this request "
                                                         f"({type(e).__name__}: {str(e)[:160]})"))
                continue
            took = time.perf_counter() - began
            s = self.stats
            s.passes += 1
            s.requests += len(jobs)
            s.batched += len(jobs) - 1
            s.sizes[len(jobs)] += 1
            s.pass_s = took if s.passes == 1 else 0.8 * s.pass_s + 0.2 * took
            start = 0
            for job in jobs:
                mine = results[start:start + len(job.plan.rows)]
                start += len(job.plan.rows)
                try:
                    self._settle(job, body=job.plan.finish(mine))
                except ParameterError as e:
                    self._settle(job, exc=e)
                except Exception as e:  # noqa: BLE001
                    log.exception("making an answer failed")
                    self._settle(job, exc=ParameterError(503, None, f"the probe failed to answer "
                                                         f"({type(e).__name__}: {str(e)[:160]})"))

    @staticmethod
    def _settle(job: Job, body: dict[str, Any] | None = None, exc: Exception | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(body)
        if job.cancelled:
            return  # its request already answered with a timeout
        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the requester's event loop has closed: nobody waits for this answer
            pass
