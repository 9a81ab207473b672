"""Terminal tables of the six headline metrics, for one trial and for a whole sweep."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from sweeper.metrics import HEADLINE_METRICS
from sweeper.metrics.stats import CI_SUFFIX

UNITS = {
    "tps": "tok/s",
    "ttft_s": "s",
    "context_load_s": "s",
    "peak_mem_gb": "GiB",
    "batch_efficiency": "",
    "accuracy": "",
    "goodput_rps": "req/s",
}


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.4g}"
    return f"{value:.3e}"


def with_ci(metrics: Mapping[str, object], name: str) -> str:
    """The metric's value, with its 95% interval's half-width when it was repeated."""
    value, half = metrics.get(name), metrics.get(name + CI_SUFFIX)
    text = fmt(value)  # type: ignore[arg-type]
    if isinstance(half, float) and math.isfinite(half):
        text += f" ± {fmt(half)}"
    return text


def trial_table(title: str, metrics: Mapping[str, float]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name in HEADLINE_METRICS:
        table.add_row(name, with_ci(metrics, name), UNITS[name])
    return table


def sweep_table(title: str, rows: Sequence[Mapping[str, object]]) -> Table:
    """`rows`: dicts with 'trial', 'status', 'overrides' and the headline metric values."""
    table = Table(title=title, title_justify="left")
    for column in ("trial", "status", "overrides", *HEADLINE_METRICS):
        table.add_column(column, justify="right" if column in HEADLINE_METRICS else "left")
    for row in rows:
        table.add_row(
            str(row["trial"]),
            str(row["status"]),
            str(row["overrides"]),
            *(with_ci(row, name) for name in HEADLINE_METRICS),
        )
    return table


def show(table: Table) -> None:
    # Wide enough for the overrides column when output goes to a file or a narrow terminal.
    Console(width=max(160, Console().width)).print(table)


def answer_table(answer: Any, metrics: Sequence[str]) -> Table:
    """The sweep's trials in the rule's order: ★ on the Pareto front, → the recommended one,
    ≈ within its 95% interval, ✗ outside the rule (memory budget, accuracy interval)."""
    table = Table(title=f"ranked by {answer.rule}", title_justify="left")
    table.add_column("")
    table.add_column("trial", justify="right")
    table.add_column("setting")
    for name in metrics:
        unit = UNITS.get(name, "")
        table.add_column(f"{name} ({unit})" if unit else name, justify="right")
    for trial in answer.ranked:
        marks = "".join(
            mark
            for mark, on in (
                ("→", trial is answer.chosen),
                ("★", trial.on_front),
                ("≈", trial.close_to_chosen),
                ("✗", not trial.eligible),
            )
            if on
        )
        table.add_row(
            marks, trial.name, trial.label, *(with_ci(trial.metrics, name) for name in metrics)
        )
    return table


def answer_lines(answer: Any) -> list[str]:
    """The recommendation in words, and the command that reproduces it."""
    lines = [f"note: {note}" for note in answer.notes]
    chosen = answer.chosen
    if chosen is None:
        return lines
    shown = [
        f"{name} {with_ci(chosen.metrics, name)} {UNITS.get(name, '')}".rstrip()
        for name in (answer.throughput, "accuracy", "peak_mem_gb")
        if name in chosen.metrics
    ]
    return [
        *lines,
        f"recommended: trial {chosen.name} ({chosen.label}): {', '.join(shown)}",
        f"  by the rule: {answer.rule} (select= to change it)",
        f"  reproduce: {chosen.command}",
    ]
