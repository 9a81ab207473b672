"""A server started as a process group of its own, which dies with its owner (engine=openai
starting `vllm serve`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

# The supervisor between this process and a server: it leads a new session (so the server and
# everything it starts form one process group, killed as a whole, and a terminal's Ctrl-C reaches
# only sweeper, which stops the group itself), and it takes the group down when its owner dies,
# even by SIGKILL, which no code of the owner's can handle: the kernel sends it SIGUSR1 then
# (PR_SET_PDEATHSIG, Linux). PDEATHSIG on the server alone is not enough: vLLM's engine core and
# workers, its children, outlive a killed API server. It ignores SIGTERM, which reaches the whole
# group when the owner stops it, so that the server can shut down cleanly; once the server has
# exited, whatever it left in the group is killed, the supervisor with it. Plain Python (-S):
# started in milliseconds, and no preexec_fn, which is unsafe in a process with threads.
_SUPERVISOR = """
import ctypes, os, signal, subprocess, sys
owner, command = int(sys.argv[1]), sys.argv[2:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, lambda *_: os.killpg(0, signal.SIGKILL))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)  # 1: PR_SET_PDEATHSIG
if os.getppid() != owner:  # the owner died before the signal was armed
    os.killpg(0, signal.SIGKILL)
server = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
server.wait()
os.killpg(0, signal.SIGKILL)
"""


def start_group(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run `command` in a new session under a supervisor (above) that kills the whole group when
    this process dies; stdout and stderr go to `log`. PR_SET_PDEATHSIG fires when the thread that
    started it ends, so start it from a thread that lives as long as the process (sweeper builds
    engines on its main thread). Stop it with `stop_group`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-S", "-c", _SUPERVISOR, str(os.getpid()), *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def group_members(group: subprocess.Popen) -> list[psutil.Process]:
    """The processes of the group `start_group` started, supervisor included."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group.pid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return members


def stop_group(group: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the whole group, `timeout_s` for it to exit, then SIGKILL; waits for it."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, timeout_s)):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:  # nothing left in the group
            break
        try:
            group.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not group_members(group):
            break
    group.wait()
