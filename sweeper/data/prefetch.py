"""Decode images ahead of the engine in a background thread, through a bounded queue."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

from sweeper.data.base import IMAGE_ERRORS, LoadedSample, LoadReport, Sample, reject_image

_DONE = object()


def prefetch(
    samples: Sequence[Sample], depth: int, report: LoadReport | None = None
) -> Iterator[LoadedSample]:
    """Yield samples with decoded images in order; at most `depth` decoded images wait in memory.

    Decoding overlaps generation, and each sample still carries its own decode time. An image
    that fails to decode goes to `report`: a one-line DataError under dataset.on_error=raise
    (the default without a report), else the sample is left out and counted there.
    """
    report = report or LoadReport()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for sample in samples:
                if stop.is_set():
                    return
                start = time.perf_counter()
                try:
                    image = sample.load_image()
                except IMAGE_ERRORS as error:
                    reject_image(sample, "cannot decode image", error, report)
                    continue
                slots.put(LoadedSample(sample, image, time.perf_counter() - start))
        except BaseException as error:  # handed to the consumer, which re-raises it
            slots.put(error)
        slots.put(_DONE)

    worker = threading.Thread(target=produce, name="sweeper-prefetch", daemon=True)
    worker.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(0.01)
