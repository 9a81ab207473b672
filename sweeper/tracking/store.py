"""The MLflow store a sweep writes to, and one run per trial."""

from __future__ import annotations

import os
import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The sweep's parent run id, handed to trials (also in launcher subprocesses) through the env.
PARENT_RUN_ENV = "SWEEPER_PARENT_RUN_ID"


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def use_store(uri: str, artifact_location: str, experiment_name: str) -> str:
    """Point MLflow at `uri`, create the experiment if needed; returns its id."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location = artifact_location
        if "://" not in location:
            location = Path(location).resolve().as_uri()
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    """The commit of the sweeper checkout running this (or 'unknown' for a wheel install)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def trial_run(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run for one trial, child of the sweep's parent run when there is one.

    Ends FINISHED, or FAILED with the error recorded (tag `error`, artifact `error.txt`) when
    the body raises; KeyboardInterrupt ends it KILLED.
    """
    import mlflow

    parent = os.environ.get(PARENT_RUN_ENV)
    run = mlflow.start_run(run_name=run_name, parent_run_id=parent, tags=tags)
    try:
        mlflow.log_params(params)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except Exception as error:
        mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.log_text(traceback.format_exc(), "error.txt")
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
