"""The report's figures, drawn from the answer (sweeper/reports/recommend.py).

- the main plot: accuracy (0-1) against the answer's throughput, the accuracy x throughput front
  as a step line, every point labelled by its knobs, peak memory as colour, the recommended
  point ringed; plotly (interactive) and matplotlib (the PNG);
- latency against throughput, for trials that measured p99 latencies (serving loads);
- per knob, each metric's mean per value (grids).

Axes start at 0 and accuracy spans [0, 1]: a difference reads at its true size, not zoomed into
noise.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sweeper.metrics.stats import CI_SUFFIX
from sweeper.reports.recommend import Answer, Trial, front
from sweeper.reports.tables import fmt, heading

MEMORY = "peak_mem_gb"
LATENCIES = ("ttft_p99_s", "latency_p99_s")  # what a serving load measures, per request
COLOURS = "Viridis"  # plotly's; matplotlib's "viridis" is the same map
# Labels on every point up to this many trials; beyond, on the front and the chosen one only.
MAX_LABELLED = 16


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def y_metric(answer: Answer) -> str:
    """Accuracy, or peak memory when no trial logged accuracy (ignore_eos, random weights)."""
    known = _finite([t.value("accuracy") for t in answer.ranked])
    return "accuracy" if known else MEMORY


def plotted(answer: Answer) -> list[Trial]:
    """The trials with both coordinates of the main plot."""
    y = y_metric(answer)
    return [
        t
        for t in answer.ranked
        if math.isfinite(t.value(answer.throughput)) and math.isfinite(t.value(y))
    ]


def step_front(answer: Answer) -> list[Trial]:
    """The accuracy x throughput front, by throughput: the step line's corners."""
    y = y_metric(answer)
    goals = [(y, y != MEMORY), (answer.throughput, True)]
    return sorted(front(plotted(answer), goals), key=lambda t: t.value(answer.throughput))


def step_line(answer: Answer) -> tuple[list[float], list[float]]:
    """The front's staircase, drawn vertical-then-horizontal between corners: what lies below
    and left of it is dominated. Accuracy's reaches the axes (from the y axis at the most
    accurate corner, down to 0 at the fastest)."""
    x, y = answer.throughput, y_metric(answer)
    corners = step_front(answer)
    xs, ys = [t.value(x) for t in corners], [t.value(y) for t in corners]
    if corners and y == "accuracy":
        xs, ys = [0.0, *xs, xs[-1]], [ys[0], *ys, 0.0]
    return xs, ys


def labelled(answer: Answer) -> list[Trial]:
    trials = plotted(answer)
    if len(trials) <= MAX_LABELLED:
        return trials
    return [t for t in trials if t.on_front or t is answer.chosen]


def label_text(trial: Trial, newline: str = "\n") -> str:
    """The knobs, one per line: short enough to sit beside a point."""
    return newline.join(f"{k}={v}" for k, v in trial.knobs.items()) or f"trial {trial.name}"


def label_sides(trials: Sequence[Trial], x: str, y: str) -> dict[int, bool]:
    """Above (True) or below each point its label goes: below near the top of the axis, and
    away from the previous label when two points lie close."""
    xs = _finite([t.value(x) for t in trials]) or [1.0]
    span = (max(xs) - min(0.0, min(xs))) or 1.0
    ys = _finite([t.value(y) for t in trials]) or [1.0]
    top = max(1.0, max(ys)) if y == "accuracy" else max(ys)
    sides: dict[int, bool] = {}
    previous: tuple[float, float, bool] | None = None
    for trial in sorted(trials, key=lambda t: (t.value(x), t.value(y))):
        above = trial.value(y) < 0.8 * top
        if previous is not None:
            px, py, side = previous
            near = abs(trial.value(x) - px) < 0.15 * span and abs(trial.value(y) - py) < 0.1 * top
            if near and side == above:
                above = not above
        sides[id(trial)] = above
        previous = (trial.value(x), trial.value(y), above)
    return sides


def _error(trials: Sequence[Trial], metric: str) -> list[float] | None:
    widths = [t.value(metric + CI_SUFFIX) for t in trials]
    return [w if math.isfinite(w) else 0.0 for w in widths] if _finite(widths) else None


def _hover(trial: Trial, metrics: Sequence[str]) -> str:
    values = "<br>".join(f"{heading(m)}: {fmt(trial.value(m))}" for m in metrics)
    return f"trial {trial.name}: {html.escape(trial.label)}<br>{values}<br>run {trial.run_id}"


def _colour_range(trials: Sequence[Trial]) -> tuple[float, float]:
    memory = _finite([t.value(MEMORY) for t in trials]) or [1.0]
    return 0.0, max(memory) or 1.0


# Accuracy's axis: [0, 1], with room above 1 for the labels of the most accurate points.
ACCURACY_TOP = 1.15
ACCURACY_TICKS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _point_text(trial: Trial, answer: Answer, above: bool) -> str:
    """A point's label for plotly; the recommended one's an empty line further out, clear of
    its ring."""
    text = label_text(trial, "<br>")
    if trial is answer.chosen:
        return f"{text}<br> " if above else f" <br>{text}"
    return text


