"""The MLflow store a sweep writes to, and one run per trial."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sweeper.tracking.views import TRIALS_VIEW, VIEW_URL_PARAM, ensure_trials_view

# The sweep's parent run id, handed to trials (also in launcher subprocesses) through the env.
PARENT_RUN_ENV = "SWEEPER_PARENT_RUN_ID"
# The id of the sweep command that launched a trial (a tag on its run).
SWEEP_ID_ENV = "SWEEPER_SWEEP_ID"
# The process a run belongs to (sweeper.engines.toolkit.processes.ProcessIdentity, as JSON).
PROCESS_TAG = "sweeper_process"


# The keys a sweep varies, handed to its trials (their run names show only these); how many
# trials it runs and when it started (their progress says "trial 3/8 · sweep ETA").
VARIED_ENV = "SWEEPER_VARIED_KEYS"
SWEEP_SIZE_ENV = "SWEEPER_SWEEP_SIZE"
SWEEP_START_ENV = "SWEEPER_SWEEP_START"
UI_PORT = 5000
# A sweep's report, among its parent run's artifacts (sweeper/reports/page.py writes it).
REPORT_PAGE = "report/report.html"


def runs_page(server: str, experiment_id: str, view: str | None = None) -> str:
    """The MLflow page that lists the experiment's runs (MLflow 3 opens an experiment on its
    GenAI overview otherwise: "Traces 0", which reads as nothing logged), through the saved
    `view` that shows the six metrics as columns (sweeper/tracking/views.py)."""
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{page}&{VIEW_URL_PARAM}={view}" if view else page


def artifact_page(server: str, experiment_id: str, run_id: str, path: str) -> str:
    """The MLflow page that shows one artifact of a run (HTML rendered, images drawn)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"


def ui_server(uri: str) -> str:
    """Where the MLflow UI of the store `uri` answers: the server itself, or `mlflow ui`."""
    return uri if _is_server(uri) else f"http://127.0.0.1:{UI_PORT}"


def ui_command(uri: str) -> str:
    """How to look at the store: the server itself, or `mlflow ui` on an absolute path."""
    if _is_server(uri):
        return f"open {uri} in a browser"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return f"mlflow ui --backend-store-uri {uri} --port {UI_PORT}"


def view_lines(
    uri: str, experiment_id: str, view: str = TRIALS_VIEW, report: str | None = None
) -> list[str]:
    """What to run and open to see a run's experiment: one click for a server. `view`: the
    saved view to open the runs page with (default: all trials, the six metrics as columns);
    `report`: the run whose report/report.html to link."""
    server = ui_server(uri)
    pages = [runs_page(server, experiment_id, view)]
    if report:
        pages.append(f"report: {artifact_page(server, experiment_id, report, REPORT_PAGE)}")
    if _is_server(uri):
        return [f"open: {pages[0]}", *(f"  {page}" for page in pages[1:])]
    return [
        f"view: {ui_command(uri)}",
        f"  then open: {pages[0]}",
        *(f"  {page}" for page in pages[1:]),
    ]


def sweep_size(config: Any) -> int | None:
    """The trials a sweep runs: a study's n_trials, a grid's combinations."""
    if "n_trials" in config.hydra.sweeper:
        return int(config.hydra.sweeper.n_trials)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    batches = BasicSweeper.split_arguments(parsed, None)
    return len(batches[0]) if batches else None


