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


# What the marks of a ranked table mean (the terminal, answer.md and the report's HTML).
MARKS = (
    "→ recommended, ★ on the Pareto front (accuracy, throughput, memory), ≈ within the "
    "recommended one's 95% interval, ✗ outside the rule (memory budget, accuracy interval, "
    "a study's constraints)"
)


def answer_metrics(answer: Any) -> list[str]:
    """The columns of a ranked table: the rule's throughput first when it is not tps."""
    extra = [answer.throughput] if answer.throughput not in HEADLINE_METRICS else []
    return [*extra, *HEADLINE_METRICS]


def unit(name: str) -> str:
    """A metric's unit: named above, else read off its suffix (`_s`: seconds, `_gb`: GiB)."""
    if name in UNITS:
        return UNITS[name]
    return {"_s": "s", "_gb": "GiB", "_rps": "req/s"}.get("_" + name.rsplit("_", 1)[-1], "")


def heading(name: str) -> str:
    return f"{name} ({unit(name)})" if unit(name) else name


def marks(answer: Any, trial: Any) -> str:
    pairs = (
        ("→", trial is answer.chosen),
        ("★", trial.on_front),
        ("≈", trial.close_to_chosen),
        ("✗", not trial.eligible),
    )
    return "".join(mark for mark, on in pairs if on)


def answer_rows(answer: Any, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the ranked table, as text: one source for every rendering."""
    header = ["", "trial", "setting", *(heading(name) for name in metrics)]
    rows = [
        [marks(answer, t), t.name, t.label, *(with_ci(t.metrics, name) for name in metrics)]
        for t in answer.ranked
    ]
    return header, rows


def answer_table(answer: Any, metrics: Sequence[str]) -> Table:
    """The sweep's trials in the rule's order: ★ on the Pareto front, → the recommended one,
    ≈ within its 95% interval, ✗ outside the rule (memory budget, accuracy interval)."""
    table = Table(title=f"ranked by {answer.rule}", title_justify="left")
    header, rows = answer_rows(answer, metrics)
    for index, column in enumerate(header):
        table.add_column(column, justify="right" if index == 1 or index > 2 else "left")
    for row in rows:
        table.add_row(*row)
    return table


def answer_markdown(answer: Any, lines: Sequence[str]) -> str:
    """The answer as Markdown (the parent run's description and answer.md)."""
    header, rows = answer_rows(answer, answer_metrics(answer))
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(
        ["## The answer", "", *[f"- {line.strip()}" for line in lines], "", *table, "", MARKS]
    )


def answer_lines(answer: Any) -> list[str]:
    """The recommendation in words, and the command that reproduces it."""
    lines = [f"note: {note}" for note in answer.notes]
    chosen = answer.chosen
    if chosen is None:
        return lines
    shown = [
        f"{name} {with_ci(chosen.metrics, name)} {unit(name)}".rstrip()
        for name in (answer.throughput, "accuracy", "peak_mem_gb")
        if name in chosen.metrics
    ]
    return [
        *lines,
        f"recommended: trial {chosen.name} ({chosen.label}): {', '.join(shown)}",
        f"  by the rule: {answer.rule} (select= to change it)",
        f"  reproduce: {chosen.command}",
    ]
