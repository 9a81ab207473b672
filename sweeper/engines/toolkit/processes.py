"""Processes: who this one is, the processes an engine starts, and what kills them when their
owner dies without closing them.

- `ProcessIdentity`: host, boot time, PID namespace, PID and start time, so that a later process
  that reuses a PID is not taken for the one recorded. The Optuna sweeper tags a study's trials
  with their worker's, and a trial's MLflow run is tagged with its process's, so that a RUNNING
  trial or run whose process is gone can be told from one still running.
- The engine's processes (vLLM's engine core and workers, a server): found when the engine has
  started, waited for or killed when it closes, so their memory is free before the next engine
  loads.
- `guard_children`: a process whose descendants hold a model (vLLM's `VLLM::EngineCore` and
  `VLLM::Worker` take GBs, on a GPU its memory) must not leave them behind when it is killed
  (`kill -9`, the OOM killer), which no code of its own can handle. A guard process, started once
  per trial process and outside its process tree (so its memory is not the trial's), follows the
  owner's descendants and kills them, and any they started, as soon as the owner is gone. It
  works whatever starts them (fork or spawn, vLLM's multiprocessing or a server's Popen).
- `catch_interrupts`: SIGINT and SIGTERM, remembered where a library swallows them.
- `reap_orphans`: what the guard follows is recorded in a file per owner (in the temp dir, so a
  reboot clears it); when the guard died too, the next trial on the machine kills what such a
  file lists, once its owner and its guard are gone.

This module runs as the guard itself (`python -P processes.py guard ...`), so it imports nothing
of sweeper's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

# The guards' records: <owner pid>-<owner start time>.json, one per guarded process.
RECORDS = Path(tempfile.gettempdir()) / f"sweeper-processes-{os.getuid()}"
# How often the guard looks at the owner's descendants: a process started and orphaned within
# this interval is left to the next trial's `reap_orphans`.
GUARD_INTERVAL_S = 0.5


def _pid_namespace() -> str:
    # Two containers on one machine may share its hostname and boot time (host networking), but
    # not their PID namespace: a PID means something only inside its own.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _started(pid: int) -> float:
    return round(psutil.Process(pid).create_time(), 2)


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    boot: int  # boot time of the machine, seconds since the epoch
    pid_namespace: str
    pid: int
    started: float  # the process's start time: a later process may get the same PID

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, attr: Any) -> ProcessIdentity | None:
        try:
            return cls(**attr)
        except TypeError:  # not an identity (of this version)
            return None

    def shares_machine_with(self, other: ProcessIdentity) -> bool:
        return (self.host, self.boot, self.pid_namespace) == (
            other.host,
            other.boot,
            other.pid_namespace,
        )


_this: ProcessIdentity | None = None


def this_process() -> ProcessIdentity:
    global _this
    pid = os.getpid()
    if _this is None or _this.pid != pid:  # a forked child is another process
        _this = ProcessIdentity(
            socket.gethostname(), int(psutil.boot_time()), _pid_namespace(), pid, _started(pid)
        )
    return _this


def is_gone(identity: ProcessIdentity) -> bool:
    """True only when `identity` ran on this machine and that process no longer exists; a
    process elsewhere is never judged gone here."""
    if not identity.shares_machine_with(this_process()):
        return False
    try:
        return _started(identity.pid) != identity.started
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # it exists, under another user
        return False


# --- an engine's processes ----------------------------------------------------------------


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker: started with the first spawn, it lives on."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def child_pids() -> set[int]:
    return {process.pid for process in _children()}


def started_since(before: set[int]) -> list[psutil.Process]:
    """This process's descendants started since `before` was taken (`child_pids()`)."""
    return [p for p in _children() if p.pid not in before and not _is_resource_tracker(p)]


