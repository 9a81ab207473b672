"""Loads: how requests arrive at the engine (load.py); each load's config (config.py) names its
class."""

from __future__ import annotations

from typing import Any

from sweeper.loads.load import Load, Measured

__all__ = ["Load", "Measured", "build_load"]


def build_load(cfg: Any) -> Load:
    from hydra.utils import get_class

    return get_class(cfg._target_)(cfg)