def main_figure(answer: Answer) -> Any:
    """plotly: accuracy against throughput, the front as a step line, labelled points."""
    import plotly.graph_objects as go

    x, y = answer.throughput, y_metric(answer)
    trials = plotted(answer)
    figure = go.Figure()
    line_x, line_y = step_line(answer)
    figure.add_trace(
        go.Scatter(
            x=line_x,
            y=line_y,
            mode="lines",
            line={"shape": "vh", "color": "#888", "dash": "dash", "width": 1.5},
            name=f"front: {y} × throughput",
            hoverinfo="skip",
        )
    )
    cmin, cmax = _colour_range(trials)
    shown = {id(t) for t in labelled(answer)}
    sides = label_sides(trials, x, y)
    figure.add_trace(
        go.Scatter(
            x=[t.value(x) for t in trials],
            y=[t.value(y) for t in trials],
            error_x={"array": _error(trials, x), "visible": _error(trials, x) is not None},
            error_y={"array": _error(trials, y), "visible": _error(trials, y) is not None},
            mode="markers+text",
            text=[_point_text(t, answer, sides[id(t)]) if id(t) in shown else "" for t in trials],
            textposition=["top center" if sides[id(t)] else "bottom center" for t in trials],
            textfont={"size": 11},
            cliponaxis=False,
            marker={
                "size": [15 if t.on_front else 11 for t in trials],
                "symbol": [
                    "x" if not t.feasible else "star" if t.on_front else "circle" for t in trials
                ],
                "color": [t.value(MEMORY) for t in trials],
                "colorscale": COLOURS,
                "cmin": cmin,
                "cmax": cmax,
                "colorbar": {"title": {"text": "peak memory<br>(GiB)"}, "thickness": 14},
                "line": {"width": 0.5, "color": "#333"},
            },
            name="trials (★ on the Pareto front)",
            hovertext=[_hover(t, [x, y, MEMORY]) for t in trials],
            hoverinfo="text",
        )
    )
    if answer.chosen is not None and answer.chosen in trials:
        chosen = answer.chosen
        figure.add_trace(
            go.Scatter(
                x=[chosen.value(x)],
                y=[chosen.value(y)],
                mode="markers",
                marker={
                    "size": 28,
                    "symbol": "circle-open",
                    "color": "#d62728",
                    "line": {"width": 3},
                },
                name=f"→ recommended: trial {chosen.name}",
                hoverinfo="skip",
            )
        )
    figure.update_xaxes(title_text=f"throughput: {heading(x)}", rangemode="tozero")
    if y == "accuracy":
        figure.update_yaxes(range=[0, ACCURACY_TOP], tickvals=ACCURACY_TICKS)
    figure.update_yaxes(title_text=heading(y), rangemode="tozero")
    figure.update_layout(
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "x": 0},
        template="plotly_white",
    )
    return figure


def serving_trials(answer: Answer) -> list[Trial]:
    return [
        t
        for t in answer.ranked
        if math.isfinite(t.value(answer.throughput))
        and any(math.isfinite(t.value(m)) for m in LATENCIES)
    ]


def latency_figure(answer: Answer) -> Any | None:
    """plotly: p99 TTFT and p99 end-to-end latency against throughput (serving runs)."""
    import plotly.graph_objects as go

    trials = serving_trials(answer)
    if not trials:
        return None
    x = answer.throughput
    figure = go.Figure()
    for metric, symbol in zip(LATENCIES, ("circle", "diamond"), strict=True):
        have = [t for t in trials if math.isfinite(t.value(metric))]
        figure.add_trace(
            go.Scatter(
                x=[t.value(x) for t in have],
                y=[t.value(metric) for t in have],
                mode="markers+text" if metric == LATENCIES[-1] else "markers",
                text=[label_text(t, "<br>") for t in have],
                textposition="top center",
                textfont={"size": 10},
                cliponaxis=False,
                marker={"size": 11, "symbol": symbol},
                name=heading(metric),
                hovertext=[_hover(t, [x, metric]) for t in have],
                hoverinfo="text",
            )
        )
    figure.update_xaxes(title_text=f"throughput: {heading(x)}", rangemode="tozero")
    figure.update_yaxes(title_text="p99 latency (s)", rangemode="tozero")
    figure.update_layout(
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "x": 0},
        template="plotly_white",
    )
    return figure


def _order(values: Sequence[str]) -> list[str]:
    """Numbers in numeric order, then the rest as written."""

    def key(value: str) -> tuple[int, float, str]:
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)

    return sorted(values, key=key)


