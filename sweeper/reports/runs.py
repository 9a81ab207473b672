"""A sweep's trials as MLflow holds them: what the answer and the report are made from.

A sweep (grid or Optuna study) is one MLflow parent run; its trials are the child runs. Only
FINISHED trials count.
"""

from __future__ import annotations

from typing import Any

from sweeper.reports.recommend import Trial


class ReportError(ValueError):
    """A one-line message for the user."""


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


def _trial(run: Any, name: str) -> Trial:
    tags = run.data.tags
    metrics = dict(run.data.metrics)
    if "random_weights" in tags:  # the model is noise: ranking by its accuracy would mislead
        metrics = {k: v for k, v in metrics.items() if not k.startswith("accuracy")}
    return Trial(
        name=name,
        overrides=tags.get("hydra_overrides", "").split(),
        metrics=metrics,
        run_id=run.info.run_id,
        feasible=tags.get("optuna_feasible", "true") == "true",
    )


def load_trials(client: Any, experiment_id: str, parent_id: str | None) -> list[Trial]:
    """The finished trials of the sweep `parent_id`, in trial-number order. None: every finished
    trial of the experiment, of every sweep and single run, numbered in start order."""
    finished = "attributes.status = 'FINISHED'"
    where = f"tags.mlflow.parentRunId = '{parent_id}' and {finished}" if parent_id else finished
    runs = client.search_runs(
        [experiment_id],
        filter_string=where,
        order_by=["attributes.start_time ASC"],
        max_results=50_000,
    )
    # A trial's run carries its engine; a sweep's parent run and a rate sweep's steps (child
    # runs of a trial's run) do not.
    runs = [run for run in runs if "engine" in run.data.tags]
    if parent_id is None:
        return [_trial(run, str(number)) for number, run in enumerate(runs)]
    trials = [_trial(run, run.data.tags.get("hydra_job_num", "")) for run in runs]
    return sorted(trials, key=lambda t: int(t.name) if t.name.isdigit() else -1)
