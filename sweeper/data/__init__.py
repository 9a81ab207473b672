"""Datasets: each source turns its files into `VQASample`s; `load_samples` picks by config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sweeper.data.base import DataError, LoadedSample, VQASample, chunks, select
from sweeper.data.prefetch import prefetch

__all__ = ["DataError", "LoadedSample", "VQASample", "chunks", "load_samples", "prefetch"]


def _easy_vqa(cfg: Any) -> list[VQASample]:
    from sweeper.data.easy_vqa import load_easy_vqa

    return load_easy_vqa(cfg.split)


# name -> loader of the full sample list (images stay lazy).
SOURCES: dict[str, Callable[[Any], list[VQASample]]] = {"easy_vqa": _easy_vqa}


def load_samples(cfg: Any) -> list[VQASample]:
    """The samples a trial runs on: the source's samples, shuffled (dataset.seed), limited."""
    try:
        source = SOURCES[cfg.name]
    except KeyError:
        raise DataError(f"unknown dataset '{cfg.name}' (known: {', '.join(SOURCES)})") from None
    return select(source(cfg), cfg.limit, cfg.seed)
