"""Hydra callback: a sweep is one MLflow parent run, its trials nested child runs.

The parent run id reaches the trials through an environment variable, so trials that a launcher
runs in other processes nest under it too. At the end, a table of trials x six metrics, read back
from MLflow (so it covers every launcher), and the count of failed trials for the exit status.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from sweeper.tracking.credentials import redact
from sweeper.tracking.store import (
    PARENT_RUN_ENV,
    SWEEP_ID_ENV,
    SWEEP_SIZE_ENV,
    SWEEP_START_ENV,
    VARIED_ENV,
    process_tags,
    sweep_size,
    use_store,
    varied_keys,
    view_lines,
)

failed_in_last_sweep = 0
# The Optuna sweeper opens the parent run itself: a study's parent run is reopened when the study
# resumes (see hydra_plugins/sweeper_optuna/_tracking.py).
_STUDY_SWEEPER = "hydra_plugins.sweeper_optuna."


def interrupt_sweep() -> None:
    """After Ctrl-C: end the open sweep's parent run KILLED (its finished trials stay logged)."""
    parent = os.environ.pop(PARENT_RUN_ENV, None)
    if parent:
        from mlflow import MlflowClient

        MlflowClient().set_terminated(parent, "KILLED")


def _child_rows(client: Any, experiment_id: str, parent_id: str) -> list[dict[str, Any]]:
    from sweeper.metrics import HEADLINE_METRICS
    from sweeper.metrics.stats import CI_SUFFIX

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10_000,
    )
    rows = []
    for run in runs:
        row = {
            "trial": run.data.tags.get("hydra_job_num", ""),
            "status": run.info.status,
            "overrides": run.data.tags.get("hydra_overrides", ""),
            "sweep_id": run.data.tags.get("sweeper_sweep_id", ""),
        }
        row.update(
            {
                name: run.data.metrics.get(name)
                for metric in HEADLINE_METRICS
                for name in (metric, metric + CI_SUFFIX)
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda r: int(r["trial"]) if str(r["trial"]).isdigit() else 0)


def _answer(client: Any, experiment_id: str, parent_id: str, config: DictConfig) -> Any:
    """The sweep's finished trials, ranked by `select` (sweeper/reports/recommend.py)."""
    from sweeper.reports.recommend import recommend
    from sweeper.reports.runs import load_trials

    trials = load_trials(client, experiment_id, parent_id)
    budget = config.get("budget_gb")
    return recommend(trials, str(config.get("select", "throughput_within_accuracy")), budget)


def _record_answer(client: Any, parent_id: str, answer: Any, lines: list[str]) -> None:
    """The answer on the sweep's parent run: the chosen trial's metrics (`best_*`), its command,
    the ranked table as an artifact, and a description that says it all."""
    from sweeper.reports.tables import answer_markdown

    chosen = answer.chosen
    text = answer_markdown(answer, lines)
    client.set_tag(parent_id, "mlflow.note.content", text)
    client.log_text(parent_id, text, "answer.md")
    client.set_tag(parent_id, "selection_rule", answer.rule)
    if chosen is not None:
        client.set_tag(parent_id, "recommended_trial", chosen.name)
        client.set_tag(parent_id, "recommended_setting", chosen.label)
        client.set_tag(parent_id, "recommended_command", chosen.command)
        for name, value in chosen.metrics.items():
            if math.isfinite(value):
                client.log_metric(parent_id, f"best_{name}", value)


def _report(
    client: Any, experiment_id: str, parent_id: str, answer: Any, config: DictConfig
) -> list[str]:
    """The sweep's saved view in MLflow (its trials, the six metrics as columns) and its report
    (HTML, PNG, CSV) in the sweep's folder and on the parent run; the lines that say where to
    see them. Neither is the answer, which is printed already: a failure here is one line, and
    the sweep's status stays what its trials made it."""
    from sweeper.reports.page import describe, make_report
    from sweeper.tracking.store import runs_page, ui_server
    from sweeper.tracking.views import sweep_view

    uri = str(config.tracking.uri)
    pages = view_lines(uri, experiment_id)
    try:
        knobs = varied_keys(config) or sorted({k for t in answer.ranked for k in t.knobs})
        view = sweep_view(client, experiment_id, parent_id, answer.throughput, knobs)
        pages = view_lines(uri, experiment_id, view)
        context = describe(client, parent_id, str(config.experiment_name), answer)
        context.runs_url = redact(runs_page(ui_server(uri), experiment_id, view))
        files = make_report(client, parent_id, answer, context, Path(config.hydra.sweep.dir))
        pages = view_lines(uri, experiment_id, view, report=parent_id)
        print(f"report: {files[0]} (and on the parent run, report/)")
    except Exception as error:  # noqa: BLE001 - see above
        lines = str(error).strip().splitlines()
        detail = redact(f"{type(error).__name__}: {lines[0] if lines else ''}")
        print(f"sweeper: the sweep's report was not written: {detail}", file=sys.stderr)
    return pages


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.sweep_id = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow import MlflowClient

        # Marks the trials this command launches (also in launcher subprocesses), so its exit
        # status counts only its own failures, not those of other workers of a shared study.
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        os.environ[VARIED_ENV] = ",".join(varied_keys(config))
        os.environ[SWEEP_START_ENV] = str(time.time())
        if size := sweep_size(config):
            os.environ[SWEEP_SIZE_ENV] = str(size)
        if str(config.hydra.sweeper.get("_target_", "")).startswith(_STUDY_SWEEPER):
            return
        self.experiment_id = use_store(
            config.tracking.uri, config.tracking.artifact_location, config.experiment_name
        )
        overrides = redact(" ".join(config.hydra.overrides.task))
        tags = {"sweep_dir": str(config.hydra.sweep.dir), "hydra_overrides": overrides}
        run = MlflowClient().create_run(
            self.experiment_id, run_name=f"sweep: {overrides}", tags={**tags, **process_tags()}
        )
        self.parent_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global failed_in_last_sweep
        from mlflow import MlflowClient

        from sweeper.reports.tables import answer_lines, answer_metrics, answer_table, show

        self.parent_id = self.parent_id or os.environ.get(PARENT_RUN_ENV)
        if self.parent_id is None:
            return
        if self.experiment_id is None:  # a study's: the sweeper opened the store
            self.experiment_id = use_store(
                config.tracking.uri, config.tracking.artifact_location, config.experiment_name
            )
        client = MlflowClient()
        rows = _child_rows(client, self.experiment_id, self.parent_id)
        # A study's parent run also holds earlier runs' and other workers' trials: count ours.
        failed_in_last_sweep = sum(
            1 for row in rows if row["status"] != "FINISHED" and row["sweep_id"] == self.sweep_id
        )
        client.set_tag(self.parent_id, "trials", str(len(rows)))
        client.set_tag(self.parent_id, "failed_trials", str(failed_in_last_sweep))
        answer = _answer(client, self.experiment_id, self.parent_id, config)
        os.environ.pop(PARENT_RUN_ENV, None)
        for name in (VARIED_ENV, SWEEP_SIZE_ENV, SWEEP_START_ENV):
            os.environ.pop(name, None)
        failed = [row for row in rows if row["status"] != "FINISHED"]
        print(f"sweep: {len(rows)} trials, {len(failed)} failed")
        show(answer_table(answer, answer_metrics(answer)))
        for row in failed:
            print(f"  trial {row['trial']} {row['status']}: {row['overrides']}")
        lines = answer_lines(answer)
        print("\n".join(lines))
        _record_answer(client, self.parent_id, answer, lines)
        pages = _report(client, self.experiment_id, self.parent_id, answer, config)
        client.set_terminated(self.parent_id, "FINISHED")
        print(f"MLflow parent run {self.parent_id} in {redact(str(config.tracking.uri))}")
        for line in pages:
            print(f"  {redact(line)}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has just written the job's .hydra/*.yaml (and, in a sweep, multirun.yaml): a
        # password that reached the config some other way than the command line (whose URLs
        # sweeper/tracking/credentials.py strips first) is masked there.
        hydra = config.hydra
        files = []
        if hydra.output_subdir is not None:
            files += (Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml")
        if hydra.mode == RunMode.MULTIRUN:
            files.append(Path(hydra.sweep.dir) / "multirun.yaml")
        for path in files:
            with contextlib.suppress(OSError):
                text = path.read_text()
                if (masked := redact(text)) != text:
                    path.write_text(masked)