def varied_keys(config: Any) -> list[str]:
    """The keys a sweep's command varies: its sweep overrides (a,b; ranges; intervals) and an
    Optuna study's search space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return sorted({*keys, *params})


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _http_get(url: str, timeout_s: float) -> int:
    """The HTTP status of GET `url`, sent with the tracking server's basic auth when it is set
    (an error status is returned, not raised)."""
    import base64
    import urllib.error
    import urllib.request

    from sweeper.tracking.credentials import http_auth

    request = urllib.request.Request(url)
    if (auth := http_auth()) is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def unreachable_reason(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking store at `uri` cannot be reached (one line), or None when it answers.
    Checked before a sweep starts: MLflow's client would retry for minutes before failing."""
    from sweeper.tracking.credentials import redact, with_password

    if _is_server(uri):
        import urllib.error

        base = uri.rstrip("/")
        try:
            status = _http_get(f"{base}/health", timeout_s)
            if status == 200:
                # /health answers anyone; an API call tells whether the credentials (if the
                # server asks for any) are accepted.
                api = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
                status = _http_get(api, timeout_s)
                if status not in (401, 403):
                    return None
                return (
                    f"the MLflow tracking server {redact(uri)} refused the credentials (HTTP "
                    f"{status}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                )
            reason = f"HTTP {status}"
        except urllib.error.URLError as error:
            reason = str(getattr(error, "reason", error))
        except (OSError, ValueError) as error:  # a timeout, a malformed address
            reason = str(error)
        return f"cannot reach the MLflow tracking server {redact(uri)}: {redact(reason)}"
    if uri.startswith(("postgresql", "mysql")):  # MLflow's database backends, used directly
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            with_password(uri),
            poolclass=sqlalchemy.NullPool,
            connect_args={"connect_timeout": int(timeout_s)},
        )
        try:
            with engine.connect():
                return None
        except sqlalchemy.exc.OperationalError as error:
            lines = str(error.orig).strip().splitlines()
            url = sqlalchemy.make_url(uri).render_as_string(hide_password=True)
            detail = redact(lines[0] if lines else str(error))
            return f"cannot reach the MLflow tracking store {url}: {detail}"
    return None  # a local file store: created on first use


class StoreError(Exception):
    """The MLflow store cannot be used (read-only, full, refusing); the message is one line."""


# Less free space than this where a local store writes is a full store: a trial writes its
# metrics, config and predictions table (MBs for thousands of questions).
MIN_FREE_BYTES = 1024**2


def _local_path(location: str) -> Path | None:
    """The local file or folder a store location writes to (None: a server, a remote URL)."""
    if location.startswith("sqlite:///"):
        return Path(location.removeprefix("sqlite:///")).expanduser()
    if location.startswith("file://"):
        return Path(location.removeprefix("file://")).expanduser()
    return None if "://" in location else Path(location).expanduser()