def effects(trials: Sequence[Trial], metric: str) -> dict[str, list[tuple[str, float, int]]]:
    """Per varied knob: (value, the metric's mean over the trials with that value, how many)."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for trial in trials:
        for knob, value in trial.knobs.items():
            if math.isfinite(trial.value(metric)):
                table[knob][value].append(trial.value(metric))
    return {
        knob: [(v, sum(by[v]) / len(by[v]), len(by[v])) for v in _order(list(by))]
        for knob, by in table.items()
    }


def effect_metrics(answer: Answer) -> list[str]:
    known = [
        m
        for m in (answer.throughput, "accuracy", MEMORY)
        if _finite([t.value(m) for t in answer.ranked])
    ]
    return known


def effects_figure(answer: Answer) -> Any | None:
    """plotly: one row per varied knob, one bar chart per metric: its mean per value."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = effect_metrics(answer)
    tables = {m: effects(answer.ranked, m) for m in metrics}
    knobs = sorted({k for t in answer.ranked for k in t.knobs})
    if not knobs or not metrics:
        return None
    figure = make_subplots(
        rows=len(knobs),
        cols=len(metrics),
        subplot_titles=[heading(m) for m in metrics],
        horizontal_spacing=0.08,
        vertical_spacing=min(0.12, 0.5 / len(knobs)),
    )
    for row, knob in enumerate(knobs, start=1):
        for col, metric in enumerate(metrics, start=1):
            points = tables[metric].get(knob, [])
            figure.add_trace(
                go.Bar(
                    x=[v for v, _, _ in points],
                    y=[mean for _, mean, _ in points],
                    text=[fmt(mean) for _, mean, _ in points],
                    textposition="auto",
                    hovertext=[f"{knob}={v}: mean of {n} trial(s)" for v, _, n in points],
                    hoverinfo="text",
                    marker_color="#4c78a8",
                    showlegend=False,
                ),
                row=row,
                col=col,
            )
            figure.update_xaxes(type="category", title_text=knob, row=row, col=col)
            if metric == "accuracy":
                figure.update_yaxes(range=[0, 1.05], row=row, col=col)
    figure.update_annotations(font_size=12)
    figure.update_layout(margin={"l": 50, "r": 20, "t": 40, "b": 40}, template="plotly_white")
    return figure


def write_png(answer: Answer, title: str, path: Any) -> list[str]:
    """matplotlib: the main plot as a PNG; returns the labels drawn (also kept in the file's
    Description, so what the picture shows can be read without looking at it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    x, y = answer.throughput, y_metric(answer)
    trials = plotted(answer)
    figure, axis = plt.subplots(figsize=(9, 5.6))
    line_x, line_y = step_line(answer)
    if line_x:
        axis.step(
            line_x,
            line_y,
            where="pre",
            color="#888",
            linestyle="--",
            linewidth=1.2,
            label=f"front: {y} × throughput",
        )
    cmin, cmax = _colour_range(trials)
    xerr, yerr = _error(trials, x), _error(trials, y)
    if xerr or yerr:
        axis.errorbar(
            [t.value(x) for t in trials],
            [t.value(y) for t in trials],
            xerr=xerr,
            yerr=yerr,
            fmt="none",
            ecolor="#999",
            elinewidth=1,
            zorder=1,
        )
    points = None
    for marker, group, size, name in (
        ("*", [t for t in trials if t.on_front], 220, "★ on the Pareto front"),
        ("o", [t for t in trials if not t.on_front and t.feasible], 80, "dominated"),
        ("X", [t for t in trials if not t.feasible], 80, "outside the constraints"),
    ):
        if group:
            points = axis.scatter(
                [t.value(x) for t in group],
                [t.value(y) for t in group],
                c=[t.value(MEMORY) for t in group],
                cmap="viridis",
                vmin=cmin,
                vmax=cmax,
                marker=marker,
                s=size,
                edgecolors="#333",
                linewidths=0.5,
                label=name,
                zorder=3,
            )
    if points is not None:
        figure.colorbar(points, ax=axis, label="peak memory (GiB)")
    chosen = answer.chosen
    if chosen is not None and chosen in trials:
        axis.scatter(
            [chosen.value(x)],
            [chosen.value(y)],
            s=650,
            facecolors="none",
            edgecolors="#d62728",
            linewidths=2.5,
            label=f"→ recommended: trial {chosen.name}",
            zorder=4,
        )
    sides = label_sides(trials, x, y)
    drawn = []
    for trial in labelled(answer):
        text = label_text(trial)
        above = sides[id(trial)]
        gap = 17 if trial is chosen else 10  # clear of the recommended one's ring
        axis.annotate(
            text,
            (trial.value(x), trial.value(y)),
            textcoords="offset points",
            xytext=(0, gap if above else -gap),
            ha="center",
            va="bottom" if above else "top",
            fontsize=8,
            zorder=5,
        )
        drawn.append(f"trial {trial.name}: {trial.label}")
    axis.set_xlabel(f"throughput: {heading(x)}")
    axis.set_ylabel(heading(y))
    axis.set_xlim(left=0, right=max([t.value(x) for t in trials] or [1.0]) * 1.15)
    if y == "accuracy":
        axis.set_ylim(0, ACCURACY_TOP)
        axis.set_yticks(ACCURACY_TICKS)
    else:
        axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left", fontsize=8, markerscale=0.6)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    description = f"{y} against {x}, peak memory as colour; points: " + "; ".join(drawn)
    figure.savefig(path, dpi=110, metadata={"Title": title, "Description": description})
    plt.close(figure)
    return drawn
