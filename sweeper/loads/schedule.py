"""When an open load sends each request: the arrival schedule of a rate, seeded."""

from __future__ import annotations

import math

import numpy as np


def arrival_times(
    count: int, rate: float, burstiness: float = 1.0, ramp_up_s: float = 0.0, seed: int = 0
) -> list[float]:
    """Send times in seconds from the start for `count` requests at `rate` per second:
    inter-arrival times gamma-distributed with shape `burstiness` and mean 1/rate (1: Poisson,
    as vLLM's bench serve draws them), the rate rising linearly from 0 over `ramp_up_s`."""
    rng = np.random.default_rng(seed)
    # Arrivals at unit rate ("operational time"), mapped through the inverse of the cumulative
    # rate: a constant rate is a rescaling, a linear ramp a square root over its first seconds.
    gaps = rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=count)
    operational = np.cumsum(gaps) - gaps[0]  # the first request is sent at once
    if ramp_up_s <= 0:
        return [float(t) / rate for t in operational]
    ramped = rate * ramp_up_s / 2  # requests due by the end of the ramp
    return [
        math.sqrt(2 * ramp_up_s * t / rate) if t < ramped else ramp_up_s + (t - ramped) / rate
        for t in map(float, operational)
    ]
