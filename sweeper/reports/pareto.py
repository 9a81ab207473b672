"""The Pareto front of a sweep or study, from its MLflow runs: HTML (plotly), PNG, CSV.

A sweep (grid or Optuna study) is one MLflow parent run; its trials are the child runs. Points
are the FINISHED trials that logged every objective; trials an Optuna study found infeasible
(tag `optuna_feasible=false`) are drawn but never on the front.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from sweeper.reports.tables import fmt

DEFAULT_OBJECTIVES = "accuracy:max,tps:max,peak_mem_gb:min"
_DIRECTIONS = {"max": True, "maximize": True, "min": False, "minimize": False}


class ReportError(ValueError):
    """A one-line message for the user."""


@dataclass(frozen=True)
class Objective:
    metric: str
    maximize: bool

    @property
    def label(self) -> str:
        return f"{self.metric} ({'max' if self.maximize else 'min'})"


@dataclass
class TrialPoint:
    trial: str  # Optuna trial number or Hydra job number
    run_id: str
    values: list[float]
    overrides: str
    feasible: bool = True
    on_front: bool = False
    label: str = ""  # the overrides that differ between the trials: what the sweep varied


def _normal(override: str) -> str:
    """One spelling per value: a grid's job overrides escape ':' and write True for true."""
    key, _, value = override.replace("\\", "").partition("=")
    return f"{key}={value.lower() if value in ('True', 'False') else value}"


def label_varying(points: Sequence[TrialPoint]) -> None:
    """Label each point with the overrides whose values differ across the points (the fixed
    ones, such as tracking.uri, would drown what was swept)."""
    parsed = [
        dict(_normal(item).split("=", 1) for item in p.overrides.split() if "=" in item)
        for p in points
    ]
    keys = {key for one in parsed for key in one}
    varying = {key for key in keys if len({one.get(key) for one in parsed}) > 1}
    for point, one in zip(points, parsed, strict=True):
        point.label = (
            " ".join(f"{k}={v}" for k, v in one.items() if k in varying) or point.overrides
        )


def parse_objectives(text: str) -> list[Objective]:
    """`accuracy:max,tps:max,peak_mem_gb:min` -> objectives (at least two)."""
    objectives = []
    for item in text.split(","):
        metric, _, direction = item.strip().partition(":")
        if not metric or direction not in _DIRECTIONS:
            raise ReportError(
                f"invalid objective '{item.strip()}' (allowed: metric:max or metric:min, "
                f"e.g. {DEFAULT_OBJECTIVES})"
            )
        objectives.append(Objective(metric, _DIRECTIONS[direction]))
    if len(objectives) < 2 or len({o.metric for o in objectives}) != len(objectives):
        raise ReportError(f"--objectives needs two or more distinct metrics, got '{text}'")
    return objectives


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    better = [x > y if up else x < y for x, y, up in zip(a, b, maximize, strict=True)]
    worse = [x < y if up else x > y for x, y, up in zip(a, b, maximize, strict=True)]
    return any(better) and not any(worse)


def mark_front(points: list[TrialPoint], objectives: Sequence[Objective]) -> None:
    """Set `on_front` on the feasible points that no other feasible point dominates."""
    maximize = [o.maximize for o in objectives]
    feasible = [p for p in points if p.feasible]
    for point in feasible:
        point.on_front = not any(
            dominates(other.values, point.values, maximize) for other in feasible
        )


