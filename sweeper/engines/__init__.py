"""Engines behind one interface (base.py), each a subpackage with its config (whose `_target_`
names the engine class) and its engine; a toolkit of what they share (toolkit/); and the cache
that keeps one engine loaded across trials.

Trials of one process that differ only in decoding keys reuse the loaded engine; a trial with
another engine-level config closes the old engine (freeing its memory) before loading the new.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from sweeper.engines.base import Engine

__all__ = ["ENGINE_CACHE", "Engine", "EngineCache", "engine_class"]


def engine_class(engine_cfg: Any) -> type[Engine]:
    """The class the engine config names (imported only now: vLLM is an optional install)."""
    from hydra.utils import get_class

    return get_class(engine_cfg._target_)


@dataclass
class LoadedEngine:
    engine: Engine
    key: str
    load_s: float | None  # None when this trial reused an engine loaded earlier

    @property
    def cache_hit(self) -> bool:
        return self.load_s is None


class EngineCache:
    """Holds at most one engine: the one for the last engine-level config asked for."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._engine: Engine | None = None
        self.loads = 0

    @staticmethod
    def key(engine_cfg: Any, model_cfg: Any, options: dict[str, Any]) -> str:
        return json.dumps(
            {"engine": asdict(engine_cfg), "model": asdict(model_cfg), "options": options},
            sort_keys=True,
        )

    def get(self, engine_cfg: Any, model_cfg: Any, options: dict[str, Any]) -> LoadedEngine:
        """The engine for this config; `options` are its config's `load_options(trial)`."""
        key = self.key(engine_cfg, model_cfg, options)
        if self._engine is not None and key == self._key:
            return LoadedEngine(self._engine, key, None)
        self.clear()
        from sweeper.engines.toolkit.chat import chat_prompts
        from sweeper.models import resolve_model_path
        from sweeper.models.info import model_info

        start = time.perf_counter()
        chat = chat_prompts(model_info(resolve_model_path(model_cfg)), model_cfg.chat_template)
        engine = engine_class(engine_cfg)(engine_cfg, chat, **options)
        self._engine, self._key = engine, key
        self.loads += 1
        return LoadedEngine(engine, key, time.perf_counter() - start)

    def clear(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._key = None, None


ENGINE_CACHE = EngineCache()
