"""The processes an engine starts (vLLM's engine core and workers, a server): found when the
engine has started, waited for or killed when it closes, so their memory is free before the next
engine loads."""

from __future__ import annotations

import psutil


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
