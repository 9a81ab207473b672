"""Datasets: each source turns its files into `VQASample`s; `load_samples` picks by config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sweeper.data.base import (
    DataError,
    LoadedSample,
    LoadReport,
    VQASample,
    chunks,
    probe_images,
    select,
)
from sweeper.data.prefetch import prefetch

__all__ = [
    "DataError",
    "LoadReport",
    "LoadedSample",
    "VQASample",
    "chunks",
    "load_samples",
    "prefetch",
]


def _easy_vqa(cfg: Any, report: LoadReport) -> list[VQASample]:
    from sweeper.data.easy_vqa import load_easy_vqa

    return load_easy_vqa(cfg.split)


def _okvqa(cfg: Any, report: LoadReport) -> list[VQASample]:
    from sweeper.data.okvqa import load_okvqa

    return load_okvqa(cfg, report)


def _okvqa_hf(cfg: Any, report: LoadReport) -> list[VQASample]:
    from sweeper.data.okvqa_hf import load_okvqa_hf

    return load_okvqa_hf(cfg, report)


# name -> loader of the full sample list (images stay lazy); bad samples go to the report.
SOURCES: dict[str, Callable[[Any, LoadReport], list[VQASample]]] = {
    "easy_vqa": _easy_vqa,
    "okvqa": _okvqa,
    "okvqa_hf": _okvqa_hf,
}


def load_samples(cfg: Any) -> tuple[list[VQASample], LoadReport]:
    """The samples a trial runs on, and the report of what was skipped (dataset.on_error).

    The source's samples are shuffled (dataset.seed) and limited, then each selected image's
    header is checked (`probe_images`); `prefetch` checks the pixels when it decodes them.
    """
    try:
        source = SOURCES[cfg.name]
    except KeyError:
        raise DataError(f"unknown dataset '{cfg.name}' (known: {', '.join(SOURCES)})") from None
    report = LoadReport(on_error=cfg.on_error)
    samples = probe_images(select(source(cfg, report), cfg.limit, cfg.seed), report)
    if not samples:
        raise DataError(f"dataset '{cfg.name}': every selected sample was skipped")
    return samples, report
