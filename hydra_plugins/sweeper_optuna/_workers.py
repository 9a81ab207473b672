"""Which worker runs a trial, whether that worker is gone, and the heartbeats of its trials.

Several `python -m sweeper` processes (workers) may share one study. Each tags the trials it
asks with its identity, so that a worker on the same machine can tell at once that a RUNNING
trial's process has died (killed, out of memory, a crashed node restarted); a worker elsewhere
finds out through the trial's heartbeat going stale (Optuna's RDB storage, `grace_period`).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import psutil
from optuna.storages import RDBStorage

WORKER_ATTR = "worker"


def _pid_namespace() -> str:
    # Two containers on one machine may share its hostname and boot time (host networking), but
    # not their PID namespace: a PID means something only inside its own.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Worker:
    host: str
    boot: int  # boot time of the machine, seconds since the epoch
    pid_namespace: str
    pid: int
    started: float  # the process's start time: a later process may get the same PID

    def as_attr(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: Any) -> Worker | None:
        try:
            return cls(**attr)
        except TypeError:  # not a worker attr of this version
            return None

    def shares_machine_with(self, other: Worker) -> bool:
        return (self.host, self.boot, self.pid_namespace) == (
            other.host,
            other.boot,
            other.pid_namespace,
        )


def _process_started(pid: int) -> float:
    return round(psutil.Process(pid).create_time(), 2)


@cache
def this_worker() -> Worker:
    pid = os.getpid()
    return Worker(
        socket.gethostname(), int(psutil.boot_time()), _pid_namespace(), pid, _process_started(pid)
    )


def is_gone(worker: Worker) -> bool:
    """True only when `worker` ran on this machine and its process no longer exists; a worker
    elsewhere is never judged gone here (its heartbeat tells)."""
    if not worker.shares_machine_with(this_worker()):
        return False
    try:
        return _process_started(worker.pid) != worker.started
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # it exists, under another user
        return False


class Heartbeats:
    """Records a heartbeat for each trial this worker runs, every `interval` seconds, while the
    launcher runs them. Optuna does this itself only inside `study.optimize`, not for trials
    asked with `study.ask` as here."""

    def __init__(self, storage: RDBStorage, interval: int) -> None:
        self._storage = storage
        self._interval = interval
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_ids: Iterable[int]) -> None:
        """Beat for these trials from now on (a first beat at once: a trial without one is never
        found stale)."""
        ids = list(trial_ids)
        for trial_id in ids:
            self._storage.record_heartbeat(trial_id)
        with self._lock:
            self._trial_ids.update(ids)

    def remove(self, trial_ids: Iterable[int]) -> None:
        with self._lock:
            self._trial_ids.difference_update(trial_ids)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = sorted(self._trial_ids)
            for trial_id in ids:
                # A failed beat (the database restarting) must not end the thread: the next one
                # may get through before the grace period runs out.
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as error:  # noqa: BLE001
                    print(f"[study] heartbeat not recorded: {error}", flush=True)
