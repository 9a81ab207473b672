"""Peak memory of a trial, sampled by a background thread.

`peak_mem_gb` holds, by what the machine offers (the `peak_mem_source` tag says which):
- `nvml_process`: on a GPU, the peak of the GPU memory NVML reports for this process and its
  children (vLLM runs its engine in child processes);
- `nvml_device_delta`: in containers NVML reports host PIDs, so no process matches; then the
  peak rise of the device's used memory over its pre-trial baseline;
- `pss_process_tree`: on CPU, the peak proportional set size (PSS) of this process and its
  children: each page counted once, however many of them map it (vLLM's frontend, engine core and
  worker share libraries and tensors: their RSS summed counted those pages up to three times,
  31% over PSS on the tiny model). Linux's /proc/PID/smaps_rollup; where it is missing, the
  resident set sizes summed (`rss_process_tree`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from dataclasses import dataclass

import psutil

GB = 1024**3
# A read of the tree's memory this short is sampled at the full rate (see PeakMemoryTracker).
CHEAP_READ_S = 0.02


@dataclass
class MemoryReport:
    peak_mem_gb: float
    source: str
    samples: int
    torch_peak_allocated_gb: float | None = None
    torch_peak_reserved_gb: float | None = None


def _process_tree_pids() -> set[int]:
    me = psutil.Process(os.getpid())
    return {me.pid, *(child.pid for child in me.children(recursive=True))}


def _pss(pid: int) -> int | None:
    """The process's proportional set size in bytes; None without smaps_rollup (not Linux)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:  # exited while we read, or no /proc
        return 0 if os.path.exists("/proc/self/smaps_rollup") else None
    return None


def _rss(pid: int) -> int:
    with contextlib.suppress(psutil.Error):  # a child that exited while we read
        return psutil.Process(pid).memory_info().rss
    return 0


def _tree_memory() -> tuple[int, str]:
    """The process tree's memory in bytes and how it was read: PSS, else RSS summed."""
    pids = _process_tree_pids()
    pss = [_pss(pid) for pid in pids]
    if all(size is not None for size in pss):
        return sum(pss), "pss_process_tree"  # type: ignore[arg-type]
    return sum(_rss(pid) for pid in pids), "rss_process_tree"


def _release_freed_heap() -> None:
    """Hand memory that earlier trials freed back to the OS, so this trial's RSS peak is its own.

    glibc keeps freed blocks mapped; without this, peak RSS on CPU depends on trial order.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _NvmlReader:
    """GPU memory of this process tree on the CUDA device in use, or the device's rise."""

    def __init__(self, device_index: int):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        # CUDA_VISIBLE_DEVICES renumbers devices; NVML sees physical indices.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible and visible.split(",")[device_index].strip().isdigit():
            device_index = int(visible.split(",")[device_index])
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def process_bytes(self) -> int | None:
        pids = _process_tree_pids()
        used = [
            p.usedGpuMemory
            for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            if p.pid in pids and p.usedGpuMemory is not None
        ]
        return sum(used) if used else None

    def device_rise_bytes(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used - self.baseline


class PeakMemoryTracker:
    """`with PeakMemoryTracker(device) as tracker: ...` then `tracker.report()`."""

    def __init__(self, device: str, interval_s: float = 0.02, duty: float = 0.1):
        self.device = device
        # 50 Hz at most. Reading PSS walks the page tables of every process of the tree in the
        # kernel: ~5 ms for one process, 30-130 ms for a vLLM server's four on a shared 2-core
        # machine. Read back to back, that took 0.6 of a core (3 s of system time in 5 s) from
        # the CPU server it measured, holding each process's memory-map lock meanwhile: in
        # back-to-back closed-loop runs the server answered 25-40% fewer requests/s with it.
        # So what a read takes beyond `CHEAP_READ_S` keeps the sampler busy `duty` of the time
        # at most (a vLLM tree on CPU: every 0.1-1 s); a single process is read at 50 Hz.
        self.interval_s = interval_s
        self.duty = duty
        self._stop = threading.Event()
        self._peak = 0
        self._samples = 0
        self._source = "pss_process_tree"
        self._nvml: _NvmlReader | None = None
        self._thread: threading.Thread | None = None

    def _read(self) -> int:
        if self._nvml is None:
            size, self._source = _tree_memory()
            return size
        own = self._nvml.process_bytes()
        if own is not None:
            self._source = "nvml_process"
            return own
        self._source = "nvml_device_delta"
        return self._nvml.device_rise_bytes()

    def _sample(self) -> None:
        self._peak = max(self._peak, self._read())
        self._samples += 1

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self._sample()
            costly = time.perf_counter() - start - CHEAP_READ_S
            wait = max(self.interval_s, costly * (1 / self.duty - 1))

    def __enter__(self) -> PeakMemoryTracker:
        _release_freed_heap()
        if self.device.startswith("cuda"):
            import torch

            index = torch.device(self.device).index or 0
            self._nvml = _NvmlReader(index)
            # A process that never touched CUDA (vLLM's frontend: the model lives in its engine
            # process) has no allocator statistics to reset or read.
            if torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats(index)
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="sweeper-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def report(self) -> MemoryReport:
        report = MemoryReport(self._peak / GB, self._source, self._samples)
        import torch

        if self._nvml is not None and torch.cuda.is_initialized():
            report.torch_peak_allocated_gb = torch.cuda.max_memory_allocated() / GB
            report.torch_peak_reserved_gb = torch.cuda.max_memory_reserved() / GB
        return report
