"""Where a trial's model comes from: a local folder, a hub id, or a tiny model built offline."""

from __future__ import annotations

from typing import Any


def resolve_model_path(cfg: Any) -> str:
    """A path or hub id that `from_pretrained` loads; builds (once) what `model.builder` names."""
    if cfg.builder == "tiny_random":
        from sweeper.models.tiny import cached_tiny_vlm

        return str(cached_tiny_vlm(cfg.cache_dir))
    return cfg.path
