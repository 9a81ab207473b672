"""Which worker runs a trial, whether that worker is gone, and the heartbeats of its trials.

Several `python -m sweeper` processes (workers) may share one study. Each tags the trials it
asks with its identity, so that a worker on the same machine can tell at once that a RUNNING
trial's process has died (killed, out of memory, a crashed node restarted); a worker elsewhere
finds out through the trial's heartbeat going stale (Optuna's RDB storage, `grace_period`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from optuna.storages import RDBStorage

# A worker is its process (host, boot, PID namespace, PID, start time), the identity sweeper's
# MLflow runs are tagged with too: one definition, in sweeper's processes toolkit.
from sweeper.engines.toolkit.processes import ProcessIdentity as Worker
from sweeper.engines.toolkit.processes import is_gone
from sweeper.engines.toolkit.processes import this_process as this_worker

__all__ = ["WORKER_ATTR", "Heartbeats", "Worker", "is_gone", "this_worker"]

WORKER_ATTR = "worker"


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
