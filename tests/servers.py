"""Real servers for scale-out tests, on 127.0.0.1 only: PostgreSQL and an MLflow server.

PostgreSQL comes from the system package (CI installs it); a throwaway cluster is created in a
temp dir and run as the `postgres` user (initdb refuses root). Both stop when the tests end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _missing(what: str) -> None:
    # In CI the server must be there (.ci/run installs it): fail loudly rather than skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed; .ci/run should install it")
    pytest.skip(f"{what} is not installed (apt-get install postgresql)")


def _as_postgres(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, check=True, capture_output=True, text=True, **kwargs)


@contextlib.contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """A running PostgreSQL; yields a URL template `postgresql://postgres@127.0.0.1:PORT/{db}`.
    With `password`, connections must authenticate (scram-sha-256) and the template holds it:
    `postgresql://postgres:PASSWORD@127.0.0.1:PORT/{db}`."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        _missing("PostgreSQL")
    # Directly under /tmp: the postgres user must be able to reach it (pytest's tmp is 0700).
    root = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
    data = root / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    auth = ["--auth=trust"]
    if password is not None:
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
    _as_postgres([initdb, "-D", str(data), "-U", "postgres", *auth, "-E", "UTF8"])
    if password is not None:
        (root / "pwfile").unlink()
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -k {root} -c max_connections=200"
    _as_postgres(
        [pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(root / "pg.log"), "start"]
    )
    try:
        user = "postgres" if password is None else f"postgres:{password}"
        yield f"postgresql://{user}@127.0.0.1:{port}/{{db}}"
    finally:
        _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def create_database(url_template: str, name: str) -> str:
    import psycopg

    with psycopg.connect(url_template.format(db="postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return url_template.format(db=name)


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, artifacts: Path, log: Path, admin_password: str | None = None
) -> Iterator[str]:
    """`mlflow server` on a free loopback port; yields its http URL once it answers. With
    `admin_password`, MLflow's basic-auth app: every API call needs user `admin` and it (its
    user store, an SQLite file, beside the log)."""
    port = free_port()
    env = dict(os.environ)
    app: list[str] = []
    if admin_password is not None:
        config = log.with_name("basic_auth.ini")
        config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{log.with_name('basic_auth.db')}\n"
            f"admin_username = admin\nadmin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        # The key its CSRF protection signs with, one for all its workers.
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()
        app = ["--app-name", "basic-auth"]
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        *app,
    ]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
