"""Loads: when each request reaches the engine. One request loop for the open loads (`drive`):
requests sent by schedule through `Engine.submit` from an asyncio loop, each answer awaited on
its own, the client's own lateness recorded (so that a run limited by the client, not the
server, says so). `offline` hands every request to `Engine.run` at once instead.

A load's measurement is one `Measured` per step (`rate_sweep` has several): the completions of
the measured requests, the window they span, and what the load itself observed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from sweeper.data.base import LoadedSample
from sweeper.engines.base import Engine, OnDone
from sweeper.loads.schedule import arrival_times
from sweeper.requests import Completion, DecodingParams, Request, ServingParams
from sweeper.workloads.workload import Workload

# What an open load adds to a measurement's metrics.
LOAD_METRICS = (
    "requests_sent",
    "warmup_requests",
    "cooldown_requests",
    "requests_in_flight",
    "client_queue_s",
    "client_cpu_share",
    "achieved_rate",
    "target_rate",
    "send_lag_p99_s",
)

# A run whose requests left this much later than scheduled (p99), and more than a tenth of the
# mean gap between arrivals, was paced by the client, not the server.
LAG_FLOOR_S = 0.005

# Requests an open load holds prepared ahead of their send times (engine=openai: a 640x640
# image's body is ~0.7 MB), and the threads that prepare them.
LOOKAHEAD = 32
PREPARE_THREADS = min(4, os.cpu_count() or 1)


@dataclass
class Measured:
    """One measurement: the measured requests' completions, the window they span (s), and the
    load's own metrics and tags (target and achieved rate, client lateness)."""

    completions: list[Completion]
    window_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    label: str = ""  # the step of a rate sweep


@dataclass
class Sent:
    """One request of an open load, times in seconds from the load's start."""

    due: float | None  # when its schedule sent it (rate loads)
    ready: float  # when the client got to it
    sent: float  # when it was handed to the engine (after waiting for a concurrency slot)
    done: float = math.nan
    completion: Completion | None = None


class Load:
    """`offline`: every request handed to `Engine.run` at once; the engine batches by the
    serving flags."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def measure(
        self,
        engine: Engine,
        workload: Workload,
        items: Callable[[], Iterable[LoadedSample]],
        count: int,
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone,
    ) -> list[Measured]:
        """The load's measurements; `items()` gives the trial's `count` samples once more
        (decoded ahead) for each step."""
        with engine.own_metrics() as own:
            start = engine.now()
            completions = workload.run(engine, items(), decoding, serving, on_done)
            window = engine.now() - start
        return [Measured(completions, window, own)]


class OfflineLoad(Load):
    pass


class Lookahead:
    """The requests of an open load, in order, each made ready to send ahead of its send time:
    the next one pulled in a thread (pulling decodes its images), then `Engine.prepare`d in a
    pool of threads (engine=openai encodes its body there), at most `depth` waiting. `async with`
    starts it; `ready()` waits until the first `depth` are prepared, before the clock starts, as
    `vllm bench serve` makes its requests before it sends the first."""

    def __init__(
        self,
        engine: Engine,
        requests: Iterator[Request],
        decoding: DecodingParams,
        depth: int = LOOKAHEAD,
    ):
        self._prepare = functools.partial(engine.prepare, decoding=decoding)
        self._requests = requests
        self._depth = depth
        self._waiting: collections.deque[asyncio.Future[Request]] = collections.deque()
        self._changed = asyncio.Condition()
        self._pulled_all = False
        self._error: Exception | None = None
        self._pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="sweeper-prepare")
        self._pulling: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lookahead:
        self._pulling = asyncio.create_task(self._pull())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._pulling is not None
        self._pulling.cancel()
        await asyncio.gather(self._pulling, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _pull(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self._waiting) < self._depth)
                request = await loop.run_in_executor(None, next, self._requests, None)
                if request is None:
                    break
                async with self._changed:
                    self._waiting.append(loop.run_in_executor(self._pool, self._prepare, request))
                    self._changed.notify_all()
        except Exception as error:  # a sample that failed to load: raised to the sender
            self._error = error
        async with self._changed:
            self._pulled_all = True
            self._changed.notify_all()

    async def ready(self) -> None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._pulled_all or len(self._waiting) >= self._depth
            )
            waiting = list(self._waiting)
        await asyncio.gather(*waiting)

    async def next(self) -> Request | None:
        """The next request, prepared; None after the last."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._waiting) or self._pulled_all)
            if not self._waiting:
                if self._error is not None:
                    raise self._error
                return None
            prepared = self._waiting.popleft()
            self._changed.notify_all()
        return await prepared


