"""A trial measured several times: each metric's mean and the half-width of its 95% confidence
interval (Student's t over the repeats), so that a difference between settings smaller than the
interval is not read as a finding."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

CI_SUFFIX = "_ci95"


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """The mean of the finite values and the half-width of its 95% interval (nan below two)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return mean, math.nan
    from scipy.stats import t

    spread = statistics.stdev(finite) / math.sqrt(len(finite))
    return mean, float(t.ppf(0.975, len(finite) - 1)) * spread


def combine_repeats(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each metric of the runs as its mean, with `<metric>_ci95` over the runs when there are
    several; a metric that carries an interval of its own (accuracy: over the questions) keeps
    the mean of those."""
    combined: dict[str, float] = {}
    for name in runs[0]:
        mean, half_width = mean_ci95([run[name] for run in runs if name in run])
        combined[name] = mean
        own = name.endswith(CI_SUFFIX) or name + CI_SUFFIX in runs[0]
        if len(runs) > 1 and not own:
            combined[name + CI_SUFFIX] = half_width
    return combined
