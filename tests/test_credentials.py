"""No secret at rest: passwords in URLs never reach anything sweeper (or Hydra for it) writes or
prints, with real servers that ask for them: a PostgreSQL that authenticates every connection
(scram-sha-256), holding MLflow stores and an Optuna study, and an MLflow tracking server with
MLflow's basic-auth app."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest

from sweeper.tracking import credentials
from sweeper.tracking.credentials import redact, take_passwords, with_password
from sweeper.tracking.store import unreachable_reason
from tests.conftest import run_cli
from tests.servers import _pg_bin, create_database, free_port, mlflow_server, postgres_server

PG_PASSWORD = "pg-Secret-7a41e"
MLFLOW_PASSWORD = "ml-Secret-c93e0"
SECRETS = (PG_PASSWORD, MLFLOW_PASSWORD)
FAST = ["dataset.limit=4", "max_new_tokens=4", "tracking.log_predictions=false"]


@dataclass(frozen=True)
class Servers:
    pg_template: str  # postgresql://postgres:PG_PASSWORD@127.0.0.1:PORT/{db}
    tracking: str  # the MLflow server, http://127.0.0.1:PORT (basic auth: admin)
    artifacts: Path  # its artifact root
    databases: tuple[str, ...]

    def with_login(self) -> str:
        return self.tracking.replace("http://", f"http://admin:{MLFLOW_PASSWORD}@")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("servers")
    databases = ("mlflow_server", "mlflow_direct", "optuna")
    with postgres_server(PG_PASSWORD) as template:
        for name in databases:
            create_database(template, name)
        backend = template.format(db="mlflow_server")
        with mlflow_server(
            backend, root / "artifacts", root / "mlflow.log", admin_password=MLFLOW_PASSWORD
        ) as url:
            yield Servers(template, url, root / "artifacts", databases)


@pytest.fixture
def no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        credentials.PASSWORDS_ENV,
        credentials.HTTP_USER_ENV,
        credentials.HTTP_PASSWORD_ENV,
        "PGPASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)


def test_passwords_leave_the_command_line_for_the_environment(no_credentials_in_env) -> None:
    args = take_passwords(
        [
            "-m",
            "tracking.uri=postgresql://alice:p%40ss@db:5432/mlflow",
            "hydra.sweeper.storage='postgresql+psycopg://bob:two@db2/optuna'",
            "batch_size=1,2",
        ]
    )
    assert args == [
        "-m",
        "tracking.uri=postgresql://alice@db:5432/mlflow",
        "hydra.sweeper.storage='postgresql+psycopg://bob@db2/optuna'",
        "batch_size=1,2",
    ]
    # Put back only into the URL a connection is opened with, matched by user, host and port.
    assert with_password("postgresql://alice@db:5432/mlflow") == (
        "postgresql://alice:p%40ss@db:5432/mlflow"
    )
    assert with_password("postgresql+psycopg://bob@db2/optuna").startswith(
        "postgresql+psycopg://bob:two@db2/"
    )
    assert with_password("postgresql://carol@db:5432/mlflow") == "postgresql://carol@db:5432/mlflow"
    # An http server's login goes to MLflow's own variables; the URL keeps no user info.
    assert take_passwords(["tracking.uri=http://admin:pw@host:5000"]) == [
        "tracking.uri=http://host:5000"
    ]
    assert os.environ[credentials.HTTP_USER_ENV] == "admin"
    assert os.environ[credentials.HTTP_PASSWORD_ENV] == "pw"


def test_redact_masks_every_url_password() -> None:
    text = "cannot reach postgresql://alice:S3cr@t@db:5432/x, http://u:pw@h:1/ and 'mysql://:x@h'"
    assert redact(text) == (
        "cannot reach postgresql://alice:***@db:5432/x, http://u:***@h:1/ and 'mysql://:***@h'"
    )
    assert redact("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
    # As Hydra escapes an override in .hydra/overrides.yaml and the overrides sweeper tags with.
    escaped = r"- tracking.uri=postgresql\://alice\:S3cr@t@db\:5432/x"
    assert redact(escaped) == r"- tracking.uri=postgresql\://alice\:***@db\:5432/x"


def _files(root: Path) -> Iterator[Path]:
    return (path for path in root.rglob("*") if path.is_file())


def _dump(servers: Servers, database: str) -> str:
    """Everything the database holds, as SQL text."""
    port = servers.pg_template.rsplit(":", 1)[1].split("/")[0]
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
    command = [_pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", database]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_no_password_is_written_or_printed(tmp_path: Path, servers: Servers) -> None:
    """A grid into a PostgreSQL MLflow store, an Optuna study on PostgreSQL logging to the
    tracking server, a single trial on the server, and a study whose database is down, all
    with passwords in their URLs: then every file under their folders, the server's artifact
    root, each database's dump and every line printed are searched for the passwords."""
    direct = servers.pg_template.format(db="mlflow_direct")
    closed = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{free_port()}/optuna"
    commands = {
        "grid": (
            ["-m", "batch_size=1,2", f"tracking.uri={direct}", "experiment_name=grid"]
            + [f"hydra.sweep.dir={tmp_path / 'grid'}"],
            0,
        ),
        "study": (
            ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "batch_size=1,2"]
            + ["hydra.sweeper.objectives=[tps:max]", "experiment_name=study"]
            + [f"hydra.sweeper.storage={servers.pg_template.format(db='optuna')}"]
            + [f"tracking.uri={servers.with_login()}", f"hydra.sweep.dir={tmp_path / 'study'}"],
            0,
        ),
        "single": (
            [f"tracking.uri={servers.with_login()}", "experiment_name=single"]
            + [f"hydra.run.dir={tmp_path / 'single'}"],
            0,
        ),
        "database down": (
            ["-m", "hydra/sweeper=optuna", "batch_size=1,2", f"hydra.sweeper.storage={closed}"]
            + [f"tracking.uri={servers.with_login()}", f"hydra.sweep.dir={tmp_path / 'down'}"],
            2,
        ),
    }
    printed = []
    for name, (args, status) in commands.items():
        result = run_cli([*args, *FAST], cwd=tmp_path, timeout=600)
        assert result.returncode == status, (name, result.stderr[-3000:])
        printed.append(result.stdout + result.stderr)
    assert "cannot reach the study storage postgresql://postgres@127.0.0.1:" in printed[-1]

    # Something was written: the runs, the study, Hydra's files (so the search is not vacuous).
    mlflow.set_tracking_uri(direct)
    grid = mlflow.search_runs(experiment_names=["grid"], output_format="list")
    assert sorted(r.info.status for r in grid) == ["FINISHED"] * 3  # the parent and 2 trials
    stripped = direct.replace(f":{PG_PASSWORD}", "")
    assert {r.data.params.get("tracking.uri") for r in grid} >= {stripped}
    study = optuna.load_study(study_name=None, storage=servers.pg_template.format(db="optuna"))
    assert len(study.trials) == 2 and study.user_attrs["mlflow_tracking_uri"] == servers.tracking
    assert (tmp_path / "study" / "multirun.yaml").exists()
    assert (tmp_path / "down" / "multirun.yaml").exists()  # written before the database check
    assert (tmp_path / "grid" / "0" / ".hydra" / "hydra.yaml").exists()
    assert (tmp_path / "single" / ".hydra" / "overrides.yaml").exists()
    assert list(servers.artifacts.rglob("config.yaml"))

    written = {str(path): path.read_bytes() for path in _files(tmp_path)}
    written |= {str(path): path.read_bytes() for path in _files(servers.artifacts)}
    written |= {f"database {db}": _dump(servers, db).encode() for db in servers.databases}
    outputs = zip(commands, printed, strict=True)
    written |= {f"output of {name}": text.encode() for name, text in outputs}
    for secret in SECRETS:
        found = [where for where, content in written.items() if secret.encode() in content]
        assert not found, f"{secret} in {found}"


