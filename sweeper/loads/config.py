"""The `load` config group: how requests arrive at the engine (each config names its class,
sweeper/loads/load.py). `offline` hands the engine every request at once (its own batching, the
serving flags, decides what runs when); `concurrency` and `rate` are the open loads of serving
benchmarks (vLLM's `bench serve`, GuideLLM): a closed loop of N requests in flight, or arrivals
at a rate; `rate_sweep` measures from one request at a time to saturation in steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sweeper.config import check


@dataclass
class LoadConfig:
    """`offline`: every request handed to the engine at once; static batches of `batch_size`
    (continuous_batching=false) or the engine's scheduler at `batch_size` running
    (continuous_batching=true), as the serving flags say."""

    name: str = "offline"
    _target_: str = "sweeper.loads.load.OfflineLoad"

    @property
    def open(self) -> bool:
        """Requests are sent one by one as the load schedules them (`Engine.submit`)."""
        return False

    def check(self, trial: Any) -> None:
        """Refuse trial keys this load cannot run with (ConfigError)."""


@dataclass
class OpenLoadConfig(LoadConfig):
    """What the open loads share: the requests left out of every metric at each end (warm-up,
    cool-down: the engine filling up and draining), as shares of the requests sent."""

    warmup: float = 0.1
    cooldown: float = 0.1

    @property
    def open(self) -> bool:
        return True

    def check(self, trial: Any) -> None:
        check(
            trial.workload.name != "multi_turn",
            "workload",
            trial.workload.name,
            f"single, shared_prefix or multi_sample with load={self.name} (a conversation's "
            "turns wait for each other: they have no arrival schedule of their own)",
        )

    def __post_init__(self) -> None:
        for key in ("warmup", "cooldown"):
            value = getattr(self, key)
            check(0 <= value < 0.5, f"load.{key}", value, "a share of the requests in [0, 0.5)")


@dataclass
class ConcurrencyLoadConfig(OpenLoadConfig):
    """A closed loop: `concurrency` requests in flight; a new one is sent when one ends."""

    name: str = "concurrency"
    _target_: str = "sweeper.loads.load.ConcurrencyLoad"
    concurrency: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.concurrency >= 1, "load.concurrency", self.concurrency, "an integer >= 1")


@dataclass
class RateLoadConfig(OpenLoadConfig):
    """An open loop: requests sent at `rate` per second, whether or not earlier ones are done.
    Inter-arrival times are gamma-distributed with shape `burstiness` (1: Poisson arrivals;
    below 1 burstier, above 1 more regular), the schedule drawn from `seed`; `ramp_up_s` raises
    the rate linearly from 0 over its first seconds; `max_concurrency` caps the requests in
    flight (a request due while the cap is reached waits: client-side queue time)."""

    name: str = "rate"
    _target_: str = "sweeper.loads.load.RateLoad"
    rate: float = 4.0
    burstiness: float = 1.0
    ramp_up_s: float = 0.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.rate < math.inf, "load.rate", self.rate, "requests per second > 0")
        check(
            0 < self.burstiness < math.inf,
            "load.burstiness",
            self.burstiness,
            "a gamma shape > 0 (1: Poisson)",
        )
        check(0 <= self.ramp_up_s < math.inf, "load.ramp_up_s", self.ramp_up_s, "seconds >= 0")
        if self.max_concurrency is not None:
            check(
                self.max_concurrency >= 1,
                "load.max_concurrency",
                self.max_concurrency,
                "null or an integer >= 1",
            )


@dataclass
class RateSweepLoadConfig(OpenLoadConfig):
    """From one request at a time to saturation in `steps` measurements, as GuideLLM's sweep
    profile: one at a time (concurrency 1), then everything at once (offline), then `steps` - 2
    rates evenly between the two rates those achieved. Each step is a child run."""

    name: str = "rate_sweep"
    _target_: str = "sweeper.loads.load.RateSweepLoad"
    steps: int = 5
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.steps >= 3, "load.steps", self.steps, "an integer >= 3")


LOAD_CONFIGS = (LoadConfig, ConcurrencyLoadConfig, RateLoadConfig, RateSweepLoadConfig)
