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
# The id of the sweep command that launched a trial (a tag on its run).
SWEEP_ID_ENV = "SWEEPER_SWEEP_ID"


def ui_command(uri: str) -> str:
    if _is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def unreachable_reason(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking store at `uri` cannot be reached (one line), or None when it answers.
    Checked before a sweep starts: MLflow's client would retry for minutes before failing."""
    if _is_server(uri):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
                if answer.status == 200:
                    return None
                reason = f"HTTP {answer.status}"
        except urllib.error.URLError as error:
            reason = str(getattr(error, "reason", error))
        except (OSError, ValueError) as error:  # a timeout, a malformed address
            reason = str(error)
        return f"cannot reach the MLflow tracking server {uri}: {reason}"
    if uri.startswith(("postgresql", "mysql")):  # MLflow's database backends, used directly
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            uri, poolclass=sqlalchemy.NullPool, connect_args={"connect_timeout": int(timeout_s)}
        )
        try:
            with engine.connect():
                return None
        except sqlalchemy.exc.OperationalError as error:
            lines = str(error.orig).strip().splitlines()
            url = sqlalchemy.make_url(uri).render_as_string(hide_password=True)
            return f"cannot reach the MLflow tracking store {url}: {lines[0] if lines else error}"
    return None  # a local file store: created on first use


def use_store(uri: str, artifact_location: str, experiment_name: str) -> str:
    """Point MLflow at `uri`, create the experiment if needed; returns its id.

    A tracking server (http) decides where artifacts go (its artifact root, which every worker
    reaches through it): a local `artifact_location` is not passed to it, a URL (s3://...) is.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location: str | None = artifact_location
        if "://" not in artifact_location:
            location = None if _is_server(uri) else Path(artifact_location).resolve().as_uri()
        try:
            experiment_id = mlflow.create_experiment(experiment_name, artifact_location=location)
        except MlflowException as error:
            # Workers starting together: another one created it first.
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise error from None
            experiment_id = experiment.experiment_id
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
    if os.environ.get(SWEEP_ID_ENV):
        tags = {**tags, "sweeper_sweep_id": os.environ[SWEEP_ID_ENV]}
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
