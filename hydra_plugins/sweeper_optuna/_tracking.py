"""The study in MLflow: its parent run (reopened on resume), trial <-> run links, the summary.

The parent run's id is kept in the study's user attrs, so a resumed study logs into the same
parent run and its finished trials are neither re-run nor duplicated. Each trial's run is found
by its `hydra_job_num` tag, which the sweeper makes equal to the Optuna trial number.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.sweeper_optuna._definition import Objective
from sweeper.reports.page import few_trials_caveat
from sweeper.tracking.credentials import redact
from sweeper.tracking.store import PARENT_RUN_ENV, ui_command, use_store

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto set of a multi-objective study; a
    configuration once, not again through the trials that repeated it (`duplicate_of`)."""
    if len(study.directions) > 1:
        # Optuna leaves infeasible trials out of the front.
        return [t for t in study.best_trials if "duplicate_of" not in t.user_attrs]
    if not any(is_feasible(t) for t in study.get_trials(deepcopy=False)):
        return []
    return [study.best_trial]  # the best of the feasible trials when there are constraints


class StudyTracking:
    def __init__(self, config: DictConfig) -> None:
        self.uri = str(config.tracking.uri)
        self.experiment_id = use_store(
            self.uri, config.tracking.artifact_location, config.experiment_name
        )
        self.client = MlflowClient()
        self.parent_id = ""

    def open_parent(self, study: optuna.Study, tags: dict[str, str]) -> str:
        """Reopen the study's parent run, or create it; trials nest under it (through the env)."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id and self._reusable(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(
                self.experiment_id, run_name=f"study: {study.study_name}"
            ).info.run_id
            study.set_user_attr(PARENT_ATTR, run_id)
            study.set_user_attr("mlflow_tracking_uri", redact(self.uri))
        for key, value in tags.items():
            self.client.set_tag(run_id, key, redact(value))
        os.environ[PARENT_RUN_ENV] = run_id
        self.parent_id = run_id
        return run_id

    def _reusable(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # another store, or deleted for good
            return False
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def trial_run(self, number: int) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.hydra_job_num = '{number}'"
            ),
            max_results=1,
        )
        return runs[0] if runs else None

    def link(
        self,
        study_name: str,
        number: int,
        state: str,
        feasible: bool | None,
        failure: str = "",
    ) -> str | None:
        """Tag the trial's run with its Optuna identity; returns the run id (None: no run). A
        trial Optuna FAILs for its metrics (`failure`: one it lacks, or NaN) although its run
        ended FINISHED is FAILED in MLflow too, with that reason as its error."""
        run = self.trial_run(number)
        if run is None:  # interrupted before its run started
            return None
        run_id = run.info.run_id
        self.client.set_tag(run_id, "optuna_study_name", study_name)
        self.client.set_tag(run_id, "optuna_trial_number", str(number))
        self.client.set_tag(run_id, "optuna_trial_state", state)
        if feasible is not None:
            self.client.set_tag(run_id, "optuna_feasible", str(feasible).lower())
        if run.info.status == "RUNNING":  # its process died before the run could end
            self.client.set_terminated(run_id, "KILLED")
        elif state == "FAIL" and failure and run.info.status == "FINISHED":
            self.client.set_tag(run_id, "error", f"Optuna FAILed the trial: {failure}"[:5000])
            self.client.set_terminated(run_id, "FAILED")
        return run_id

    def close_parent(self, status: str, error: str = "") -> None:
        if error:
            self.client.set_tag(self.parent_id, "error", error[:5000])
        self.client.set_terminated(self.parent_id, status)
        os.environ.pop(PARENT_RUN_ENV, None)

    def log_summary(
        self, study: optuna.Study, objectives: Sequence[Objective], storage: str
    ) -> list[FrozenTrial]:
        """Best trial (or Pareto set), history, importances and the trials table on the parent."""
        best = best_trials(study)
        trials = study.get_trials(deepcopy=False)
        summary: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": storage,
            "objectives": [str(o) for o in objectives],
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "feasible": sum(is_feasible(t) for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "best": [_trial_summary(t, objectives) for t in best],
        }
        name = "pareto_trials" if len(objectives) > 1 else "best_trial"
        self.client.set_tag(self.parent_id, name, ",".join(str(t.number) for t in best))
        if len(objectives) == 1 and best:
            self.client.log_metric(self.parent_id, f"best_{objectives[0].metric}", best[0].value)
        self.client.log_dict(self.parent_id, summary, "study/best_trials.json")
        self.client.log_text(self.parent_id, study_html(study, objectives), "study/summary.html")
        table = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs"))
        self.client.log_text(self.parent_id, table.to_csv(index=False), "study/trials.csv")
        return best

    def view_hint(self) -> str:
        return f"MLflow parent run {self.parent_id}; view: {redact(ui_command(self.uri))}"


def _trial_summary(trial: FrozenTrial, objectives: Sequence[Objective]) -> dict[str, Any]:
    return {
        "number": trial.number,
        "values": {o.metric: v for o, v in zip(objectives, trial.values, strict=True)},
        "params": trial.params,
        "constraints": trial.constraints,
        RUN_ATTR: trial.user_attrs.get(RUN_ATTR),
    }


def study_html(study: optuna.Study, objectives: Sequence[Objective]) -> str:
    """One self-contained page (plotly.js inlined: it opens offline and inside MLflow's UI)."""
    import plotly.offline
    from optuna import visualization as vis

    multi = len(objectives) > 1
    sections: list[tuple[str, Any]] = []
    for index, objective in enumerate(objectives):
        target = (lambda t, i=index: t.values[i]) if multi else None
        name = objective.metric
        sections.append(
            (
                f"Optimisation history: {name}",
                lambda t=target, n=name: vis.plot_optimization_history(
                    study, target=t, target_name=n
                ),
            )
        )
        sections.append(
            (
                f"Parameter importances for {name}",
                lambda t=target, n=name: vis.plot_param_importances(study, target=t, target_name=n),
            )
        )
    if 1 < len(objectives) <= 3:
        names = [o.metric for o in objectives]
        sections.append(("Pareto front", lambda: vis.plot_pareto_front(study, target_names=names)))
    parts = []
    for title, make in sections:
        try:
            body = make().to_html(full_html=False, include_plotlyjs=False)
        # Optuna refuses some plots for some studies (importances need two complete trials and a
        # parameter that varies); the page says so instead of failing the study.
        except Exception as error:  # noqa: BLE001
            body = f"<p>not available: {html.escape(str(error))}</p>"
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if caveat := few_trials_caveat(complete):
        parts.insert(0, f"<p><b>{html.escape(caveat)}</b></p>")
    title = html.escape(f"study {study.study_name}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<script>{plotly.offline.get_plotlyjs()}</script></head>"
        f"<body><h1>{title}</h1>\n" + "\n".join(parts) + "</body></html>"
    )
