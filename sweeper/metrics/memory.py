"""Peak memory of a trial, sampled by a background thread.

`peak_mem_gb` holds, by what the machine offers (the `peak_mem_source` tag says which):
- `nvml_process`: on a GPU, the peak of the GPU memory NVML reports for this process and its
  children (vLLM runs its engine in child processes);
- `nvml_device_delta`: in containers NVML reports host PIDs, so no process matches; then the
  peak rise of the device's used memory over its pre-trial baseline;
- `pss_process_tree`: on CPU, the peak proportional set size (PSS) of this process and its
  children: each page counted once, however many of them map it (vLLM's frontend, engine core and
  worker share libraries and tensors: their RSS summed counted those pages up to three times,
  31% over PSS on the tiny model). Linux's /proc/PID/smaps_rollup gives PSS, but reading it
  walks the process's page tables in the kernel under its memory-map lock: 30-130 ms for a vLLM
  server's processes on the 2-core box, and sampled during a run it stalled the server it
  measured (a rate load's TTFT p99 rose from 15 to 150 ms, its mean doubled). So PSS is read only
  where nothing is measured, when the tracker starts and stops; in between each process's RSS
  (a counter, /proc/PID/statm) is sampled, and the tree's PSS at a sample is its RSS summed less
  each process's shared excess (RSS - PSS: its pages other processes map too) as read at the
  ends, the smaller of the two (a process that starts and ends in between counts its RSS).
  Where smaps_rollup is missing (not Linux), the RSS summed (`rss_process_tree`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import time
from dataclasses import dataclass

import psutil

GB = 1024**3


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


class _TreeReader:
    """This process tree's memory on CPU: PSS at the ends (`boundary`), RSS summed in between
    (`sample`), less the shared excess read at the ends (the module's docstring says why)."""

    # The tree's processes are listed again this often: listing reads every /proc/PID/stat of
    # the machine (~1 ms), reading RSS ~2 us a process.
    PIDS_EVERY_S = 0.25

    def __init__(self) -> None:
        self.source = "pss_process_tree"
        self._pss_peak = 0
        self._shared: dict[int, int] = {}  # pid -> RSS - PSS, the smallest read
        self._rss_peaks: dict[frozenset[int], int] = {}  # the tree's processes -> RSS summed
        self._pids: frozenset[int] = frozenset()
        self._listed = -math.inf

    def boundary(self) -> None:
        pids = _process_tree_pids()
        rss = {pid: _rss(pid) for pid in pids}
        pss = {pid: _pss(pid) for pid in pids}
        if any(size is None for size in pss.values()):
            self.source = "rss_process_tree"
            self._pss_peak = max(self._pss_peak, sum(rss.values()))
            return
        self._pss_peak = max(self._pss_peak, sum(pss.values()))  # type: ignore[arg-type]
        for pid in pids:
            excess = max(0, rss[pid] - pss[pid])  # type: ignore[operator]
            self._shared[pid] = min(self._shared.get(pid, excess), excess)

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._listed > self.PIDS_EVERY_S:
            self._pids, self._listed = frozenset(_process_tree_pids()), now
        total = sum(_rss(pid) for pid in self._pids)
        self._rss_peaks[self._pids] = max(self._rss_peaks.get(self._pids, 0), total)

    def peak(self) -> int:
        sampled = (
            total - sum(self._shared.get(pid, 0) for pid in pids)
            for pids, total in self._rss_peaks.items()
        )
        return max([self._pss_peak, *sampled])


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

    def __init__(self, device: str, interval_s: float = 0.02):
        self.device = device
        self.interval_s = interval_s  # 50 Hz: a read is a few microseconds a process
        self._stop = threading.Event()
        self._peak = 0
        self._samples = 0
        self._source = "pss_process_tree"
        self._nvml: _NvmlReader | None = None
        self._tree = _TreeReader()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._samples += 1
        if self._nvml is None:
            self._tree.sample()
            return
        own = self._nvml.process_bytes()
        if own is not None:
            self._source = "nvml_process"
            self._peak = max(self._peak, own)
        else:
            self._source = "nvml_device_delta"
            self._peak = max(self._peak, self._nvml.device_rise_bytes())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

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
        else:
            self._tree.boundary()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="sweeper-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._nvml is None:
            self._tree.boundary()
            self._peak, self._source = self._tree.peak(), self._tree.source

    def report(self) -> MemoryReport:
        report = MemoryReport(self._peak / GB, self._source, self._samples)
        import torch

        if self._nvml is not None and torch.cuda.is_initialized():
            report.torch_peak_allocated_gb = torch.cuda.max_memory_allocated() / GB
            report.torch_peak_reserved_gb = torch.cuda.max_memory_reserved() / GB
        return report
