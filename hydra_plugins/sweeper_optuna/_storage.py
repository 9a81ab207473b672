"""Where a study lives (Optuna's RDB storage, with heartbeats) and the lock its workers share.

Workers on several GPUs or hosts run the same command against one database. What one worker
reads and then writes must not interleave with another's: creating the tables and the study,
opening the study's MLflow parent run, and counting the study's trials before asking for more
(so that `n_trials` is the study's total, not each worker's). `StudyLock` serialises these
short sections; the trials themselves run outside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from hydra_plugins.sweeper_optuna._errors import StudyError
from sweeper.tracking.credentials import redact, with_password

# One advisory lock for all studies of a database: the sections it guards last milliseconds,
# and one key also covers creating the tables, which every study of the database shares.
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sweeper-optuna").digest()[:8], "big", signed=True)
# Seconds to wait for a database server to answer before the sweep gives up on it.
CONNECT_TIMEOUT_S = 5


def display_url(url: str) -> str:
    """The storage URL without its password, for messages and MLflow tags."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return redact(url)


def _engine_kwargs(url: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a worker may idle for hours in a trial
    if url.startswith(("postgresql", "mysql")):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def _unreachable(url: str, error: Exception) -> StudyError:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    detail = redact(reason[0] if reason else str(error))
    return StudyError(f"cannot reach the study storage {display_url(url)}: {detail}")


def check_url(url: str) -> None:
    """A URL SQLAlchemy can open, with its database driver installed; one line otherwise."""
    try:
        sqlalchemy.make_url(url).get_dialect().import_dbapi()
    except sqlalchemy.exc.ArgumentError as error:  # unparsable, or an unknown dialect
        raise StudyError(
            f"invalid value for 'hydra.sweeper.storage': '{display_url(url)}' ({error}; "
            "allowed: a database URL, e.g. postgresql://user@host:5432/optuna)"
        ) from None
    except ImportError as error:
        raise StudyError(
            f"the study storage {display_url(url)} needs its database driver ({error}); "
            "install it with: pip install 'sweeper[cluster]'"
        ) from None


class StudyLock:
    """PostgreSQL: a session-level advisory lock, which the server releases when a killed
    worker's connection drops. SQLite: an flock on a file beside the database (workers on one
    machine). Other databases: no lock, so workers starting together may overshoot n_trials
    or open two MLflow parent runs (docs/cluster.md says to use PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: sqlalchemy.Engine | None = None
        self._file: Path | None = None
        if url.startswith("postgresql"):
            # A connection per section: nothing to keep alive while the trials run.
            self._engine = sqlalchemy.create_engine(
                with_password(url),
                poolclass=sqlalchemy.NullPool,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            )
        elif url.startswith("sqlite:///"):
            self._file = Path(sqlalchemy.make_url(url).database or "").with_suffix(".lock")

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._engine is not None:
            try:
                connection = self._engine.connect()
            except sqlalchemy.exc.OperationalError as error:
                raise _unreachable(self.url, error) from None
            with connection:
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_PG_LOCK_KEY})"))
                try:
                    yield
                finally:
                    connection.execute(
                        sqlalchemy.text(f"SELECT pg_advisory_unlock({_PG_LOCK_KEY})")
                    )
                    connection.commit()
        elif self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with self._file.open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or dies
                yield
        else:
            yield


def open_storage(
    url: str,
    heartbeat_interval: int,
    grace_period: int | None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None],
) -> RDBStorage:
    """Optuna's RDB storage with heartbeats on; `on_stale` gets each trial whose heartbeat
    stopped, once it is FAILed by `optuna.storages.fail_stale_trials`. Call it under the lock:
    the first worker creates the tables."""
    if url.startswith("sqlite:///"):
        Path(sqlalchemy.make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Heartbeats are an experimental argument of Optuna's, for years now.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                with_password(url),
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=on_stale,
            )
        except sqlalchemy.exc.OperationalError as error:
            raise _unreachable(url, error) from None
