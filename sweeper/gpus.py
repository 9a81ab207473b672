"""One GPU per launcher process: `hydra/launcher=gpus` runs n_jobs trials at a time on as many
GPUs of one machine (joblib processes, each with its own CUDA_VISIBLE_DEVICES).

A joblib (loky) process runs one trial after another and keeps its loaded model between them,
and CUDA reads CUDA_VISIBLE_DEVICES once per process. So a GPU belongs to a process, not to a
job: the first job in a process claims a free GPU (an flock on one file per GPU, which the
kernel releases when the process exits, however it exits) and sets CUDA_VISIBLE_DEVICES before
anything touches CUDA; the process's later jobs keep that GPU. Sweeps on one machine share the
lock files, so two sweeps never put trials on the same GPU.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


@dataclass
class _Claim:
    gpu: str
    handle: TextIO  # open for the life of the process: closing it frees the GPU


_claim: _Claim | None = None


class NoFreeGpu(RuntimeError):
    pass


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"sweeper-gpus-{os.getuid()}"


def visible_gpus() -> list[str]:
    """The sweep's GPUs: CUDA_VISIBLE_DEVICES when it is set, else every GPU NVML sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            return [str(index) for index in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:
        raise NoFreeGpu(
            f"hydra/launcher=gpus found no GPU (NVML: {error}); name them with "
            "hydra.callbacks.gpu_slot.gpus=[0,1]"
        ) from None


def claim_gpu(gpus: Sequence[str], lock_dir: Path, wait_s: float = 60.0) -> str:
    """This process's GPU: the one it claimed before, or the first free one of `gpus`. Waits up
    to `wait_s` for one to free up (a joblib process replacing one that is exiting)."""
    global _claim
    if _claim is not None:
        return _claim.gpu
    if not gpus:
        raise NoFreeGpu("hydra/launcher=gpus has no GPU to run on (CUDA_VISIBLE_DEVICES is empty)")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for gpu in gpus:
            handle = (lock_dir / f"gpu-{gpu}.lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claim = _Claim(gpu, handle)
            return gpu
        if time.monotonic() > deadline:
            raise NoFreeGpu(
                f"no free GPU among {', '.join(gpus)} after {wait_s:.0f} s (locks in "
                f"{lock_dir}): hydra.launcher.n_jobs must not exceed the GPUs, counting other "
                "sweeps on this machine"
            )
        time.sleep(0.5)


def _stop(message: str) -> NoReturn:
    # Hydra turns an exception in a callback into a warning and runs the job anyway, which here
    # would put it on a GPU another job holds; SystemExit gets through (from a joblib process
    # too: joblib raises it again in the sweep's process).
    print(f"sweeper: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class GpuSlotCallback(Callback):
    """`hydra.callbacks.gpu_slot` of hydra/launcher=gpus: checks n_jobs against the GPUs before
    the sweep, then claims each job process's GPU."""

    def __init__(
        self, gpus: Sequence[Any] | None = None, lock_dir: str | None = None, wait_s: float = 60.0
    ) -> None:
        self.gpus = [str(gpu) for gpu in gpus] if gpus else None
        self.lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
        self.wait_s = wait_s

    def _gpus(self) -> list[str]:
        try:
            return self.gpus or visible_gpus()
        except NoFreeGpu as error:
            _stop(str(error))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        gpus = self._gpus()
        n_jobs = config.hydra.launcher.n_jobs
        if not 1 <= n_jobs <= len(gpus):
            _stop(
                f"invalid value for 'hydra.launcher.n_jobs': {n_jobs} (allowed: 1 to "
                f"{len(gpus)}, one job per GPU of {', '.join(gpus)})"
            )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            gpu = claim_gpu(self._gpus(), self.lock_dir, self.wait_s)
        except NoFreeGpu as error:
            _stop(str(error))
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        print(f"[gpus] job {config.hydra.job.num} on GPU {gpu} (process {os.getpid()})", flush=True)
