"""A sweep's report: one HTML page (plotly, self-contained), the main plot as a PNG, a CSV.

The page says the answer first (the recommended setting, the rule, the command that reproduces
it), then the main plot, the ranked table, latency for serving runs, each knob's effect for grids,
and for Optuna studies where Optuna's own plots are. It is written for MLflow's artifact viewer,
which shows an HTML artifact in a frame as wide as the panel beside the artifact list (about
700-900 px on a laptop screen): figures follow the frame's width, the table scrolls inside its
box, commands wrap, so nothing is cut off at the right.

Files: `<out>/report/report.html|png|csv`, logged to the sweep's parent run as `report/`; a
study's `study/summary.html` (written by hydra_plugins/sweeper_optuna/_tracking.py) lies beside
it in both places, so the page's relative link to it works in the run's artifact folder and in
`<out>`.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.reports import plots
from sweeper.reports.recommend import Answer
from sweeper.reports.tables import MARKS, answer_lines, answer_metrics, answer_rows, heading

REPORT_DIR = "report"
STUDY_SUMMARY = "study/summary.html"  # the Optuna plugin's page: history, importances
# Below this many finished trials Optuna's importances (a random forest fitted to the trials)
# and its history say little.
FEW_TRIALS = 10


def few_trials_caveat(finished: int) -> str:
    """What to make of Optuna's history and importances after `finished` trials ("" when
    enough)."""
    if finished >= FEW_TRIALS:
        return ""
    return (
        f"Only {finished} trial(s) finished: Optuna's history is short and its importances (a "
        f"random forest fitted to {finished} point(s)) are a hint, not a finding; {FEW_TRIALS} "
        "or more trials make them worth reading."
    )


@dataclass
class Context:
    """What the page says about where its trials come from."""

    title: str
    source: str = ""  # where the trials come from: the parent run's name and id
    study: str = ""  # the Optuna study's name; "" for a grid or --all-runs
    failed: int = 0  # trials of the sweep that did not finish (left out)
    runs_url: str = ""  # the MLflow runs page of these trials


def describe(client: Any, parent_id: str | None, experiment: str, answer: Answer) -> Context:
    """The context of a sweep's parent run (None: every run of the experiment)."""
    if parent_id is None:
        return Context(title=f"{experiment}: all runs", source="every finished trial")
    run = client.get_run(parent_id)
    tags = run.data.tags
    failed = tags.get("failed_trials", "0")
    study = tags.get("optuna_study_name", "")
    knobs = sorted({k for t in answer.ranked for k in t.knobs})
    what = f"study {study}" if study else f"sweep of {', '.join(knobs) or 'one setting'}"
    return Context(
        title=f"{experiment}: {what}",
        source=f"parent run {run.info.run_name} ({parent_id})",
        study=study,
        failed=int(failed) if failed.isdigit() else 0,
    )


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0 auto; padding: 8px 14px 24px; max-width: 1100px; font-size: 14px; }
h1 { font-size: 19px; margin: 6px 0 2px; overflow-wrap: anywhere; }
h2 { font-size: 16px; margin: 22px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
p { margin: 4px 0; line-height: 1.4; }
.meta { color: #666; font-size: 12px; overflow-wrap: anywhere; }
.answer { background: #f3f7fc; border-left: 4px solid #4c78a8; padding: 8px 12px; }
.answer .chosen { font-size: 15px; font-weight: 600; }
pre, code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #fff; border: 1px solid #dde;
      padding: 6px 8px; margin: 4px 0; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 6px 10px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12.5px; white-space: nowrap; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e6e6e6; text-align: right; }
th { background: #f5f5f5; position: sticky; top: 0; }
td.setting, th.setting { text-align: left; }
tr.chosen td { background: #fdecea; font-weight: 600; }
.legend { color: #555; font-size: 12px; }
.figure { width: 100%; }
"""


def _figure_html(figure: Any, height: int) -> str:
    body = figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        default_width="100%",
        default_height=f"{height}px",
        config={"responsive": True, "displaylogo": False},
    )
    return f'<div class="figure">{body}</div>'


def _answer_html(answer: Answer) -> str:
    parts = []
    for line in answer_lines(answer):
        text = line.strip()
        if text.startswith("reproduce: "):
            command = text.removeprefix("reproduce: ")
            parts.append(f"<p>reproduce:</p><pre>{html.escape(command)}</pre>")
        elif text.startswith("recommended: "):
            parts.append(f'<p class="chosen">{html.escape(text)}</p>')
        else:
            parts.append(f"<p>{html.escape(text)}</p>")
    return '<div class="answer">' + "\n".join(parts) + "</div>"


def _table_html(answer: Answer) -> str:
    header, rows = answer_rows(answer, answer_metrics(answer))

    def cell(tag: str, index: int, text: str) -> str:
        kind = ' class="setting"' if index == 2 else ""
        return f"<{tag}{kind}>{html.escape(text)}</{tag}>"

    head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
    chosen = '<tr class="chosen">'
    body = [
        (chosen if trial is answer.chosen else "<tr>")
        + "".join(cell("td", i, text) for i, text in enumerate(row))
        + "</tr>"
        for trial, row in zip(answer.ranked, rows, strict=True)
    ]
    return (
        f'<p>ranked by {html.escape(answer.rule)}</p><div class="scroll"><table>{head}'
        + "".join(body)
        + f'</table></div><p class="legend">{html.escape(MARKS)}</p>'
    )


def _study_html(context: Context, finished: int) -> str:
    parts = [
        f"<p>Optuna's own plots of study <b>{html.escape(context.study)}</b>: the optimisation "
        "history and the parameter importances of each objective, in "
        f'<a href="../{STUDY_SUMMARY}"><code>{STUDY_SUMMARY}</code></a>, beside this report '
        "among the run's artifacts (in MLflow: this run's Artifacts tab, folder "
        "<code>study</code>), with <code>study/trials.csv</code> and "
        "<code>study/best_trials.json</code>.</p>"
    ]
    if caveat := few_trials_caveat(finished):
        parts.append(f'<p class="note">{html.escape(caveat)}</p>')
    return "\n".join(parts)


def write_html(answer: Answer, context: Context, path: Path) -> None:
    import plotly.offline

    finished = len(answer.ranked)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = f"{finished} finished trial(s)"
    if context.failed:
        meta += f", {context.failed} failed (left out)"
    meta += f"; {context.source}; written {stamp} by sweeper"
    sections = [
        f"<h1>{html.escape(context.title)}</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        "<h2>The answer</h2>",
        _answer_html(answer),
    ]
    if context.runs_url:
        url = html.escape(context.runs_url)
        sections.append(f'<p class="meta">In MLflow: <a href="{url}" target="_blank">{url}</a></p>')
    if plots.plotted(answer):
        y = plots.y_metric(answer)
        sections += [
            f"<h2>{heading(y).capitalize()} against throughput</h2>",
            "<p>Each point a trial, labelled by the knobs that vary; colour: peak memory; "
            "dashed: the front (no trial is both more accurate and faster than a point on it); "
            "ringed: the recommended one. Bars: 95% intervals where measured.</p>",
            _figure_html(plots.main_figure(answer), 520),
        ]
    sections += ["<h2>All trials, ranked</h2>", _table_html(answer)]
    latency = plots.latency_figure(answer)
    if latency is not None:
        sections += [
            "<h2>Latency against throughput</h2>",
            "<p>The serving trials' 99th percentiles per request: time to the first token and "
            "to the last.</p>",
            _figure_html(latency, 440),
        ]
    if not context.study and len(answer.ranked) > 1:
        effects = plots.effects_figure(answer)
        if effects is not None:
            rows = len({k for t in answer.ranked for k in t.knobs})
            sections += [
                "<h2>What each knob does</h2>",
                "<p>For each knob the grid varies, each metric's mean over the trials with that "
                "value (the other knobs averaged over).</p>",
                _figure_html(effects, 60 + 260 * rows),
            ]
    if context.study:
        sections += ["<h2>The study</h2>", _study_html(context, finished)]
    sections.append(
        '<p class="meta">Also here: report.png (the main plot), report.csv (every trial, its '
        "marks, knobs, metrics and command).</p>"
    )
    title = html.escape(context.title)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{title}</title><style>{_STYLE}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>"
    )
    path.write_text(page, encoding="utf-8")


def write_csv(answer: Answer, path: Path) -> None:
    import pandas as pd

    from sweeper.metrics.stats import CI_SUFFIX
    from sweeper.reports.tables import marks

    metrics = answer_metrics(answer)
    latency = [m for m in plots.LATENCIES if any(math.isfinite(t.value(m)) for t in answer.ranked)]
    rows = []
    for trial in answer.ranked:
        row: dict[str, Any] = {
            "trial": trial.name,
            "marks": marks(answer, trial),
            "recommended": trial is answer.chosen,
            "on_front": trial.on_front,
            "eligible": trial.eligible,
            "close_to_recommended": trial.close_to_chosen,
            "feasible": trial.feasible,
            "setting": trial.label,
            **{f"knob:{k}": v for k, v in trial.knobs.items()},
        }
        for name in [*metrics, *latency]:
            row[name] = trial.value(name)
            row[name + CI_SUFFIX] = trial.value(name + CI_SUFFIX)
        row.update(command=trial.command, run_id=trial.run_id)
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def write_report(answer: Answer, context: Context, folder: Path) -> list[Path]:
    """report.html, report.png (when there is something to plot) and report.csv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "report.html", folder / "report.csv"]
    write_html(answer, context, files[0])
    write_csv(answer, files[1])
    if plots.plotted(answer):
        files.append(folder / "report.png")
        plots.write_png(answer, context.title, files[-1])
    return files


def make_report(
    client: Any, parent_id: str | None, answer: Answer, context: Context, out: Path
) -> list[Path]:
    """Write the report under `out/report/` and log it to the parent run as `report/`; a
    study's summary page is fetched to `out/study/` so that the page's link works there too."""
    files = write_report(answer, context, out / REPORT_DIR)
    if parent_id is None:  # runs of several sweeps have no one run to log to
        return files
    if context.study:
        folder = out / Path(STUDY_SUMMARY).parent
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # a study that ended before its summary was written
            client.download_artifacts(parent_id, STUDY_SUMMARY, str(folder))
    for path in files:
        client.log_artifact(parent_id, str(path), REPORT_DIR)
    return files