def test_a_tracking_server_login_is_checked_before_the_sweep(
    tmp_path: Path, servers: Servers, monkeypatch: pytest.MonkeyPatch, no_credentials_in_env
) -> None:
    # user:password@ in the URL works as MLflow's client takes it (it was refused as a DNS error).
    monkeypatch.setenv(credentials.HTTP_USER_ENV, "admin")
    monkeypatch.setenv(credentials.HTTP_PASSWORD_ENV, MLFLOW_PASSWORD)
    assert unreachable_reason(servers.tracking) is None
    monkeypatch.setenv(credentials.HTTP_PASSWORD_ENV, "wrong")
    reason = unreachable_reason(servers.tracking) or ""
    assert "refused the credentials (HTTP 401)" in reason and "wrong" not in reason

    uri = servers.tracking.replace("http://", "http://admin:wrong-Pw@")
    result = run_cli([f"tracking.uri={uri}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"sweeper: error: the MLflow tracking server {servers.tracking} refused the credentials "
        "(HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


def test_database_passwords_from_the_environment(
    servers: Servers, monkeypatch: pytest.MonkeyPatch, no_credentials_in_env
) -> None:
    """What docs/cluster.md recommends: no password in the URL, libpq's PGPASSWORD instead."""
    url = servers.pg_template.format(db="mlflow_direct").replace(f":{PG_PASSWORD}", "")
    reason = unreachable_reason(url) or ""
    assert reason.startswith(f"cannot reach the MLflow tracking store {url}: ")
    assert "password" in reason and "\n" not in reason
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    assert unreachable_reason(url) is None