def wait_or_kill(processes: list[psutil.Process], timeout_s: float = 30) -> None:
    """Wait for `processes` to exit (after their owner was told to stop); kill what is left."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


# --- interrupts ---------------------------------------------------------------------------

_interrupted = False


def _interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, `timeout`, Slurm preemption) raise KeyboardInterrupt
    and are remembered: a library that swallows the KeyboardInterrupt (vLLM's start-up, in the
    ZMQ socket context it waits for its engine core in) cannot make the trial forget it."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def interrupted() -> bool:
    """Whether SIGINT or SIGTERM has reached this process (after `catch_interrupts`)."""
    return _interrupted


def raise_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


# --- the guard and the reaper ---------------------------------------------------------------


def _record_path(owner: ProcessIdentity) -> Path:
    return RECORDS / f"{owner.pid}-{owner.started}.json"


def _kill_all(processes: list[psutil.Process]) -> list[str]:
    """SIGKILL `processes` that still run (psutil checks each one's start time, so a reused PID
    is spared) and every descendant they have now; the names of those killed."""
    targets: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            if process.is_running():
                targets[process.pid] = process
                targets.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            continue
    killed = []
    for process in targets.values():
        try:
            name = process.name()
            process.kill()
            killed.append(f"{name} ({process.pid})")
        except psutil.Error:
            continue
    psutil.wait_procs(list(targets.values()), timeout=10)
    return killed


def _write_record(path: Path, owner: ProcessIdentity, known: dict[int, psutil.Process]) -> None:
    processes = []
    for process in known.values():
        try:
            processes.append({"pid": process.pid, "started": round(process.create_time(), 2)})
        except psutil.Error:
            continue
    record = {"owner": owner.as_dict(), "guard": this_process().as_dict(), "processes": processes}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)  # atomic: a reaper never reads half a record


def _owner_exited(pidfd: int | None, owner: psutil.Process, timeout_s: float) -> bool:
    if pidfd is not None:  # readable once the process has exited
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    time.sleep(timeout_s)
    return not owner.is_running()


def _guard(owner: ProcessIdentity) -> None:
    """Follow `owner`'s descendants until it is gone, then kill those still running."""
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):  # only the owner's end ends the guard
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    path = _record_path(owner)
    try:
        process = psutil.Process(owner.pid)
        if round(process.create_time(), 2) != owner.started:
            return
        pidfd = os.pidfd_open(owner.pid) if hasattr(os, "pidfd_open") else None
    except (psutil.Error, OSError):
        return
    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    while not _owner_exited(pidfd, process, GUARD_INTERVAL_S):
        try:
            tree = process.children(recursive=True)
        except psutil.Error:
            break
        # Kept until they exit, even when no longer the owner's descendants (an engine core's
        # worker outlives the engine core it came from).
        before = set(known)
        known.update({child.pid: child for child in tree if child.pid != me})
        known = {pid: p for pid, p in known.items() if p.is_running()}
        if set(known) != before:
            _write_record(path, owner, known)
    _kill_all(list(known.values()))
    path.unlink(missing_ok=True)


_guarded: int | None = None


def guard_children() -> None:
    """Start the guard of this process's descendants, once per process (see the module)."""
    global _guarded
    if _guarded == os.getpid():
        return
    RECORDS.mkdir(parents=True, exist_ok=True)
    owner = this_process()
    # -P: this file's folder must not shadow modules. The guard detaches itself (a double fork,
    # a session of its own), so it is neither in this process tree nor signalled with its group;
    # its standard streams are closed, so nobody waits on a pipe it holds.
    _guarded = os.getpid()
    try:
        subprocess.run(
            [sys.executable, "-P", __file__, "guard", json.dumps(owner.as_dict())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:  # the trial runs all the same
        print(f"sweeper: warning: engine processes are not guarded ({error})", file=sys.stderr)


def reap_orphans() -> list[str]:
    """Kill what a guard recorded for an owner that is gone when its guard is gone too (both
    killed, or the machine's OOM killer); the names of the processes killed."""
    killed: list[str] = []
    for path in RECORDS.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        owner = ProcessIdentity.from_dict(record.get("owner"))
        guard = ProcessIdentity.from_dict(record.get("guard"))
        if owner is None or not is_gone(owner) or (guard is not None and not is_gone(guard)):
            continue
        left = []
        for entry in record.get("processes", []):
            try:
                process = psutil.Process(entry["pid"])
                if round(process.create_time(), 2) == entry["started"]:
                    left.append(process)
            except (psutil.Error, KeyError, TypeError):
                continue
        killed += _kill_all(left)
        path.unlink(missing_ok=True)
    return killed


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    if os.fork() > 0:  # the first child returns at once; the grandchild is the guard
        os._exit(0)
    os.setsid()
    identity = ProcessIdentity.from_dict(json.loads(sys.argv[2]))
    if identity is not None:
        _guard(identity)
