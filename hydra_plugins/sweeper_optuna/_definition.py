"""What a study optimises: objectives, constraints, the sampler, and its default name."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.distributions import distribution_to_json

from hydra_plugins.sweeper_optuna._errors import StudyError
from hydra_plugins.sweeper_optuna._space import SearchSpace

_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "maximize" or "minimize"

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


@dataclass(frozen=True)
class Constraint:
    text: str
    metric: str
    op: str  # "<=" or ">="
    bound: float

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible, and the larger, the further from feasible."""
        return value - self.bound if self.op == "<=" else self.bound - value


def parse_objectives(items: Sequence[str]) -> list[Objective]:
    objectives = []
    for item in items:
        metric, _, direction = str(item).partition(":")
        if not metric.strip() or direction.strip() not in _DIRECTIONS:
            raise StudyError(
                f"invalid objective '{item}' (allowed: 'metric:max' or 'metric:min', "
                "e.g. accuracy:max)"
            )
        objectives.append(Objective(metric.strip(), _DIRECTIONS[direction.strip()]))
    if not objectives:
        raise StudyError("no objectives (set hydra.sweeper.objectives, e.g. [accuracy:max])")
    metrics = [o.metric for o in objectives]
    if len(set(metrics)) != len(metrics):
        raise StudyError(f"an objective is listed twice: {', '.join(metrics)}")
    return objectives


def parse_constraint(text: str) -> Constraint:
    found = _CONSTRAINT.match(str(text))
    allowed = "allowed: '<metric> <= <number>' or '<metric> >= <number>'"
    if not found:
        raise StudyError(f"malformed constraint '{text}' ({allowed})")
    metric, op, bound = found.groups()
    try:
        number = float(bound)
    except ValueError:
        # The presets' memory bound is ${budget_gb}, which reads None until it is set.
        hint = "; this preset needs budget_gb=<GiB>" if bound == "None" else ""
        raise StudyError(
            f"malformed constraint '{text}': '{bound}' is not a number{hint}"
        ) from None
    if not math.isfinite(number):
        raise StudyError(f"malformed constraint '{text}': the bound must be finite")
    return Constraint(str(text).strip(), metric, op, number)


def check_metrics(
    objectives: Sequence[Objective], constraints: Sequence[Constraint], known: Collection[str]
) -> None:
    """Refuse an objective or constraint on a metric no trial returns (a typo), before the
    first trial rather than after it."""
    named = [("objectives", o.metric) for o in objectives]
    named += [("constraints", c.metric) for c in constraints]
    for key, metric in named:
        if metric not in known:
            close = difflib.get_close_matches(metric, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise StudyError(
                f"invalid value for 'hydra.sweeper.{key}': '{metric}' is not a metric a trial "
                f"returns ({hint}allowed: {', '.join(sorted(known))})"
            )


def worker_seed(seed: int | None, worker: int) -> int | None:
    """The sampler seed of the study's `worker`-th worker (0 for the first to join): the study
    seed itself for the first, a value derived from both for the others, so that workers
    started with the same command (and seed) do not ask for the same parameters."""
    if seed is None or worker == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(name: str, seed: int | None, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """`name` is one of SAMPLERS (checked with the rest of the study's settings)."""
    if name == "grid":
        assert space.grid is not None  # parse_space refuses intervals for the grid sampler
        return _GridSampler(space.grid, seed=seed)
    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
    }
    return samplers[name](seed=seed)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler minus its `study.stop()` once the grid is exhausted: that call only works
    inside `study.optimize`, and the sweeper stops by counting trials anyway."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        pass


def default_study_name(
    experiment: str,
    sampler: str,
    space: SearchSpace,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint],
) -> str:
    """`<experiment>-<digest>`: the same command names the same study, so it resumes; a changed
    space, objective, constraint or fixed override starts another. n_trials and seed are left
    out, so a finished study can be extended by raising n_trials."""
    definition = {
        "sampler": sampler,
        "space": {k: distribution_to_json(d) for k, d in sorted(space.distributions.items())},
        "fixed": sorted(space.fixed),
        "objectives": [str(o) for o in objectives],
        "constraints": [c.text for c in constraints],
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:8]
    return f"{experiment}-{digest}"


@dataclass
class Outcome:
    """What Optuna is told about a finished trial."""

    values: list[float] | None  # None: the trial FAILs
    constraints: dict[str, float] = field(default_factory=dict)  # constraint text -> violation
    failure: str = ""

    @property
    def feasible(self) -> bool:
        return self.values is not None and all(v <= 0 for v in self.constraints.values())


def evaluate(
    metrics: Mapping[str, float] | None,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint],
) -> Outcome:
    """Objective values and constraint violations from a trial's metrics (None: it failed)."""
    if metrics is None:
        return Outcome(None, failure="the trial failed (its MLflow run holds the error)")
    needed = [o.metric for o in objectives] + [c.metric for c in constraints]
    missing = [name for name in needed if name not in metrics]
    if missing:  # a metric of another engine or task (names are checked before the study)
        return Outcome(
            None,
            failure=f"metric '{missing[0]}' is not among this trial's "
            f"({', '.join(sorted(metrics))})",
        )
    bad = [name for name in needed if not math.isfinite(metrics[name])]
    if bad:
        return Outcome(None, failure=f"metric '{bad[0]}' is {metrics[bad[0]]}")
    return Outcome(
        [float(metrics[o.metric]) for o in objectives],
        {c.text: c.violation(float(metrics[c.metric])) for c in constraints},
    )