def latest_parent(client: Any, experiment_id: str) -> str:
    """The most recent run of the experiment that has trials under it."""
    children = client.search_runs(
        [experiment_id],
        filter_string="tags.mlflow.parentRunId != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not children:
        raise ReportError("the experiment has no sweep yet (no run has child runs)")
    return children[0].data.tags["mlflow.parentRunId"]


def load_points(
    client: Any, experiment_id: str, parent_id: str | None, objectives: Sequence[Objective]
) -> tuple[list[TrialPoint], int]:
    """The finished trials with every objective logged, and how many finished ones lacked one.
    `parent_id` None: every finished trial of the experiment, of every sweep and single run."""
    finished = "attributes.status = 'FINISHED'"
    where = f"tags.mlflow.parentRunId = '{parent_id}' and {finished}" if parent_id else finished
    runs = client.search_runs([experiment_id], filter_string=where, max_results=50_000)
    if parent_id is None:  # a sweep's parent run is no trial: trials are tagged with the engine
        runs = [run for run in runs if "engine" in run.data.tags]
    points, incomplete = [], 0
    for run in runs:
        values = [run.data.metrics.get(o.metric) for o in objectives]
        if any(v is None or not math.isfinite(v) for v in values):
            incomplete += 1
            continue
        tags = run.data.tags
        points.append(
            TrialPoint(
                trial=tags.get("optuna_trial_number", tags.get("hydra_job_num", ""))
                if parent_id
                else str(run.info.start_time),  # numbered in start order below
                run_id=run.info.run_id,
                values=[float(v) for v in values],
                overrides=tags.get("hydra_overrides", ""),
                feasible=tags.get("optuna_feasible", "true") == "true",
            )
        )
    points.sort(key=lambda p: int(p.trial) if p.trial.isdigit() else -1)
    if parent_id is None:
        for number, point in enumerate(points):
            point.trial = str(number)
    label_varying(points)
    return points, incomplete


def _pairs(objectives: Sequence[Objective]) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(len(objectives)), 2))


def _groups(points: Sequence[TrialPoint]) -> list[tuple[str, str, list[TrialPoint]]]:
    """(name, colour, points): the front, the dominated feasible points, the infeasible ones."""
    return [
        ("Pareto front", "#d62728", [p for p in points if p.on_front]),
        ("dominated", "#1f77b4", [p for p in points if p.feasible and not p.on_front]),
        ("infeasible", "#7f7f7f", [p for p in points if not p.feasible]),
    ]


def write_html(
    points: Sequence[TrialPoint], objectives: Sequence[Objective], title: str, path: Path
) -> None:
    """One scatter panel per pair of objectives; hover shows the trial, overrides and run id.
    plotly.js is inlined so the page opens offline (and inside MLflow's artifact viewer)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = _pairs(objectives)
    figure = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08)
    for column, (x, y) in enumerate(pairs, start=1):
        for name, colour, group in _groups(points):
            figure.add_trace(
                go.Scatter(
                    x=[p.values[x] for p in group],
                    y=[p.values[y] for p in group],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=column == 1,
                    marker={
                        "color": colour,
                        "size": 10,
                        "symbol": "x" if name == "infeasible" else "circle",
                    },
                    text=[
                        f"trial {p.trial}<br>{html.escape(p.label)}<br>run {p.run_id}"
                        for p in group
                    ],
                    hovertemplate="%{text}<br>%{x:.4g}, %{y:.4g}<extra></extra>",
                ),
                row=1,
                col=column,
            )
        figure.update_xaxes(title_text=objectives[x].label, row=1, col=column)
        figure.update_yaxes(title_text=objectives[y].label, row=1, col=column)
    figure.update_layout(title=title, height=500, width=max(600, 480 * len(pairs)))
    figure.write_html(path, include_plotlyjs=True, full_html=True)


def write_png(
    points: Sequence[TrialPoint], objectives: Sequence[Objective], title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    pairs = _pairs(objectives)
    figure, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for axis, (x, y) in zip(axes[0], pairs, strict=True):
        for name, colour, group in _groups(points):
            if group:
                axis.scatter(
                    [p.values[x] for p in group],
                    [p.values[y] for p in group],
                    c=colour,
                    label=name,
                    marker="x" if name == "infeasible" else "o",
                )
        axis.set_xlabel(objectives[x].label)
        axis.set_ylabel(objectives[y].label)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(points: Sequence[TrialPoint], objectives: Sequence[Objective], path: Path) -> None:
    import pandas as pd

    rows = [
        {
            "trial": p.trial,
            **{o.metric: v for o, v in zip(objectives, p.values, strict=True)},
            "feasible": p.feasible,
            "on_front": p.on_front,
            "varying": p.label,
            "overrides": p.overrides,
            "run_id": p.run_id,
        }
        for p in points
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def front_table(points: Sequence[TrialPoint], objectives: Sequence[Objective]) -> Table:
    front = [p for p in points if p.on_front]
    table = Table(title=f"Pareto front: {len(front)} of {len(points)} trials", title_justify="left")
    table.add_column("trial")
    for objective in objectives:
        table.add_column(objective.label, justify="right")
    table.add_column("overrides (what varies)")
    for point in front:
        table.add_row(point.trial, *(fmt(v) for v in point.values), point.label)
    return table
