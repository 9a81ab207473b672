"""Saved views of MLflow's runs page: the six metrics as columns, without "Show more columns".

MLflow's UI (3.17) opens an experiment's runs table with three attribute columns (Source,
Models, Dataset) besides the run's name, creation and duration; metrics are columns only once a
user picks them, and that choice lives in the browser's local storage. What the UI reads from the
store is a *saved view*: an experiment tag `mlflow.sharedViewState.<id>` whose value is a JSON
envelope `{"name", "createdAt", "state"}`, `state` being the page's UI state (selected columns,
their order, charts) and search facets (filter, sort) as JSON. The URL parameter
`viewStateShareKey=<id>` opens it (the "Views" menu lists it by name); this is what the UI's own
"Save & share view" writes (mlflow/server/js/src/experiment-tracking/components/experiment-page/
utils/savedViewEnvelope.ts, hooks/useSharedExperimentViewState.ts). The same state keys are also
written at the top level of the value: older UIs parse the whole value as the state.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

from sweeper.metrics import HEADLINE_METRICS

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_URL_PARAM = "viewStateShareKey"
# The experiment's own view: every trial, of every sweep and single run, newest first.
TRIALS_VIEW = "sweeper-trials"
# A trial's run carries its engine; a sweep's parent run does not (its trials would otherwise
# sit folded under it: the table lists a parent's children only once the parent is expanded).
TRIALS_FILTER = "tags.engine LIKE '%'"
# The charts' section for metric names without a '/' (MLflow: MLFLOW_MODEL_METRIC_NAME).
_CHART_SECTION = "Model metrics"


def column(kind: str, name: str) -> str:
    """The UI's column key: `metrics.`tps``, `params.`batch_size``, `attributes.`Dataset``."""
    return f"{kind}.`{name}`"


def view_state(
    metrics: Sequence[str],
    params: Sequence[str] = (),
    search_filter: str = TRIALS_FILTER,
    order_by: str | None = None,
) -> dict[str, Any]:
    """The runs page with `metrics` (then the knobs `params`, then the dataset) as its first
    columns, ordered by `order_by` (a metric, highest first; None: newest first), and the chart
    view with one bar chart per metric in that order ahead of the others."""
    columns = [
        *(column("metrics", m) for m in metrics),
        *(column("params", p) for p in params),
        column("attributes", "Dataset"),
    ]
    section = f"sweeper-{_CHART_SECTION.lower().replace(' ', '-')}"
    charts = [
        {
            "type": "BAR",
            "uuid": f"sweeper-{metric}",
            "metricSectionId": section,
            "metricKey": metric,
            "runsCountToCompare": 10,
            "deleted": False,
            "isGenerated": True,
        }
        for metric in metrics
    ]
    state: dict[str, Any] = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "searchFilter": search_filter,
        "orderByKey": column("metrics", order_by) if order_by else "attributes.start_time",
        "orderByAsc": False,
        # isReordered: the UI appends the other metrics' charts after these, not in name order.
        "compareRunSections": [
            {
                "uuid": section,
                "name": _CHART_SECTION,
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": True,
            }
        ],
        "compareRunCharts": charts,
        "isAccordionReordered": True,
    }
    return state


def view_tag(name: str, state: dict[str, Any]) -> str:
    envelope = {"name": name, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
    return json.dumps({**envelope, **state})


def save_view(client: Any, experiment_id: str, key: str, name: str, state: dict) -> None:
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, view_tag(name, state))


def ensure_trials_view(client: Any, experiment: Any) -> None:
    """The experiment's own view of all its trials, written once."""
    if VIEW_TAG_PREFIX + TRIALS_VIEW not in (experiment.tags or {}):
        state = view_state(HEADLINE_METRICS)
        save_view(client, experiment.experiment_id, TRIALS_VIEW, "sweeper: all trials", state)


def knob_params(knobs: Sequence[str], params: Sequence[str]) -> list[str]:
    """The run params that show the knobs a sweep varies: a key as such (`batch_size`), a
    config group by its name (`engine=vllm`: `engine.name`); `+`/`~` prefixes dropped."""
    shown = []
    for knob in knobs:
        key = knob.lstrip("+~")
        for name in (key, f"{key}.name"):
            if name in params:
                shown.append(name)
                break
    return shown


def sweep_view(
    client: Any,
    experiment_id: str,
    parent_id: str,
    throughput: str,
    knobs: Sequence[str],
) -> str:
    """A view of one sweep's trials, the fastest first, the params it varies as columns;
    returns its key (the parent run's id: a resumed study keeps its view). Named in the
    Views menu by the parent run's start and name."""
    parent = client.get_run(parent_id).info
    start = datetime.datetime.fromtimestamp(parent.start_time / 1000)
    name = f"{start:%Y-%m-%d %H:%M} {parent.run_name}"[:80]
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1
    )
    params = list(children[0].data.params) if children else []
    metrics = [throughput] if throughput not in HEADLINE_METRICS else []
    state = view_state(
        [*metrics, *HEADLINE_METRICS],
        knob_params(knobs, params),
        search_filter=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=throughput,
    )
    save_view(client, experiment_id, parent_id, name, state)
    return parent_id
