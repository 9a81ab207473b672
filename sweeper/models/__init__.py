"""Where a trial's model comes from: a local folder, a hub id, or a model built offline."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def resolve_model_path(cfg: Any) -> str:
    """A path or hub id that `from_pretrained` loads; builds (once) what `model.builder` names."""
    if cfg.builder == "tiny_random":
        from sweeper.models.tiny import cached_tiny_vlm

        return str(cached_tiny_vlm(cfg.cache_dir))
    if cfg.builder == "qwen2_5_vl_7b_arch":
        from sweeper.models.qwen_arch import cached_qwen2_5_vl_7b_arch

        return str(cached_qwen2_5_vl_7b_arch(cfg.cache_dir))
    return cfg.path


def has_weights(path: str) -> bool:
    """False only for a local folder without weight files (an architecture-only folder, whose
    weights the engines initialise at random); a hub id is assumed to hold weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return True
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def cached_build(target: Path, build: Callable[[Path], Any]) -> Path:
    """`target`, built by `build(folder)` on first use. Each process builds into a partial folder
    of its own and renames it atomically: concurrent workers (one per GPU) never see a
    half-written folder nor write into each other's."""
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another worker renamed its build first: keep that one
        shutil.rmtree(tmp)
        if not (target / "config.json").exists():
            raise
    return target
