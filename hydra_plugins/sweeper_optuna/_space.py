"""The search space: Hydra sweep syntax to Optuna distributions, and sampled values back to
overrides.

Parameters come from `hydra.sweeper.params` and from the command line, as in Hydra's own Optuna
sweeper: a sweep on the command line (`batch_size=1,8`, `temperature=interval(0,1)`) is a
dimension of the space, replacing a preset's; a plain value (`batch_size=4`) is passed to every
trial and pins that key even if a preset searches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer, ValueType
from hydra.errors import OverrideParseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hydra_plugins.sweeper_optuna._errors import StudyError

_PRIMITIVES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class SearchSpace:
    distributions: dict[str, BaseDistribution]
    # The values of each parameter in order, or None when some parameter is continuous.
    grid: dict[str, list[Any]] | None
    # The command line's other overrides, passed to every trial as written.
    fixed: list[str]

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A trial's overrides: the fixed ones, then its sampled values in Hydra syntax."""
        return [*self.fixed, *(f"{key}={_override_value(v)}" for key, v in params.items())]

    @property
    def grid_size(self) -> int:
        return math.prod(len(values) for values in (self.grid or {}).values())


def _override_value(value: Any) -> str:
    # Hydra's spelling of booleans: Transformer.str writes Python's True/False.
    return str(value).lower() if isinstance(value, bool) else Transformer.str(value)


def _choices(override: Override) -> list[Any]:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    for value in values:
        if not isinstance(value, _PRIMITIVES):
            raise StudyError(
                f"'{override.input_line}': choices must be numbers, strings, booleans or null"
            )
    return values


def _range_distribution(override: Override, values: list[Any]) -> BaseDistribution:
    if not values:
        raise StudyError(f"'{override.input_line}' is an empty range")
    step = abs(override.value().step)
    low, high = min(values), max(values)
    if all(isinstance(v, int) for v in values):
        return IntDistribution(low, high, step=int(step))
    return FloatDistribution(float(low), float(high), step=float(step))


def _interval_distribution(override: Override) -> BaseDistribution:
    sweep = override.value()
    log = "log" in sweep.tags
    if sweep.start >= sweep.end or (log and sweep.start <= 0):
        allowed = "0 < low < high with tag(log, ...)" if log else "low < high"
        raise StudyError(f"'{override.input_line}': invalid interval (allowed: {allowed})")
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def _dimension(override: Override) -> tuple[BaseDistribution, list[Any] | None]:
    """The distribution of one sweep override and, when it is discrete, its values in order."""
    kind = override.value_type
    if kind in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
        values = _choices(override)
        return CategoricalDistribution(values), values
    if kind == ValueType.RANGE_SWEEP:
        values = _choices(override)
        if override.value().shuffle:
            return CategoricalDistribution(values), values
        return _range_distribution(override, values), values
    if kind == ValueType.INTERVAL_SWEEP:
        return _interval_distribution(override), None
    raise StudyError(
        f"'{override.input_line}': not a search dimension "
        "(allowed: choice, range, interval, int(interval), tag(log, interval))"
    )


def _parse(lines: Sequence[str], where: str) -> list[Override]:
    parsed = []
    parser = OverridesParser.create()
    for line in lines:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except OverrideParseException as error:
            raise StudyError(f"{where}: cannot parse '{line}': {error.args[0]}") from None
    return parsed


def parse_space(params: Mapping[str, Any], arguments: Sequence[str], sampler: str) -> SearchSpace:
    """`params`: hydra.sweeper.params; `arguments`: the command line's task overrides."""
    from_params = _parse([f"{key}={value}" for key, value in params.items()], "hydra.sweeper")
    from_args = _parse(list(arguments), "command line")
    by_key: dict[str, Override] = {}
    for override in [*from_params, *from_args]:  # the command line wins over the preset
        by_key.pop(override.get_key_element(), None)
        by_key[override.get_key_element()] = override

    distributions: dict[str, BaseDistribution] = {}
    grid: dict[str, list[Any]] | None = {}
    fixed: list[str] = []
    for key, override in by_key.items():
        if not override.is_sweep_override():
            fixed.append(str(override.input_line))
            continue
        distributions[key], values = _dimension(override)
        if values is None:
            if sampler == "grid":
                raise StudyError(
                    f"sampler 'grid' needs discrete parameters (choice or range); "
                    f"'{override.input_line}' is an interval"
                )
            grid = None
        elif grid is not None:
            grid[key] = values
    if not distributions:
        raise StudyError(
            "nothing to search: set hydra.sweeper.params or sweep a key on the command line "
            "(e.g. batch_size=1,4,8 or temperature=interval(0,1))"
        )
    return SearchSpace(distributions, grid, fixed)