def _write_problem(path: Path) -> str | None:
    """Why nothing can be written at `path` or the folder it would be made in, or None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    folder = existing if existing.is_dir() else existing.parent
    for target in dict.fromkeys((existing, folder)):  # a database file, and its journal's folder
        if not os.access(target, os.W_OK):
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                return f"{target} is on a read-only file system"
            return f"{target} is not writable by this user"
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        return f"{folder} is on a full disk ({free // 1024} KiB free)"
    return None


def store_problem(uri: str, artifact_location: str) -> str | None:
    """Why a local MLflow store (its database file, its artifact folder) cannot take a trial's
    records, as a one-line bad-input message, or None; checked before a sweep starts."""
    from sweeper.tracking.credentials import redact

    places = [("tracking.uri", uri, _local_path(uri))]
    if not _is_server(uri):  # a server keeps the artifacts itself
        places.append(
            ("tracking.artifact_location", artifact_location, _local_path(artifact_location))
        )
    for key, value, path in places:
        if path is not None and (problem := _write_problem(path)):
            return (
                f"invalid value for '{key}': '{redact(value)}' (allowed: a store sweeper can "
                f"write to; {problem})"
            )
    return None


def _first_line(error: BaseException) -> str:
    from sweeper.tracking.credentials import redact

    lines = str(error).strip().splitlines()
    return redact(f"{type(error).__name__}: {lines[0] if lines else ''}")


def use_store(uri: str, artifact_location: str, experiment_name: str) -> str:
    """Point MLflow at `uri`, create the experiment if needed, and end its runs whose process
    died (`end_abandoned_runs`); returns its id. A store that refuses is one line (StoreError).

    A tracking server (http) decides where artifacts go (its artifact root, which every worker
    reaches through it): a local `artifact_location` is not passed to it, a URL (s3://...) is.
    """
    from sweeper.tracking.credentials import redact

    try:
        experiment_id = _open_experiment(uri, artifact_location, experiment_name)
        end_abandoned_runs(experiment_id)
    except StoreError:
        raise
    except Exception as error:  # MLflow's, SQLAlchemy's, the file system's: one line each
        detail = _first_line(error)
        raise StoreError(f"cannot use the MLflow store {redact(uri)}: {detail}") from None
    return experiment_id


def _open_experiment(uri: str, artifact_location: str, experiment_name: str) -> str:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sweeper.tracking.credentials import with_password

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(with_password(uri))
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
    # The saved view the printed links open; a store that refuses experiment tags (a user who
    # may log runs but not edit the experiment) still takes the trials.
    with contextlib.suppress(MlflowException):
        ensure_trials_view(MlflowClient(), experiment or mlflow.get_experiment(experiment_id))
    return experiment_id


def process_tags() -> dict[str, str]:
    """Tags naming the process a run belongs to (host, PID, start time), so that a run left
    RUNNING by a killed process can be told from one still running."""
    from sweeper.engines.toolkit.processes import this_process

    return {PROCESS_TAG: json.dumps(this_process().as_dict())}


def end_abandoned_runs(experiment_id: str) -> list[str]:
    """End KILLED the experiment's RUNNING runs whose process (their `sweeper_process` tag) ran
    on this machine and is gone (`kill -9`, out of memory, a crash); the ids of those ended. A
    run of another machine is left to a sweeper there. Optuna studies' parent runs carry no such
    tag: a study reopens its own (hydra_plugins/sweeper_optuna/_tracking.py)."""
    from mlflow import MlflowClient

    from sweeper.engines.toolkit.processes import ProcessIdentity, is_gone

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    ended = []
    for run in running:
        try:
            owner = ProcessIdentity.from_dict(json.loads(run.data.tags.get(PROCESS_TAG, "")))
        except ValueError:
            continue
        if owner is None or not is_gone(owner):
            continue
        note = (
            f"its process (pid {owner.pid} on {owner.host}) was gone when sweeper next opened "
            "the experiment: killed, out of memory or crashed"
        )
        client.set_tag(run.info.run_id, "killed", note)
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


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


def _redacted(values: dict[str, Any]) -> dict[str, Any]:
    from sweeper.tracking.credentials import redact

    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


def _record_failure(error: BaseException) -> None:
    """The error on the active run, as far as the store takes it (a full disk may not)."""
    import mlflow

    from sweeper.tracking.credentials import redact

    with contextlib.suppress(Exception):  # the trial's own error is the one to report
        mlflow.set_tag("error", redact(f"{type(error).__name__}: {error}")[:5000])
        mlflow.log_text(redact(traceback.format_exc()), "error.txt")


def _end(status: str) -> None:
    import mlflow

    # MLflow forgets the active run before it records the status: a store that refuses leaves
    # it RUNNING, and the next sweeper to open the experiment ends it KILLED.
    with contextlib.suppress(Exception):
        mlflow.end_run(status)


@contextmanager
def trial_run(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run for one trial, child of the sweep's parent run when there is one; its
    params, and its dataset (the `dataset.*` params) as the run's input.

    Ends FINISHED, or FAILED with the error recorded (tag `error`, artifact `error.txt`) when
    the body raises; KeyboardInterrupt (or SIGINT/SIGTERM that a library swallowed) ends it
    KILLED and is raised. Names, params and tags are written with any URL password masked.
    """
    import mlflow

    from sweeper.engines.toolkit.processes import interrupted
    from sweeper.tracking.credentials import redact
    from sweeper.tracking.log import log_dataset

    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {**tags, **process_tags()}
    if os.environ.get(SWEEP_ID_ENV):
        tags["sweeper_sweep_id"] = os.environ[SWEEP_ID_ENV]
    run = mlflow.start_run(run_name=redact(run_name), parent_run_id=parent, tags=_redacted(tags))
    try:
        mlflow.log_params(_redacted(params))
        log_dataset(_redacted(params))
        yield run
    except KeyboardInterrupt:
        _end("KILLED")
        raise
    except Exception as error:
        if interrupted():  # what a swallowed interrupt left behind
            _end("KILLED")
            raise KeyboardInterrupt from error
        _record_failure(error)
        _end("FAILED")
        raise
    else:
        if interrupted():
            _end("KILLED")
            raise KeyboardInterrupt
        mlflow.end_run("FINISHED")
