"""From a sweep to an answer: its trials ranked by a stated rule, the Pareto front marked, the
setting to serve with chosen, and the command that reproduces it.

Rules (`select=`):
- `throughput_within_accuracy` (default): the highest throughput among the trials whose
  accuracy is within the 95% interval of the best accuracy (`accuracy_ci95`: over the questions,
  or over repeats) and whose peak memory is within `budget_gb` when one is set;
- `accuracy`: the most accurate (ties: the faster);
- `throughput`: the fastest, accuracy ignored;
- `memory`: the least peak memory (ties: the faster).
Throughput is `goodput_rps` where the trials measured it (serving loads with objectives), else
`tps`. A trial whose throughput lies within the chosen one's 95% interval is marked as not
distinguishable from it (`≈`): with repeats, such a difference is noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sweeper.config import Selection
from sweeper.metrics.stats import CI_SUFFIX

Rule = Selection  # the config's enum: `select=`


RULES = {
    Rule.throughput_within_accuracy: (
        "the highest {throughput} whose accuracy is within the 95% interval of the best"
    ),
    Rule.accuracy: "the highest accuracy (ties: the higher {throughput})",
    Rule.throughput: "the highest {throughput}, accuracy ignored",
    Rule.memory: "the least peak memory (ties: the higher {throughput})",
}


@dataclass
class Trial:
    """A finished trial as the answer sees it."""

    name: str  # its number in the sweep or study
    overrides: list[str]  # the trial's own overrides: what reproduces it
    metrics: dict[str, float]
    run_id: str = ""
    # False: outside an Optuna study's constraints: never on the front, never recommended.
    feasible: bool = True
    label: str = ""  # the overrides that vary across the sweep
    knobs: dict[str, str] = field(default_factory=dict)  # the same, as key -> value
    on_front: bool = False
    eligible: bool = True
    close_to_chosen: bool = False

    def value(self, metric: str) -> float:
        value = self.metrics.get(metric, math.nan)
        return value if value is not None else math.nan

    @property
    def command(self) -> str:
        return " ".join(["python -m sweeper", *self.overrides])


@dataclass
class Answer:
    ranked: list[Trial]
    chosen: Trial | None
    rule: str  # the rule, in words
    throughput: str  # the metric the rule reads as throughput
    notes: list[str] = field(default_factory=list)


def throughput_metric(trials: Sequence[Trial]) -> str:
    measured = [t for t in trials if math.isfinite(t.value("goodput_rps"))]
    return "goodput_rps" if measured and len(measured) == len(trials) else "tps"


def objectives(throughput: str) -> list[tuple[str, bool]]:
    """The front's objectives, (metric, higher is better) each."""
    return [("accuracy", True), (throughput, True), ("peak_mem_gb", False)]


def dominates(a: Sequence[float], b: Sequence[float], higher: Sequence[bool]) -> bool:
    """a is at least as good as b in every objective both know, and better in one."""
    pairs = [(x, y) if up else (-x, -y) for x, y, up in zip(a, b, higher, strict=True)]
    known = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    return all(x >= y for x, y in known) and any(x > y for x, y in known)


def front(trials: Sequence[Trial], goals: Sequence[tuple[str, bool]]) -> list[Trial]:
    """The feasible trials no other feasible trial dominates on `goals`."""
    feasible = [t for t in trials if t.feasible]
    higher = [up for _, up in goals]

    def values(trial: Trial) -> list[float]:
        return [trial.value(metric) for metric, _ in goals]

    return [
        t
        for t in feasible
        if not any(dominates(values(o), values(t), higher) for o in feasible if o is not t)
    ]


def mark_front(trials: Sequence[Trial], throughput: str) -> None:
    """★: no other trial is at least as good in accuracy, throughput and memory, and better in
    one of them (trials outside a study's constraints are never on it)."""
    on = {id(t) for t in front(trials, objectives(throughput))}
    for trial in trials:
        trial.on_front = id(trial) in on


def _normal(override: str) -> tuple[str, str]:
    """One spelling per value: a grid's job overrides escape ':' and write True for true."""
    key, _, value = override.replace("\\", "").partition("=")
    return key, value.lower() if value in ("True", "False") else value


def label_varying(trials: Sequence[Trial]) -> None:
    """Label each trial with its overrides whose values differ across the trials (the fixed
    ones, such as tracking.uri, would drown what was swept)."""
    parsed = [dict(_normal(o) for o in t.overrides if "=" in o) for t in trials]
    varying = {k for one in parsed for k in one if len({p.get(k) for p in parsed}) > 1}
    for trial, one in zip(trials, parsed, strict=True):
        trial.knobs = {k: v for k, v in one.items() if k in varying}
        trial.label = " ".join(f"{k}={v}" for k, v in trial.knobs.items()) or "defaults"


def recommend(
    trials: Sequence[Trial],
    rule: str = Rule.throughput_within_accuracy,
    budget_gb: float | None = None,
) -> Answer:
    """The trials ranked by `rule` (the eligible ones first), and the chosen one."""
    trials = [t for t in trials if math.isfinite(t.value("tps"))]
    throughput = throughput_metric(trials)
    words = RULES[Rule(rule)].format(throughput=throughput)
    if budget_gb is not None:
        words += f", within {budget_gb:g} GiB of peak memory"
    notes: list[str] = []
    if not trials:
        return Answer([], None, words, throughput, ["no finished trial to choose from"])
    mark_front(trials, throughput)
    label_varying(trials)
    for trial in trials:
        trial.eligible = trial.feasible and (
            budget_gb is None or trial.value("peak_mem_gb") <= budget_gb
        )
    if Rule(rule) is Rule.throughput_within_accuracy:
        # The best accuracy among the trials allowed at all: one over the budget or outside a
        # study's constraints cannot set the bar for the others.
        accurate = [t for t in trials if math.isfinite(t.value("accuracy"))]
        allowed = [t for t in accurate if t.eligible]
        if allowed:
            best = max(allowed, key=lambda t: t.value("accuracy"))
            width = best.value("accuracy" + CI_SUFFIX)
            floor = best.value("accuracy") - (width if math.isfinite(width) else 0.0)
            for trial in trials:
                trial.eligible &= trial.value("accuracy") >= floor
        elif not accurate:
            notes.append("no trial logged accuracy: the fastest is chosen")
    key = {
        Rule.throughput_within_accuracy: lambda t: (t.value(throughput),),
        Rule.accuracy: lambda t: (t.value("accuracy"), t.value(throughput)),
        Rule.throughput: lambda t: (t.value(throughput),),
        Rule.memory: lambda t: (-t.value("peak_mem_gb"), t.value(throughput)),
    }[Rule(rule)]

    def order(trial: Trial) -> tuple[float, ...]:
        return (trial.eligible, *(v if math.isfinite(v) else -math.inf for v in key(trial)))

    ranked = sorted(trials, key=order, reverse=True)
    chosen = ranked[0] if ranked[0].eligible else None
    if chosen is None:
        notes.append("no trial meets the rule (memory budget, constraints): none is recommended")
    else:
        width = chosen.value(throughput + CI_SUFFIX)
        for trial in ranked[1:]:
            gap = abs(chosen.value(throughput) - trial.value(throughput))
            trial.close_to_chosen = math.isfinite(width) and gap <= width
    return Answer(ranked, chosen, words, throughput, notes)