async def drive(
    engine: Engine,
    requests: Iterator[Request],
    decoding: DecodingParams,
    serving: ServingParams,
    schedule: list[float] | None,
    limit: int | None,
    on_done: OnDone,
) -> list[Sent]:
    """Send each request when its schedule says (None: at once) and a slot of `limit` requests
    in flight is free (None: no cap); every request's answer is awaited on its own. The clock
    starts once the first requests are prepared (`Lookahead`)."""
    slots = asyncio.Semaphore(limit) if limit else None
    sent: list[Sent] = []
    tasks = []

    async def answer(record: Sent, request: Request) -> None:
        try:
            future = engine.submit(request, decoding, serving)
            record.completion = await asyncio.wrap_future(future)
            record.done = time.perf_counter() - start
            on_done(1)
        finally:
            if slots is not None:
                slots.release()

    async with Lookahead(engine, requests, decoding) as ahead:
        await ahead.ready()
        start = time.perf_counter()
        for index in itertools.count():
            request = await ahead.next()
            if request is None:
                break
            due = schedule[index] if schedule is not None else None
            if due is not None:
                await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            ready = time.perf_counter() - start
            if slots is not None:
                await slots.acquire()
            record = Sent(due, ready, time.perf_counter() - start)
            sent.append(record)
            tasks.append(asyncio.create_task(answer(record, request)))
        await asyncio.gather(*tasks)
    return sent


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive before the run left out of the garbage collector's full collections
    during it, as `vllm bench serve` freezes its heap before it sends (vllm.utils.gc_utils):
    a trial's process holds millions of objects (the tokenizer, vLLM, MLflow), and one full
    collection of them took 120-365 ms on the 2-core box, every thread of the client stopped
    meanwhile. (It was not what made the client late at times at middle rates there:
    experiments/serving_load/README.md.)"""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class OpenLoad(Load):
    """What `concurrency` and `rate` share: requests sent one by one through `Engine.submit`,
    the warm-up and cool-down requests left out of every metric."""

    def measure(self, engine, workload, items, count, decoding, serving, on_done):
        plan = self.plan(count)
        return [self.send(engine, workload, items(), decoding, serving, on_done, plan)]

    def plan(self, count: int) -> tuple[list[float] | None, int | None, float | None]:
        """The send times (None: at once), the cap on requests in flight, the target rate."""
        raise NotImplementedError

    def send(
        self,
        engine: Engine,
        workload: Workload,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone,
        plan: tuple[list[float] | None, int | None, float | None],
    ) -> Measured:
        schedule, limit, target = plan
        requests = (workload.request(item) for item in items)
        client = psutil.Process()
        cpu = client.cpu_times()
        with engine.own_metrics() as own, frozen_heap():
            run = drive(engine, requests, decoding, serving, schedule, limit, on_done)
            sent = asyncio.run(run)
        used = client.cpu_times()
        cpu_s = used.user + used.system - cpu.user - cpu.system
        return self._measured(sent, own, cpu_s, target)

    def _measured(
        self, sent: list[Sent], own: dict[str, float], cpu_s: float, target: float | None
    ) -> Measured:
        count = len(sent)
        first = math.floor(self.cfg.warmup * count)
        last = count - math.floor(self.cfg.cooldown * count)
        measured = sent[first:last] if last > first else sent
        begin = min(record.sent for record in measured)
        window = max(record.done for record in measured) - begin
        sends = [record.sent for record in measured]
        metrics = {
            **own,
            "requests_sent": float(count),
            "warmup_requests": float(first),
            "cooldown_requests": float(count - last),
            # Little's law: the requests in flight on average over the window.
            "requests_in_flight": sum(r.done - r.sent for r in measured) / window,
            "client_queue_s": float(np.mean([r.sent - r.ready for r in measured])),
            "client_cpu_share": cpu_s / (max(r.done for r in sent) * (os.cpu_count() or 1)),
        }
        if len(sends) > 1:
            metrics["achieved_rate"] = (len(sends) - 1) / (max(sends) - min(sends) or math.inf)
        tags = {"load_window": f"{len(measured)} requests over {window:.3f} s"}
        if target is not None:
            metrics["target_rate"] = target
            lags = [r.ready - r.due for r in measured if r.due is not None]
            metrics["send_lag_p99_s"] = float(np.percentile(lags, 99))
            if metrics["send_lag_p99_s"] > max(LAG_FLOOR_S, 0.1 / target):
                tags["client_bottleneck"] = (
                    f"requests left up to {metrics['send_lag_p99_s']:.3f} s (p99) later than "
                    f"scheduled; the client used {metrics['client_cpu_share']:.0%} of the CPUs: "
                    "the client, not the server, paced this run"
                )
        completions = [r.completion for r in measured if r.completion is not None]
        return Measured(completions, window, metrics, tags)


class ConcurrencyLoad(OpenLoad):
    def plan(self, count: int) -> tuple[list[float] | None, int | None, float | None]:
        return None, self.cfg.concurrency, None


class RateLoad(OpenLoad):
    def plan(self, count: int) -> tuple[list[float] | None, int | None, float | None]:
        return rate_plan(self.cfg, self.cfg.rate, count)


def rate_plan(cfg: Any, rate: float, count: int) -> tuple[list[float], int | None, float]:
    ramp_up_s = getattr(cfg, "ramp_up_s", 0.0)
    schedule = arrival_times(count, rate, cfg.burstiness, ramp_up_s, cfg.seed)
    return schedule, cfg.max_concurrency, rate


class RateSweepLoad(OpenLoad):
    """One request at a time, then everything at once, then `steps` - 2 rates evenly between
    the request rates those two achieved (GuideLLM's sweep profile)."""

    def measure(self, engine, workload, items, count, decoding, serving, on_done):
        def step(plan: tuple[list[float] | None, int | None, float | None]) -> Measured:
            return self.send(engine, workload, items(), decoding, serving, on_done, plan)

        one, flood = step((None, 1, None)), step((None, None, None))
        one.label, flood.label = "concurrency 1", "all at once"
        low, high = (len(m.completions) / m.window_s for m in (one, flood))
        steps = [one]
        for rate in np.linspace(low, high, self.cfg.steps)[1:-1]:
            measured = step(rate_plan(self.cfg, rate, count))
            measured.label = f"rate {rate:.3g}/s"
            steps.append(measured)
        return [*steps, flood]
