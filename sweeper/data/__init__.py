"""Datasets' files turned into `Sample`s (easy_vqa.py, okvqa.py, okvqa_hf.py, jsonl.py), the
selection every task applies, and image decoding ahead of the engine (prefetch.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sweeper.data.base import DataError, LoadedSample, LoadReport, Sample, probe_images, select
from sweeper.data.prefetch import prefetch

__all__ = ["DataError", "LoadReport", "LoadedSample", "Sample", "load_samples", "prefetch"]


def load_samples(
    cfg: Any, source: Callable[[Any, LoadReport], list[Sample]]
) -> tuple[list[Sample], LoadReport]:
    """The samples a trial runs on, and the report of what was skipped (dataset.on_error).

    The source's samples are shuffled (dataset.seed) and limited, then each selected image's
    header is checked (`probe_images`); `prefetch` checks the pixels when it decodes them.
    """
    report = LoadReport(on_error=str(cfg.on_error))
    loaded = source(cfg, report)
    if not loaded:
        raise report.nothing_left(f"dataset '{cfg.name}'")
    samples = probe_images(select(loaded, cfg.limit, cfg.seed), report)
    if not samples:
        raise DataError(f"dataset '{cfg.name}': every selected sample was skipped")
    return samples, report
